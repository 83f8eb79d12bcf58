"""Convolution weight gradients on small maps: oneDNN's against the tap-by-tap one (``pretrain.ops.tapconv``).

Two parts, each alternating the two variants call by call in one process (so that load from other processes hits
both alike), with the thread count:

* ``layers``: every ``nn.Conv2d`` of the Fashion-MNIST convergence models (``benchmarks/convergence.py``) and the
  demo's pretraining model at their micro-batch and image size, forward + backward of that layer alone on its real
  input shape: ``F.conv2d`` (oneDNN for all three parts) against ``_TapConv2d`` (oneDNN forward and input gradient,
  the weight gradient tap by tap), whatever :func:`pretrain.ops.tapconv.use_taps` would choose, and the column
  ``rule`` saying what it chooses: the table that sets the rule;
* ``steps``: forward + cross-entropy + backward of each whole model, its convolutions made the trainer's
  (``align_convolutions``), with ``tapconv.ENABLED`` on and off, in fp32 and in bf16 as the engine runs it on this
  CPU (``deepspeed.cpu_bf16_products: auto``).

Reports medians (and minima) of ``--steps`` timed calls after ``--warmup``::

    python benchmarks/small_conv.py [--part layers|steps] [--steps 20] [--threads 1] [--json-file F]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.convergence import CONFIGS  # noqa: E402
from benchmarks.cpu_bf16 import build, timed_step  # noqa: E402
from pretrain.engine.cpu_bf16 import Fp32Products, cpu_has_bf16_instructions, use_fp32_products  # noqa: E402
from pretrain.ops import tapconv  # noqa: E402
from pretrain.ops.modules import align_convolutions  # noqa: E402

MODELS = {**CONFIGS, 'demo-pretrain': 'configs/stage/demo_pretrain.yaml'}


def _median_min(values: list[float]) -> dict:
    return {'median': round(statistics.median(values), 3), 'min': round(min(values), 3)}


def conv_inputs(model: torch.nn.Module, batch: int, size: int) -> list[tuple[str, torch.nn.Conv2d, torch.Size]]:
    """(name, conv, input shape) of every ``nn.Conv2d`` the model's forward calls on a ``batch x 3 x size x size``
    image batch (the image tower only, for the demo's multi-objective model)."""
    seen: list[tuple[str, torch.nn.Conv2d, torch.Size]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.append((name, m, a[0].shape)))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    backbone = getattr(model, 'backbone', model)
    with torch.no_grad():
        backbone(torch.randn(batch, 3, size, size))
    for h in hooks:
        h.remove()
    return seen


def time_layers(name: str, steps: int, warmup: int) -> list[dict]:
    model, batch, size = build(MODELS[name])
    rows = []
    for layer, conv, shape in conv_inputs(model, batch, size):
        if isinstance(conv.padding, str) or conv.dilation != (1, 1):
            continue  # not a case for the taps (pretrain.ops.tapconv.use_taps), none in these models
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = conv.weight.detach().clone().requires_grad_()
        b = None if conv.bias is None else conv.bias.detach().clone().requires_grad_()
        args = (conv.stride, conv.padding, conv.groups)
        grad = torch.randn_like(F.conv2d(x, w, b, conv.stride, conv.padding, 1, conv.groups))
        variants = {'onednn': functools.partial(F.conv2d, x, w, b, args[0], args[1], 1, args[2]),
                    'taps': functools.partial(tapconv._TapConv2d.apply, x, w, b, *args)}
        dense_or_dw = tapconv.dense_or_depthwise(conv.in_channels, w.shape, conv.groups)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(warmup + steps):
            for key, fn in variants.items():
                if key == 'taps' and not dense_or_dw:
                    continue
                x.grad = w.grad = None
                if b is not None:
                    b.grad = None
                t0 = time.perf_counter()
                fn().backward(grad)
                if i >= warmup:
                    times[key].append((time.perf_counter() - t0) * 1e3)
        rows.append({'model': name, 'layer': layer, 'input': list(shape), 'out_channels': conv.out_channels,
                     'kernel': list(conv.kernel_size), 'stride': list(conv.stride), 'groups': conv.groups,
                     'rule': 'taps' if tapconv.use_taps(x, w, conv.stride, conv.padding, conv.dilation, conv.groups)
                     else 'onednn',
                     'ms': {k: _median_min(v) for k, v in times.items() if v}})
    return rows


def time_steps(name: str, steps: int, warmup: int) -> list[dict]:
    model32, batch, size = build(MODELS[name])
    if hasattr(model32, 'backbone'):  # the demo's multi-objective model: its backbone with a linear head
        return []
    model16 = build(MODELS[name])[0].bfloat16()
    for m in (model32, model16):
        align_convolutions(m)
    products = use_fp32_products('auto', device=torch.device('cpu'), dtype=torch.bfloat16)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    runs = {(precision, enabled): (model, dtype, Fp32Products if products and dtype == torch.bfloat16
                                   else contextlib.nullcontext)
            for precision, model, dtype in (('fp32', model32, torch.float32), ('bf16', model16, torch.bfloat16))
            for enabled in (False, True)}
    times: dict = {k: [] for k in runs}
    try:
        for i in range(warmup + steps):
            for (precision, enabled), (model, dtype, mode) in runs.items():
                tapconv.ENABLED = enabled
                ms = timed_step(model, x, y, dtype, mode)
                if i >= warmup:
                    times[(precision, enabled)].append(ms)
    finally:
        tapconv.ENABLED = True
    rows = []
    for precision in ('fp32', 'bf16'):
        off, on = times[(precision, False)], times[(precision, True)]
        rows.append({'model': name, 'precision': precision, 'bf16_fp32_products': products, 'micro_batch': batch,
                     'img_size': size, 'ms_per_step': {'onednn': _median_min(off), 'taps': _median_min(on)},
                     'speedup': round(statistics.median(off) / statistics.median(on), 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--part', choices=('layers', 'steps'), action='append', help='default: both')
    parser.add_argument('--only', choices=sorted(MODELS), action='append', help='only this model (repeatable)')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    parser.add_argument('--json-file', help='also write the results here')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.part or ['layers', 'steps']
    names = args.only or list(MODELS)
    load_before = os.getloadavg()[0]
    out: dict = {'threads': args.threads, 'bf16_instructions': cpu_has_bf16_instructions(), 'torch': torch.__version__}
    if 'layers' in parts:
        out['layers'] = [row for name in names for row in time_layers(name, args.steps, args.warmup)]
    if 'steps' in parts:
        out['steps'] = [row for name in names for row in time_steps(name, args.steps, args.warmup)]
    out['load_average'] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"threads {args.threads}; torch {torch.__version__}; CPU with bf16 instructions: "
          f"{out['bf16_instructions']}; load average {out['load_average'][0]} before, {out['load_average'][1]} after")
    if 'layers' in out:
        print('\n| model | layer | input (N, C, H, W) | out | k / s / groups | rule | oneDNN ms (median, min) '
              '| taps ms (median, min) | oneDNN / taps |')
        print('|---|---|---|---|---|---|---|---|---|')
        for r in out['layers']:
            ms = r['ms']
            taps = f"{ms['taps']['median']:.2f}, {ms['taps']['min']:.2f}" if 'taps' in ms else '-'
            ratio = f"{ms['onednn']['median'] / ms['taps']['median']:.1f}x" if 'taps' in ms else '-'
            print(f"| {r['model']} | {r['layer']} | {tuple(r['input'])} | {r['out_channels']} | "
                  f"{r['kernel'][0]} / {r['stride'][0]} / {r['groups']} | {r['rule']} | "
                  f"{ms['onednn']['median']:.2f}, {ms['onednn']['min']:.2f} | {taps} | {ratio} |")
    if 'steps' in out:
        print('\n| model | precision | batch x px | oneDNN ms/step (median, min) | with taps (median, min) | speedup |')
        print('|---|---|---|---|---|---|')
        for r in out['steps']:
            a, b = r['ms_per_step']['onednn'], r['ms_per_step']['taps']
            precision = r['precision'] + (' (fp32 products)' if r['precision'] == 'bf16' and r['bf16_fp32_products']
                                          else '')
            print(f"| {r['model']} | {precision} | {r['micro_batch']} x {r['img_size']} | {a['median']:.1f}, "
                  f"{a['min']:.1f} | {b['median']:.1f}, {b['min']:.1f} | {r['speedup']:.2f}x |")
    if args.json_file:
        with open(args.json_file, 'w') as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
