"""torch.compile against eager: InternImage-T and ConvNeXt-T training steps on this machine, and the compile time.

    python benchmarks/compile.py [--steps 5] [--batch 8] [--img-size 224] [--threads 1] [--models ...] [--json]

For each model (default ``internimage_t``, DCNv3 backend 'auto' = the fused kernel on the CPU, and timm's
``convnext_tiny``), two copies with the same weights: one eager, one compiled in place as the engine does with
``run.compile: true`` (``nn.Module.compile()``, inductor, default mode). A training step is zero_grad + forward +
cross-entropy + backward + AdamW step, train mode, drop_path_rate 0.1, random inputs.

* compile time: the compiled copy's first step (dynamo trace, AOT autograd, inductor code generation and C++ builds
  of the forward and backward) minus one eager step, with inductor's on-disk caches off, so it is the cold cost a
  fresh run pays once per process (and again for evaluation mode, not measured here);
* step time: after that, eager and compiled steps alternate in the same process (load from other processes hits
  both alike), ``--steps`` each; median and minimum, and the compiled/eager ratio of both.

The machine's load average (``/proc/loadavg``) is printed before and after, since the CPUs may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import timm  # noqa: E402

import pretrain.models  # noqa: E402,F401  (registers internimage_*)


def load_average() -> str:
    with open('/proc/loadavg') as f:
        return ' '.join(f.read().split()[:3])


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One training step; its wall-clock seconds."""
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def bench_model(name: str, steps: int, batch: int, img_size: int) -> dict:
    """Eager and compiled step times and the compile time of model ``name`` (seconds)."""
    torch.manual_seed(0)
    eager = timm.create_model(name, drop_path_rate=0.1).train()
    compiled = timm.create_model(name, drop_path_rate=0.1).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (eager, compiled)}
    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, 1000, (batch,))
    _step(eager, opts[eager], x, y)  # warm-up: kernel load, allocator, oneDNN primitive caches
    eager_first = _step(eager, opts[eager], x, y)
    first_compiled = _step(compiled, opts[compiled], x, y)
    times: dict[str, list[float]] = {'eager': [], 'compiled': []}
    for _ in range(steps):
        times['eager'].append(_step(eager, opts[eager], x, y))
        times['compiled'].append(_step(compiled, opts[compiled], x, y))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {'model': name, 'params_m': round(sum(p.numel() for p in eager.parameters()) / 1e6, 1),
            'compile_s': first_compiled - eager_first, 'first_compiled_step_s': first_compiled,
            'median_s': med, 'min_s': low, 'steps_s': times,
            'ratio_median': med['compiled'] / med['eager'], 'ratio_min': low['compiled'] / low['eager']}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--steps', type=int, default=5, help='timed steps per variant, after the first')
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--img-size', type=int, default=224)
    ap.add_argument('--threads', type=int, default=1, help='torch intra-op threads (and inductor\'s compile workers)')
    ap.add_argument('--models', nargs='+', default=['internimage_t', 'convnext_tiny'])
    ap.add_argument('--json', action='store_true', help='print the result as JSON instead of a table')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config
    inductor_config.force_disable_caches = True  # the cold compile a fresh run pays
    inductor_config.compile_threads = args.threads
    header = {'utc': time.strftime('%Y-%m-%d %H:%M', time.gmtime()), 'torch': torch.__version__,
              'cpu': platform.processor() or platform.machine(), 'threads': args.threads, 'batch': args.batch,
              'img_size': args.img_size, 'load_before': load_average()}
    rows = [bench_model(name, args.steps, args.batch, args.img_size) for name in args.models]
    header['load_after'] = load_average()
    if args.json:
        print(json.dumps({**header, 'rows': rows}, indent=1))
        return 0
    print(f'# {header["utc"]} UTC, torch {header["torch"]}, {args.threads} thread(s), batch {args.batch}, '
          f'{args.img_size}x{args.img_size}, train step = fwd + CE + bwd + AdamW; load average '
          f'{header["load_before"]} before, {header["load_after"]} after')
    print('| model | eager median s (min) | compiled median s (min) | compiled/eager median (min) | compile s |')
    print('|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["model"]} | {r["median_s"]["eager"]:.3f} ({r["min_s"]["eager"]:.3f}) | '
              f'{r["median_s"]["compiled"]:.3f} ({r["min_s"]["compiled"]:.3f}) | '
              f'{r["ratio_median"]:.2f} ({r["ratio_min"]:.2f}) | {r["compile_s"]:.0f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
