"""DCNv3 core: forward and forward+backward time and peak extra memory per backend, as ratios to the grid_sample
reference measured in the same run.

Shapes: the four stages of InternImage-T (batch 8 at 224 px) and stage 3 of InternImage-H (batch 8 at 224 px).
Backends: 'pytorch' (reference), 'compile' (torch.compile of the reference), 'cpu' (fused kernel) and, with CUDA,
'cuda-pytorch' (reference on the GPU) and 'cuda' (our kernel), each in fp32 and, on the GPU, bf16.

Each (shape, backend, thread count) runs in a fresh subprocess; wall-clock time is the headline. ``--threads 1,2``
runs every CPU backend at each torch thread count (speed-ups are against the reference at the same count, and a
column gives each backend's scaling from the smallest count). ``--rounds R`` repeats the whole sweep R times,
interleaved, for a machine shared with other work: each time is the best of the rounds' medians, with the slowest
beside it, and each speed-up the ratio of the best times with the range of the per-round ratios.

CPU peak memory is the rise of the resident set (VmHWM, reset via /proc/self/clear_refs) above the resident set with
the inputs allocated, with glibc returning large blocks at once (MALLOC_MMAP_THRESHOLD_); GPU peak memory is
torch.cuda.max_memory_allocated above the inputs.

    python benchmarks/dcnv3.py                       # CPU table (plus GPU rows when CUDA is present)
    python benchmarks/dcnv3.py --shapes T1 --repeats 20
    python benchmarks/dcnv3.py --shapes T1 --backends pytorch,cpu --threads 1,2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name: (N, H, W, group, group_channels)
SHAPES = {
    "T1": (8, 56, 56, 4, 16),
    "T2": (8, 28, 28, 8, 16),
    "T3": (8, 14, 14, 16, 16),
    "T4": (8, 7, 7, 32, 16),
    "H3": (8, 14, 14, 40, 32),
}
CPU_BACKENDS = ["pytorch", "compile", "cpu"]
GPU_BACKENDS = ["cuda-pytorch", "cuda", "cuda-pytorch-bf16", "cuda-bf16"]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(shape_name: str, backend: str, repeats: int, clock: str = "wall", threads: int = 0) -> dict:
    """Times one (shape, backend) in this process at ``threads`` torch threads (0: torch's default)."""
    import torch

    from pretrain.ops import dcnv3_core, dcnv3_core_pytorch

    if threads > 0:
        torch.set_num_threads(threads)

    n, h, w, g, d = SHAPES[shape_name]
    device = "cuda" if backend.startswith("cuda") else "cpu"
    dtype = torch.bfloat16 if backend.endswith("bf16") else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, w, g * d, generator=gen).to(device, dtype).requires_grad_()
    offset = (torch.randn(n, h, w, g * 18, generator=gen) * 2).to(device, dtype).requires_grad_()
    mask = torch.rand(n, h, w, g * 9, generator=gen).softmax(-1).to(device, dtype).requires_grad_()
    grad = torch.randn(n, h, w, g * d, generator=gen).to(device, dtype)
    args = (3, 3, 1, 1, 1, 1, 1, 1, g, d, 1.0, False)
    base = backend.removesuffix("-bf16")
    if base in ("pytorch", "cuda-pytorch"):
        def fn():
            return dcnv3_core_pytorch(x, offset, mask, *args)
    elif base == "compile":
        compiled = torch.compile(dcnv3_core_pytorch)

        def fn():
            return compiled(x, offset, mask, *args)
    else:
        def fn():
            return dcnv3_core(x, offset, mask, *args, backend=base)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        fn().backward(grad)
        x.grad = offset.grad = mask.grad = None

    for _ in range(2):  # warm-up, compilation and lazy builds included
        fwd()
        fwd_bwd()
    sync()
    result = {"shape": shape_name, "backend": backend, "device": device, "threads": torch.get_num_threads()}
    for label, step in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            sync()
            result[f"{label}_peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")
            before = _status_kb("VmRSS")
            step()
            result[f"{label}_peak_mb"] = (_status_kb("VmHWM") - before) / 1024
        # 'cpu' counts this process's CPU seconds (all threads): robust on a shared machine, but not latency.
        now = time.process_time if clock == "cpu" else time.perf_counter
        times = []
        for _ in range(repeats):
            sync()
            t0 = now()
            step()
            sync()
            times.append(now() - t0)
        result[f"{label}_s"] = statistics.median(times)
    return result


