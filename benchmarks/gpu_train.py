"""Training throughput on one CUDA GPU: InternImage (our DCNv3 CUDA kernel) against timm's ConvNeXt.

    python benchmarks/gpu_train.py [--models internimage_t,convnext_tiny] [--batches 64] [--steps 10] [--json OUT]
                                   [--budget-s S]

Each (model, batch) does forward + cross-entropy + backward + torch.optim.AdamW (fused) under bf16 autocast at
224x224 on random inputs, train mode, drop_path_rate 0.1; ConvNeXt runs channels-last (its convolutions are faster
so), InternImage in its own layout (its blocks already work in NHWC). After ``--warmup`` steps (kernel build and
cuDNN autotuning), ``--steps`` steps are timed with CUDA events and synchronisation; images/s is batch / median step.
Model FLOP utilisation: training FLOPs of one step, 3 x the forward's as ``torch.utils.flop_counter`` counts it
(convolutions and matrix products, plus the DCNv3 core at 5 multiply-adds per channel and point: the count of
``python -m pretrain plan --cascade``, :func:`pretrain.engine.cascade_plan.train_flops_per_image`; the backward is
not counted directly because ``FlopCounterMode`` counts the weight gradient of depth-wise and grouped convolutions
as if they were dense, 2.9x ConvNeXt-T's true step), divided by the median step time and the GPU's dense bf16 peak
(``--peak-tflops``, default from the device name: H100/H200 989). A configuration that runs out of memory is
reported as such and the others go on.
``--profile`` adds one profiled step per configuration: the share of the step during which GPU kernels ran and the
host operators that took the most CPU time (a share well below 1 means the host sets the pace, not the GPU).
Without CUDA, ``--dry-run`` builds each model on the meta device (what the CPU rehearsal of ``make gpu-check`` does).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import pretrain.models  # noqa: E402,F401  (registers internimage_*)

DENSE_BF16_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0}
CHANNELS_LAST = ('convnext',)


def peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of the GPU called ``name`` (from its marketing name), or None when unknown."""
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)


def _build(name: str, device: str) -> torch.nn.Module:
    kwargs = {'core_op': 'DCNv3'} if name.startswith('internimage') else {}
    return timm.create_model(name, drop_path_rate=0.1, **kwargs).to(device)


LAUNCH_CALLS = ('cudaLaunchKernel', 'cudaLaunchKernelExC', 'cuLaunchKernel', 'cuLaunchKernelEx')


def profile_step(step, name: str, batch: int, top: int = 12) -> dict:
    """One step under torch.profiler: the share of the step's wall time during which GPU kernels ran (well below 1:
    the host, not the GPU, sets the pace) and the host-side operators that took the most CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.key_averages()
    # Kernels only: an operator's self device time repeats its kernels' (summing every row counts them twice).
    device_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key in LAUNCH_CALLS)
    print(f'--- profile of one step: {name}, batch {batch}: wall {wall_us / 1e3:.1f} ms (profiled), GPU kernels '
          f'{device_us / 1e3:.1f} ms ({device_us / wall_us:.0%} busy), {launches} kernel launches', flush=True)
    print(events.table(sort_by='self_cpu_time_total', row_limit=top), flush=True)
    return {'profiled_wall_ms': wall_us / 1e3, 'gpu_kernel_ms': device_us / 1e3, 'gpu_busy': device_us / wall_us,
            'kernel_launches': launches}


def train_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one training step on ``x``: 3 x the counted forward (backward = 2 x forward; see the docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.engine.cascade_plan import _register_dcnv3_flops
    _register_dcnv3_flops()
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(x.device.type, dtype=torch.bfloat16):
        model(x)
    return 3 * counter.get_total_flops()


def bench_one(name: str, batch: int, steps: int, warmup: int, profile: bool = False) -> dict:
    """images/s, median step ms, counted step FLOPs and peak memory of one (model, batch) on cuda:0."""
    torch.manual_seed(0)
    model = _build(name, 'cuda').train()
    fmt = torch.channels_last if name.startswith(CHANNELS_LAST) else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, 224, 224, device='cuda').to(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device='cuda')

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    step_flops = train_flops(model, x)
    torch.cuda.reset_peak_memory_stats()
    times_ms = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    median_ms = statistics.median(times_ms)
    prof = profile_step(step, name, batch) if profile else {}
    return {**prof, 'model': name, 'batch': batch, 'channels_last': fmt is torch.channels_last, 'steps': steps,
            'median_step_ms': median_ms, 'min_step_ms': min(times_ms), 'images_per_s': batch / median_ms * 1e3,
            'step_gflop_counted': step_flops / 1e9,
            'peak_mem_gib': torch.cuda.max_memory_allocated() / 2**30,
            'params_m': sum(p.numel() for p in model.parameters()) / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default='internimage_t,convnext_tiny')
    parser.add_argument('--batches', default='64', help='comma-separated micro-batch sizes')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--peak-tflops', type=float, default=None, help='dense bf16 peak (default: from the name)')
    parser.add_argument('--json', type=Path, help='also write the rows here (rewritten after each configuration)')
    parser.add_argument('--budget-s', type=float, default=None,
                        help='start no configuration after this many seconds; the rest are reported as not run')
    parser.add_argument('--dry-run', action='store_true', help='build every model on the meta device and exit')
    parser.add_argument('--profile', action='store_true',
                        help='after timing, profile one step per configuration: GPU busy share, top host operators')
    args = parser.parse_args(argv)
    names = [m for m in args.models.split(',') if m]
    batches = [int(b) for b in args.batches.split(',') if b]
    if args.dry_run or not torch.cuda.is_available():
        for name in names:
            _build(name, 'meta')
        print(f'dry run: built {names} on the meta device; timing needs CUDA')
        return 0 if args.dry_run else 1
    gpu = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(gpu)
    torch.backends.cudnn.benchmark = True
    rows = []
    start = time.monotonic()
    for batch in batches:
        for name in names:
            if args.budget_s is not None and time.monotonic() - start > args.budget_s:
                rows.append({'model': name, 'batch': batch, 'error': f'not run: past --budget-s {args.budget_s:.0f}'})
                continue
            try:
                row = bench_one(name, batch, args.steps, args.warmup, args.profile)
            except torch.cuda.OutOfMemoryError as exc:
                row = {'model': name, 'batch': batch, 'error': f'out of memory: {str(exc).splitlines()[0]}'}
            torch.cuda.empty_cache()
            if 'images_per_s' in row and peak:
                row['mfu_counted'] = row['step_gflop_counted'] / (row['median_step_ms'] / 1e3) / (peak * 1e3)
            row['gpu'] = gpu
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    by = {(r['model'], r['batch']): r for r in rows if 'images_per_s' in r}
    for batch in batches:
        for ii, cn in (('internimage_t', 'convnext_tiny'), ('internimage_b', 'convnext_base')):
            if (ii, batch) in by and (cn, batch) in by:
                ratio = by[(ii, batch)]['images_per_s'] / by[(cn, batch)]['images_per_s']
                print(f'{ii} / {cn} images/s at batch {batch}: {ratio:.2f}x (goal >= 0.8x)')
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all('error' not in r or r['error'].startswith('not run') for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
