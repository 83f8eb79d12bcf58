"""DCNv3 core: forward and forward+backward time and peak extra memory per backend, as ratios to the grid_sample
reference measured in the same run.

Shapes: the four stages of InternImage-T (batch 8 at 224 px) and stage 3 of InternImage-H (batch 8 at 224 px).
Backends: 'pytorch' (reference), 'compile' (torch.compile of the reference), 'cpu' (fused kernel); 'cuda-pytorch'
and 'cuda' (with -bf16) still run at these batch-8 shapes when named in --backends.

``--device cuda`` measures the CUDA kernels at training batch sizes instead (GPU_SHAPES: InternImage-T stages 1-4 at
N=64, -B and -L stage 1 at N=32, -H stage 3 at N=16, the DCNv4 paper's shape), fp32 and bf16 (bf16 features with
fp32 offsets and mask, as under autocast), forward and forward+backward, for the backends 'ours' (chunked kernels),
'dcnv4' (the DCNv4 package with its own launch table, when it imports; ``--dcnv4-site`` adds its install folder),
'legacy' (the one-thread-per-channel kernel, DCNV3_CUDA_KERNEL=legacy) and 'reference' (grid_sample). One subprocess
per backend, rows kept as they arrive, ``--budget-s`` caps the whole run. ``--block-threads 64,128,256`` adds
'ours@T' rows with DCNV3_CUDA_THREADS=T, to tune the launch table in csrc/dcnv3/dcnv3_cuda_kernels.cuh. Each row
gives the median time over CUDA events, the bytes the operator must move (operator_bytes), GB/s and the share of the
GPU's HBM bandwidth (HBM_PEAK_GBS), and speed-ups over the reference and DCNv4 from the same run:

    python benchmarks/dcnv3.py --device cuda --repeats 20 --json rows.json
    python benchmarks/dcnv3.py --device cuda --shapes T1 --backends ours,legacy --block-threads 64,128,256

Each (shape, backend, thread count) runs in a fresh subprocess; wall-clock time is the headline. ``--threads 1,2``
runs every CPU backend at each torch thread count (speed-ups are against the reference at the same count, and a
column gives each backend's scaling from the smallest count). ``--rounds R`` repeats the whole sweep R times,
interleaved, for a machine shared with other work: each time is the best of the rounds' medians, with the slowest
beside it, and each speed-up the ratio of the best times with the range of the per-round ratios.

CPU peak memory is the rise of the resident set (VmHWM, reset via /proc/self/clear_refs) above the resident set with
the inputs allocated, with glibc returning large blocks at once (MALLOC_MMAP_THRESHOLD_); GPU peak memory is
torch.cuda.max_memory_allocated above the inputs.

    python benchmarks/dcnv3.py                       # CPU table
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
# --device cuda: name -> (N, H, W, group, group_channels) at training batch sizes, 3x3 kernel, stride 1, pad 1
GPU_SHAPES = {
    "T1": (64, 56, 56, 4, 16),
    "T2": (64, 28, 28, 8, 16),
    "T3": (64, 14, 14, 16, 16),
    "T4": (64, 7, 7, 32, 16),
    "B1": (32, 56, 56, 7, 16),
    "L1": (32, 56, 56, 10, 16),
    "H3": (16, 14, 14, 40, 32),
    "DCNv4-paper": (64, 56, 56, 4, 32),  # C=128, G=4: the shape of the DCNv4 paper's operator table
}
GPU_BACKENDS = ["ours", "dcnv4", "legacy", "reference"]
# HBM bandwidth in GB/s by a substring of torch.cuda.get_device_name(), first match wins (vendor data sheets).
HBM_PEAK_GBS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 (the name reads "NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100-SXM4-40GB", 1555.0),
    ("A100-PCIE-40GB", 1555.0),
]


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


def hbm_peak_gbs(device_name: str) -> float | None:
    """Peak HBM bandwidth (GB/s) of the named GPU, None when it is not in HBM_PEAK_GBS."""
    return next((gbs for key, gbs in HBM_PEAK_GBS if key in device_name), None)


def operator_bytes(shape: tuple, feature_bytes: int, side_bytes: int) -> tuple[int, int]:
    """Bytes the operator must move at ``shape`` (3x3 kernel): forward reads input, offsets and mask and writes the
    output; the backward reads input, offsets, mask and grad_output and writes the three gradients (each gradient in
    its tensor's dtype). Returns (forward, forward+backward)."""
    n, h, w, g, d = shape
    features = n * h * w * g * d * feature_bytes  # input, output, grad_output, grad_input alike
    side = n * h * w * g * 9 * 3 * side_bytes  # offsets (2 per point) and mask (1 per point)
    forward = 2 * features + side
    return forward, forward + 3 * features + 2 * side


def cuda_worker(backend: str, shapes: list[str], dtypes: list[str], repeats: int, dcnv4_site: str | None) -> None:
    """Prints one JSON row per (shape, dtype) for one backend, as soon as it is measured."""
    import torch

    from pretrain.ops import dcnv3_core, dcnv3_core_pytorch

    base = backend.split("@")[0]
    dcnv4_apply = None
    if base == "dcnv4":
        if dcnv4_site:
            sys.path.insert(0, dcnv4_site)
        try:
            from DCNv4.functions import DCNv4Function
            dcnv4_apply = DCNv4Function.apply
        except Exception as exc:  # noqa: BLE001 - any import failure is reported as the row's error
            for shape in shapes:
                for dtype in dtypes:
                    print(json.dumps({"kind": "cuda", "shape": shape, "backend": backend, "dtype": dtype,
                                      "error": f"DCNv4 not importable: {type(exc).__name__}: {exc}"}), flush=True)
            return
    device_name = torch.cuda.get_device_name()
    for shape_name in shapes:
        n, h, w, g, d = GPU_SHAPES[shape_name]
        for dtype_name in dtypes:
            row = {"kind": "cuda", "shape": shape_name, "backend": backend, "dtype": dtype_name, "gpu": device_name}
            try:
                row.update(_cuda_measure(base, (n, h, w, g, d), dtype_name, repeats, dcnv3_core, dcnv3_core_pytorch,
                                         dcnv4_apply))
            except Exception as exc:  # noqa: BLE001 - one failing row (DCNv4's bf16 backward, OOM) keeps the others
                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)


