"""Large depth-wise convolutions at PeLK's shapes: plain PyTorch against our native (cropped, channels-last) and FFT
paths, forward and forward+backward, as speed-ups over the plain one measured in the same run.

Shapes (``--model pelk_t``, batch ``--batch``, 224 px): the peripheral 3/8 of each stage's channels with the stage's
kernel, i.e. (C, H, k) = (46, 56, 51), (93, 28, 49), (187, 14, 47), (374, 7, 13) for PeLK-T.
Implementations:

* ``plain``: ``F.conv2d(x, w, padding=k//2, groups=C)``, NCHW, the full kernel (the baseline);
* ``native``: ours, the kernel cropped to the taps that reach the map, channels-last;
* ``fft``: ours, ``torch.fft`` (float32), cropped kernel;
* ``auto``: what the model runs (``pretrain.ops.dwconv.choose_impl``), shown as ``auto=<forward>/<with grad>``.

Each row also gives the largest difference from ``plain``'s output. ``--sweep`` times ``native`` against ``fft``
over square kernels 3..31 on 56/28/14/7 maps (64 channels) to find where the FFT starts to win; that is the rule
``auto`` uses. ``--model-step`` times a whole training step (forward, cross-entropy, backward) of ``--model`` at
``--img-size`` with ``conv_impl='native'`` against ``'auto'``, alternating the two. Times are medians of
``--repeats`` after one warm-up, wall clock (``--clock cpu``: process CPU time, steadier on a shared machine).

    python benchmarks/large_kernel.py                 # PeLK-T shapes, batch 4, CPU, 1 thread (~1 min here)
    python benchmarks/large_kernel.py --sweep --batch 4
    python benchmarks/large_kernel.py --model-step --batch 2
    python benchmarks/large_kernel.py --device cuda --threads 0 --repeats 50
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.models.pelk import MODEL_ARGS  # noqa: E402
from pretrain.ops.dwconv import choose_impl, dwconv2d  # noqa: E402

CONV_RATIO = 3 / 8  # PeLK's default share of peripheral channels
IMPLS = ('plain', 'native', 'fft', 'auto')
SWEEP_SIZES = (56, 28, 14, 7)
SWEEP_KERNELS = (3, 5, 7, 9, 11, 13, 15, 17, 21, 31)


def plain(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, padding=w.shape[-1] // 2, groups=x.shape[1])


def timed(fn, repeats: int, device: str, clock: str) -> float:
    now = time.process_time if clock == 'cpu' else time.perf_counter
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = now()
        fn()
        sync()
        times.append(now() - t0)
    return statistics.median(times)


def measure(impl: str, batch: int, channels: int, size: int, kernel: int, *, dtype: torch.dtype, device: str,
            repeats: int, clock: str, reference: torch.Tensor | None = None) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(channels, 1, kernel, kernel, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    grad = torch.randn(batch, channels, size, size, generator=gen).to(device, dtype)
    if impl == 'plain':
        def fn():
            return plain(x, w)
    else:
        def fn():
            return dwconv2d(x, w, impl=impl)

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        fn().backward(grad)
        x.grad = w.grad = None

    with torch.no_grad():
        out = fn().float()
    auto = f'auto={choose_impl(kernel, kernel, size, size, False)}/{choose_impl(kernel, kernel, size, size, True)}'
    row = {'impl': impl if impl != 'auto' else auto,
           'shape': (batch, channels, size, kernel), 'fwd_s': timed(fwd, repeats, device, clock),
           'fwd_bwd_s': timed(fwd_bwd, repeats, device, clock)}
    row['max_abs_diff'] = (out - reference).abs().max().item() if reference is not None else 0.0
    return row, out


def stage_rows(args) -> list[dict]:
    dims, kernels = MODEL_ARGS[args.model]['dims'], MODEL_ARGS[args.model]['kernel_sizes']
    size = args.img_size // 4
    rows = []
    for dim, kernel in zip(dims, kernels):
        channels = int(dim * CONV_RATIO)
        ref = None
        for impl in IMPLS:
            row, out = measure(impl, args.batch, channels, size, kernel, dtype=args.dtype, device=args.device,
                               repeats=args.repeats, clock=args.clock, reference=ref)
            ref = out if impl == 'plain' else ref
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        size //= 2
    return rows


def stage_table(rows: list[dict]) -> str:
    out = ['| shape (B, C, H=W, k) | impl | fwd ms | fwd speed-up | fwd+bwd ms | fwd+bwd speed-up | max abs diff |',
           '|---|---|---|---|---|---|---|']
    base = {}
    for r in rows:
        if r['impl'] == 'plain':
            base[r['shape']] = r
        b = base[r['shape']]
        out.append(f"| {r['shape']} | {r['impl']} | {r['fwd_s'] * 1e3:.1f} | {b['fwd_s'] / r['fwd_s']:.1f}x | "
                   f"{r['fwd_bwd_s'] * 1e3:.1f} | {b['fwd_bwd_s'] / r['fwd_bwd_s']:.1f}x | {r['max_abs_diff']:.1e} |")
    return '\n'.join(out)


def sweep(args) -> str:
    """native / fft time ratios over kernel sizes (columns) and map sizes (rows), forward and forward+backward."""
    ratios = {'fwd_s': {}, 'fwd_bwd_s': {}}
    for size in SWEEP_SIZES:
        for kernel in SWEEP_KERNELS:
            if kernel > 2 * size - 1:
                continue  # cropped to a kernel already in the row
            t = {impl: measure(impl, args.batch, 64, size, kernel, dtype=args.dtype, device=args.device,
                               repeats=args.repeats, clock=args.clock)[0] for impl in ('native', 'fft')}
            for key in ratios:
                ratios[key][size, kernel] = t['native'][key] / t['fft'][key]
            print(f'H={size} k={kernel}: {t}', file=sys.stderr, flush=True)
    lines = []
    for key, title in (('fwd_s', 'forward (no grad)'), ('fwd_bwd_s', 'forward+backward')):
        lines += [f'{title}: time native / fft (> 1: the FFT is faster), 64 channels, batch {args.batch}',
                  '| H=W | ' + ' | '.join(f'k={k}' for k in SWEEP_KERNELS) + ' |',
                  '|---|' + '---|' * len(SWEEP_KERNELS)]
        for size in SWEEP_SIZES:
            cells = [f'{ratios[key][size, k]:.2f}' if (size, k) in ratios[key] else '-' for k in SWEEP_KERNELS]
            lines.append(f'| {size} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    return '\n'.join(lines)


def model_step(args) -> str:
    """Median forward+backward step time of the model with each conv_impl, alternating step by step."""
    import timm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(args.device, args.dtype)
    y = torch.randint(0, 1000, (args.batch,), generator=gen).to(args.device)
    models = {}
    for impl in ('native', 'auto'):
        torch.manual_seed(0)
        models[impl] = timm.create_model(args.model, conv_impl=impl).to(args.device, args.dtype).train()

    def step(model):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), y).backward()

    times = {impl: [] for impl in models}
    for i in range(args.repeats + 1):
        for impl, model in models.items():
            t = timed(lambda model=model: step(model), 1, args.device, args.clock) if i else step(model)
            if i:
                times[impl].append(t)
                print(f'{impl}: {t:.2f} s', file=sys.stderr, flush=True)
    med = {impl: statistics.median(v) for impl, v in times.items()}
    return (f'{args.model} training step (fwd + cross-entropy + bwd), batch {args.batch}, {args.img_size} px, '
            f'median of {args.repeats}:\n' + '\n'.join(f'  conv_impl={impl:7s} {t:8.2f} s' for impl, t in med.items())
            + f'\n  speed-up of auto over native: {med["native"] / med["auto"]:.1f}x')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', choices=sorted(MODEL_ARGS), default='pelk_t', help='stage shapes of this model')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--repeats', type=int, default=3, help='timed repetitions per measurement (median)')
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads (0: leave the default)')
    parser.add_argument('--clock', choices=['wall', 'cpu'], default='wall')
    parser.add_argument('--sweep', action='store_true', help='native vs fft over kernel and map sizes instead')
    parser.add_argument('--model-step', action='store_true', help='whole-model training step, native vs auto')
    parser.add_argument('--json', type=Path, help='also write the raw rows here')
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, '
          f'clock {args.clock}, {str(args.dtype).removeprefix("torch.")}'
          + (f', GPU {torch.cuda.get_device_name()}' if args.device == 'cuda' else ''))
    if args.sweep:
        print(sweep(args))
        return 0
    if args.model_step:
        print(model_step(args))
        return 0
    rows = stage_rows(args)
    print(f'{args.model} stage shapes at {args.img_size} px (peripheral {CONV_RATIO:.3f} of the channels), '
          f'batch {args.batch}, median of {args.repeats}')
    print(stage_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
