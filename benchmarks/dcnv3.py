"""DCNv3 core: forward and forward+backward time and peak extra memory per backend, as ratios to the grid_sample
reference measured in the same run.

Shapes: the four stages of InternImage-T (batch 8 at 224 px) and stage 3 of InternImage-H (batch 8 at 224 px).
Backends: 'pytorch' (reference), 'compile' (torch.compile of the reference), 'cpu' (fused kernel) and, with CUDA,
'cuda-pytorch' (reference on the GPU) and 'cuda' (our kernel), each in fp32 and, on the GPU, bf16.

Each (shape, backend) runs in a fresh subprocess. CPU peak memory is the rise of the resident set (VmHWM, reset via
/proc/self/clear_refs) above the resident set with the inputs allocated, with glibc returning large blocks at once
(MALLOC_MMAP_THRESHOLD_); GPU peak memory is torch.cuda.max_memory_allocated above the inputs.

    python benchmarks/dcnv3.py                       # CPU table (plus GPU rows when CUDA is present)
    python benchmarks/dcnv3.py --shapes T1 --repeats 20
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


def worker(shape_name: str, backend: str, repeats: int, clock: str = "wall") -> dict:
    import torch

    from pretrain.ops import dcnv3_core, dcnv3_core_pytorch

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
    result = {"shape": shape_name, "backend": backend, "device": device}
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


def run_one(shape: str, backend: str, repeats: int, clock: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, __file__, "--worker", shape, backend, "--repeats", str(repeats), "--clock", clock]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return {"shape": shape, "backend": backend, "error": (res.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    out = ["| shape (N,H,W,G,D) | backend | fwd ms | fwd speed-up | fwd+bwd ms | fwd+bwd speed-up | "
           "fwd peak MB | fwd+bwd peak MB | fwd+bwd peak vs ref |",
           "|---|---|---|---|---|---|---|---|---|"]
    refs = {}
    for r in rows:
        if r["backend"] in ("pytorch", "cuda-pytorch", "cuda-pytorch-bf16") and "error" not in r:
            refs[(r["shape"], r["backend"].endswith("bf16"), r.get("device"))] = r
    for r in rows:
        shape = f"{r['shape']} {SHAPES[r['shape']]}"
        if "error" in r:
            out.append(f"| {shape} | {r['backend']} | error: {r['error']} | | | | | | |")
            continue
        ref = refs.get((r["shape"], r["backend"].endswith("bf16"), r["device"]))
        def ratio(key, ref=ref, r=r):
            return f"{ref[key] / r[key]:.2f}x" if ref else "-"
        mem_ratio = (f"{r['fwd_bwd_peak_mb'] / ref['fwd_bwd_peak_mb']:.2f}" if ref and ref["fwd_bwd_peak_mb"] > 0
                     else "-")
        out.append(f"| {shape} | {r['backend']} | {r['fwd_s'] * 1e3:.2f} | {ratio('fwd_s')} | "
                   f"{r['fwd_bwd_s'] * 1e3:.2f} | {ratio('fwd_bwd_s')} | {r['fwd_peak_mb']:.1f} | "
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
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats, args.clock)))
        return 0
    import torch

    backends = args.backends.split(",") if args.backends else CPU_BACKENDS + (
        GPU_BACKENDS if torch.cuda.is_available() else [])
    rows = []
    for shape in args.shapes.split(","):
        for backend in backends:
            rows.append(run_one(shape, backend, args.repeats, args.clock))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"clock {args.clock}"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