def _cuda_measure(base, shape, dtype_name, repeats, dcnv3_core, dcnv3_core_pytorch, dcnv4_apply) -> dict:
    import torch

    n, h, w, g, d = shape
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, w, g * d, generator=gen).to("cuda", dtype).requires_grad_()
    offset = (torch.randn(n, h, w, g * 18, generator=gen) * 2).cuda()
    mask = torch.rand(n, h, w, g, 9, generator=gen).softmax(-1).reshape(n, h, w, g * 9).cuda()
    grad = torch.randn(n, h, w, g * d, generator=gen).to("cuda", dtype)
    args = (3, 3, 1, 1, 1, 1, 1, 1, g, d, 1.0, False)
    if base == "dcnv4":
        # DCNv4's layout: per group 2K offsets then K mask values, the row padded to a multiple of 8, input's dtype.
        om = torch.cat([offset.reshape(n, h, w, g, 18), mask.reshape(n, h, w, g, 9)], -1).reshape(n, h, w, g * 27)
        om = torch.nn.functional.pad(om, (0, -(g * 27) % 8)).to(dtype).requires_grad_()
        tensors = (x, om)

        def fn():
            return dcnv4_apply(x, om, 3, 3, 1, 1, 1, 1, 1, 1, g, d, 1.0, n, False)  # im2col_step = whole batch
    else:
        offset, mask = offset.requires_grad_(), mask.requires_grad_()  # fp32 side tensors also for bf16 features
        tensors = (x, offset, mask)
        if base == "reference":
            def fn():
                return dcnv3_core_pytorch(x, offset, mask, *args)
        else:
            def fn():
                return dcnv3_core(x, offset, mask, *args, backend="cuda")

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        fn().backward(grad)
        for t in tensors:
            t.grad = None

    for _ in range(3):  # warm-up: extension load, cuDNN/cuBLAS heuristics, allocator
        fwd()
        fwd_bwd()
    torch.cuda.synchronize()
    side_bytes = tensors[1].element_size()
    result = {}
    for label, step, nbytes in zip(("fwd", "fwd_bwd"), (fwd, fwd_bwd),
                                   operator_bytes(shape, x.element_size(), side_bytes)):
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        result[f"{label}_s"] = statistics.median(times)
        result[f"{label}_bytes"] = nbytes
    return result