def run_one(shape: str, backend: str, repeats: int, clock: str, threads: int = 0) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, __file__, "--worker", shape, backend, "--repeats", str(repeats), "--clock", clock,
           "--threads", str(threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return {"shape": shape, "backend": backend, "threads": threads,
                "error": (res.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (shape, backend, threads) from R sweeps: best (min) time, slowest time and every round's time."""
    merged = []
    for runs in zip(*rounds):
        ok = [r for r in runs if "error" not in r]
        if not ok:
            merged.append(runs[0])
            continue
        row = dict(ok[0])
        for key in ("fwd_s", "fwd_bwd_s"):
            row[f"{key}_rounds"] = [r[key] for r in ok]
            row[key], row[f"{key}_max"] = min(row[f"{key}_rounds"]), max(row[f"{key}_rounds"])
        for key in ("fwd_peak_mb", "fwd_bwd_peak_mb"):
            row[key] = min(r[key] for r in ok)
        merged.append(row)
    return merged


def table(rows: list[dict]) -> str:
    """Markdown table of worker rows (or merge_rounds rows): speed-ups against the reference of the same shape, dtype,
    device and thread count; scaling against the same backend at the smallest thread count."""
    out = ["| shape (N,H,W,G,D) | backend | threads | fwd ms | fwd speed-up | fwd+bwd ms | fwd+bwd speed-up | "
           "scaling fwd / fwd+bwd | fwd peak MB | fwd+bwd peak MB | fwd+bwd peak vs ref |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    ok = [r for r in rows if "error" not in r]
    refs, fewest = {}, {}
    for r in ok:
        if r["backend"] in ("pytorch", "cuda-pytorch", "cuda-pytorch-bf16"):
            refs[(r["shape"], r["backend"].endswith("bf16"), r.get("device"), r.get("threads"))] = r
        key = (r["shape"], r["backend"])
        if key not in fewest or r.get("threads", 0) < fewest[key].get("threads", 0):
            fewest[key] = r

    def ms(r, key):
        worst = f" ({r[key + '_max'] * 1e3:.2f})" if r.get(f"{key}_rounds", [0])[1:] else ""
        return f"{r[key] * 1e3:.2f}{worst}"

    def ratio(ref, r, key):
        if ref is None:
            return "-"
        if ref is r:
            return "1.00x"
        text = f"{ref[key] / r[key]:.2f}x"
        pairs = list(zip(ref.get(f"{key}_rounds", []), r.get(f"{key}_rounds", [])))
        if len(pairs) > 1:  # same round: measured minutes apart at most, under the same load
            per_round = [a / b for a, b in pairs]
            text += f" ({min(per_round):.2f}-{max(per_round):.2f})"
        return text

    for r in rows:
        shape = f"{r['shape']} {SHAPES[r['shape']]}"
        threads = r.get("threads", "-")
        if "error" in r:
            out.append(f"| {shape} | {r['backend']} | {threads} | error: {r['error']} | | | | | | | |")
            continue
        ref = refs.get((r["shape"], r["backend"].endswith("bf16"), r["device"], r.get("threads")))
        base = fewest[(r["shape"], r["backend"])]
        scaling = (f"{base['fwd_s'] / r['fwd_s']:.2f}x / {base['fwd_bwd_s'] / r['fwd_bwd_s']:.2f}x"
                   if base is not r else "-")
        mem_ratio = (f"{r['fwd_bwd_peak_mb'] / ref['fwd_bwd_peak_mb']:.2f}" if ref and ref["fwd_bwd_peak_mb"] > 0
                     else "-")
        out.append(f"| {shape} | {r['backend']} | {threads} | {ms(r, 'fwd_s')} | {ratio(ref, r, 'fwd_s')} | "
                   f"{ms(r, 'fwd_bwd_s')} | {ratio(ref, r, 'fwd_bwd_s')} | {scaling} | {r['fwd_peak_mb']:.1f} | "
                   f"{r['fwd_bwd_peak_mb']:.1f} | {mem_ratio} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--backends", default=None, help="comma-separated subset (default: all that apply here)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per measurement (median)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time (default); cpu: process CPU time, on a machine shared with other work")
    parser.add_argument("--threads", default="0",
                        help="comma-separated torch thread counts for the CPU backends (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep, interleaved (shared machines)")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats, args.clock, int(args.threads))))
        return 0
    import torch

    backends = args.backends.split(",") if args.backends else CPU_BACKENDS + (
        GPU_BACKENDS if torch.cuda.is_available() else [])
    thread_counts = [int(t) for t in args.threads.split(",")]
    load_before = os.getloadavg()
    rounds = []
    for _ in range(args.rounds):
        rows = []
        for shape in args.shapes.split(","):
            for backend in backends:
                # The GPU rows do not depend on the host's thread count: run them once per round.
                for threads in thread_counts if not backend.startswith("cuda") else thread_counts[:1]:
                    rows.append(run_one(shape, backend, args.repeats, args.clock, threads))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        rounds.append(rows)
    rows = merge_rounds(rounds) if args.rounds > 1 else rounds[0]
    load_after = os.getloadavg()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads per row (default "
          f"{torch.get_num_threads()}), clock {args.clock}, median of {args.repeats}"
          + (f", best of {args.rounds} rounds (slowest round and per-round speed-up range in brackets)"
             if args.rounds > 1 else "")
          + f", load average {load_before[0]:.2f} before / {load_after[0]:.2f} after"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
