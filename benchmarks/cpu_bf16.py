"""bf16 training steps on a CPU: native bf16 kernels against fp32 products (``deepspeed.cpu_bf16_products``).

For each model of the Fashion-MNIST convergence configs (``benchmarks/convergence.py``), one forward + cross-entropy
+ backward at the config's micro-batch and image size, in three settings, alternating step by step in one process
so that load from other processes hits all alike:

* ``fp32``: the model in fp32 (the reference);
* ``bf16 native``: the model cast to bf16 as DeepSpeed's bf16 mode does, ATen/oneDNN bf16 kernels;
* ``bf16 fp32-products``: the same bf16 model under :class:`pretrain.engine.cpu_bf16.Fp32Products` (what the
  engine runs on a CPU without AVX512-BF16/AMX, ``deepspeed.cpu_bf16_products=auto``).

Reports the median and minimum wall-clock ms per image of ``--steps`` steps after ``--warmup``, and the ratios
against native bf16, with the thread count::

    python benchmarks/cpu_bf16.py [--steps 10] [--threads 1] [--json-file F]
"""
from __future__ import annotations

import argparse
import contextlib
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
from pretrain.engine.cpu_bf16 import Fp32Products, cpu_has_bf16_instructions  # noqa: E402

SETTINGS = ('fp32', 'bf16 native', 'bf16 fp32-products')


def build(config: str):
    """(model, micro_batch, img_size) of a stage config, as training builds it (before DeepSpeed's cast)."""
    from pretrain.config import load_config
    from pretrain.objectives import build_model

    cfg = load_config(os.path.join(REPO, config))
    torch.manual_seed(0)
    return build_model(cfg), cfg.deepspeed.micro_batch_size, cfg.data.img_size


def timed_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, mode) -> float:
    """Wall-clock ms of one forward (``x`` cast to ``dtype``, under the context ``mode()``) + cross-entropy +
    backward of ``model`` (gradients cleared first)."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with mode():
        loss = F.cross_entropy(model(x.to(dtype)).float(), y)
    loss.backward()
    return (time.perf_counter() - t0) * 1e3


def time_model(config: str, steps: int, warmup: int) -> dict:
    model32, batch, size = build(config)
    model16 = build(config)[0].bfloat16()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    runs = {'fp32': (model32, torch.float32, contextlib.nullcontext),
            'bf16 native': (model16, torch.bfloat16, contextlib.nullcontext),
            'bf16 fp32-products': (model16, torch.bfloat16, Fp32Products)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + steps):
        for name, (model, dtype, mode) in runs.items():
            ms = timed_step(model, x, y, dtype, mode)
            if i >= warmup:
                times[name].append(ms / batch)
    native = statistics.median(times['bf16 native'])
    return {'config': config, 'micro_batch': batch, 'img_size': size,
            'params': sum(p.numel() for p in model32.parameters()),
            'ms_per_image': {k: {'median': round(statistics.median(v), 3), 'min': round(min(v), 3)}
                             for k, v in times.items()},
            'speedup_vs_native_bf16': {k: round(native / statistics.median(v), 2) for k, v in times.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    parser.add_argument('--only', choices=sorted(CONFIGS), action='append', help='only this model (repeatable)')
    parser.add_argument('--json-file', help='also write the results here')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    results = [time_model(CONFIGS[name], args.steps, args.warmup) for name in args.only or list(CONFIGS)]
    print(f'threads {args.threads}; CPU with bf16 instructions: {cpu_has_bf16_instructions()}; '
          f'load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after')
    print('| config | params | batch x px | ' + ' | '.join(f'{s} ms/img (median, min)' for s in SETTINGS)
          + ' | fp32-products vs native |')
    print('|---|---|---|' + '---|' * (len(SETTINGS) + 1))
    for r in results:
        cells = ' | '.join(f"{r['ms_per_image'][s]['median']:.2f}, {r['ms_per_image'][s]['min']:.2f}"
                           for s in SETTINGS)
        print(f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['micro_batch']} x {r['img_size']} | {cells} | "
              f"{r['speedup_vs_native_bf16']['bf16 fp32-products']:.2f}x |")
    if args.json_file:
        with open(args.json_file, 'w') as f:
            json.dump({'threads': args.threads, 'bf16_instructions': cpu_has_bf16_instructions(),
                       'results': results}, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