def run_cuda(shapes: list[str], backends: list[str], dtypes: list[str], repeats: int, budget_s: float,
             dcnv4_site: str | None, rows_out: Path | None) -> list[dict]:
    """One subprocess per backend; rows are kept as they arrive, so a backend cut off by the budget loses only its
    unmeasured rows (and ``rows_out``, when given, always holds what was measured)."""
    deadline = time.monotonic() + budget_s
    rows: list[dict] = []
    for backend in backends:
        left = deadline - time.monotonic()
        if left < 5:
            rows += [{"kind": "cuda", "shape": s, "backend": backend, "dtype": dt, "error": "not run (budget)"}
                     for s in shapes for dt in dtypes]
            continue
        env = dict(os.environ,
                   PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("DCNV3_CUDA_KERNEL", None)
        env.pop("DCNV3_CUDA_THREADS", None)
        if backend == "legacy":
            env["DCNV3_CUDA_KERNEL"] = "legacy"
        if "@" in backend:
            env["DCNV3_CUDA_THREADS"] = backend.split("@")[1]
        cmd = [sys.executable, __file__, "--cuda-worker", backend, "--shapes", ",".join(shapes), "--dtypes",
               ",".join(dtypes), "--repeats", str(repeats)] + (["--dcnv4-site", dcnv4_site] if dcnv4_site else [])
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err = f"budget of {budget_s:.0f} s spent\n" + err
        got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        done = {(r["shape"], r["dtype"]) for r in got}
        reason = (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        got += [{"kind": "cuda", "shape": s, "backend": backend, "dtype": dt, "error": reason}
                for s in shapes for dt in dtypes if (s, dt) not in done]
        for r in got:
            print(json.dumps(r), file=sys.stderr, flush=True)
        rows += got
        if rows_out:
            rows_out.write_text(json.dumps(rows, indent=1))
    return rows


def cuda_table(rows: list[dict]) -> str:
    """Markdown: one line per (shape, dtype, backend) with ms, GB/s, % of HBM peak and the speed-up over the
    reference and over DCNv4 measured in the same run."""
    import math

    out = ["| shape (N,H,W,G,D) | dtype | backend | fwd ms | fwd GB/s | fwd % HBM | fwd+bwd ms | fwd+bwd GB/s | "
           "fwd+bwd % HBM | fwd / fwd+bwd vs reference | fwd / fwd+bwd vs DCNv4 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["shape"], r["dtype"], r["backend"]): r for r in rows if "error" not in r}

    def speedup(r, other, key):
        o = by_key.get((r["shape"], r["dtype"], other))
        return f"{o[key] / r[key]:.2f}x" if o and key in o and key in r else "-"

    for r in rows:
        label = f"{r['shape']} {GPU_SHAPES.get(r['shape'], '')}"
        if "error" in r:
            out.append(f"| {label} | {r['dtype']} | {r['backend']} | error: {r['error']} | | | | | | | |")
            continue
        peak = hbm_peak_gbs(r.get("gpu", ""))
        cells = []
        for key in ("fwd", "fwd_bwd"):
            gbs = r[f"{key}_bytes"] / r[f"{key}_s"] / 1e9
            share = f"{100 * gbs / peak:.0f}%" if peak and math.isfinite(gbs) else "-"
            cells += [f"{r[f'{key}_s'] * 1e3:.3f}", f"{gbs:.0f}", share]
        vs_ref = f"{speedup(r, 'reference', 'fwd_s')} / {speedup(r, 'reference', 'fwd_bwd_s')}"
        vs_v4 = f"{speedup(r, 'dcnv4', 'fwd_s')} / {speedup(r, 'dcnv4', 'fwd_bwd_s')}"
        out.append(f"| {label} | {r['dtype']} | {r['backend']} | {' | '.join(cells)} | {vs_ref} | {vs_v4} |")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    if rows and rows[0].get("kind") == "cuda":
        return cuda_table(rows)
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
    parser.add_argument("--cuda-worker", metavar="BACKEND", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: SHAPES on the CPU backends (default); cuda: GPU_SHAPES on the CUDA backends")
    parser.add_argument("--shapes", default=None, help="comma-separated subset of " + ",".join(SHAPES)
                        + " (cpu) or " + ",".join(GPU_SHAPES) + " (cuda)")
    parser.add_argument("--backends", default=None, help="comma-separated subset (default: all that apply here)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="cuda: comma-separated subset of fp32,bf16")
    parser.add_argument("--block-threads", default="",
                        help="cuda: also run 'ours' at these threads per block (DCNV3_CUDA_THREADS, for tuning)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="cuda: stop starting backends after this long")
    parser.add_argument("--dcnv4-site", default=None, help="cuda: folder the DCNv4 package is installed in")
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
    if args.cuda_worker:
        cuda_worker(args.cuda_worker, args.shapes.split(","), args.dtypes.split(","), args.repeats, args.dcnv4_site)
        return 0
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda needs a CUDA device")
        backends = args.backends.split(",") if args.backends else list(GPU_BACKENDS)
        backends += [f"ours@{t}" for t in args.block_threads.split(",") if t]  # after the comparison rows
        rows = run_cuda((args.shapes or ",".join(GPU_SHAPES)).split(","), backends, args.dtypes.split(","),
                        args.repeats, args.budget_s, args.dcnv4_site, args.json)
        print(f"torch {torch.__version__}, GPU {torch.cuda.get_device_name()}, HBM peak "
              f"{hbm_peak_gbs(torch.cuda.get_device_name()) or '?'} GB/s, median of {args.repeats} (CUDA events)")
        print(table(rows))
        return 0
    backends = args.backends.split(",") if args.backends else CPU_BACKENDS
    args.shapes = args.shapes or ",".join(SHAPES)
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
