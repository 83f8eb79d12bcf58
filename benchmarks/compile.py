"""torch.compile against eager: InternImage-T and ConvNeXt-T training steps on this machine, and the compile time.

    python benchmarks/compile.py [--steps 5] [--batch 8] [--img-size 224] [--threads 1] [--models ...] [--json]
                                 [--device cuda] [--precision bf16] [--json-file ROWS.json]
    python benchmarks/compile.py --dry-run     # no compile: arguments checked, models built on the meta device

On a GPU (``--device cuda``, as ``make gpu-check``'s ``compile`` part runs it) the step runs under bf16 autocast
with ``--precision bf16`` (as benchmarks/gpu_train.py's throughput rows; the engine's DeepSpeed bf16 keeps bf16
weights instead) and is timed to a ``torch.cuda.synchronize()``. ``--json-file`` writes the rows after each model
(to a temporary file, then renamed), so a run cut short keeps what it measured.

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
from pathlib import Path

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import timm  # noqa: E402

import pretrain.models  # noqa: E402,F401  (registers internimage_*)


def load_average() -> str:
    with open('/proc/loadavg') as f:
        return ' '.join(f.read().split()[:3])


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          precision: str = 'fp32') -> float:
    """One training step; its wall-clock seconds (to a device synchronize on a GPU)."""
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if x.device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_model(name: str, steps: int, batch: int, img_size: int, device: str = 'cpu',
                precision: str = 'fp32') -> dict:
    """Eager and compiled step times and the compile time of model ``name`` (seconds)."""
    torch.manual_seed(0)
    eager = timm.create_model(name, drop_path_rate=0.1).train().to(device)
    compiled = timm.create_model(name, drop_path_rate=0.1).train().to(device)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (eager, compiled)}
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    _step(eager, opts[eager], x, y, precision)  # warm-up: kernel load, allocator, oneDNN / cuDNN choices
    eager_first = _step(eager, opts[eager], x, y, precision)
    first_compiled = _step(compiled, opts[compiled], x, y, precision)
    times: dict[str, list[float]] = {'eager': [], 'compiled': []}
    for _ in range(steps):
        times['eager'].append(_step(eager, opts[eager], x, y, precision))
        times['compiled'].append(_step(compiled, opts[compiled], x, y, precision))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {'model': name, 'device': device, 'precision': precision, 'batch': batch,
            'params_m': round(sum(p.numel() for p in eager.parameters()) / 1e6, 1),
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
    ap.add_argument('--json-file', type=Path, default=None, help='also write the rows here after each model')
    ap.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    ap.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32',
                    help='bf16: autocast over fp32 weights, as benchmarks/gpu_train.py times the GPU step')
    ap.add_argument('--dry-run', action='store_true', help='build the models on the meta device, compile nothing')
    args = ap.parse_args(argv)
    if args.dry_run:
        with torch.device('meta'):
            sizes = {name: sum(p.numel() for p in timm.create_model(name).parameters()) for name in args.models}
        print('compile.py dry run: ' + ', '.join(f'{n} {v / 1e6:.1f}M parameters' for n, v in sizes.items()))
        return 0
    if args.device == 'cuda' and not torch.cuda.is_available():
        ap.error('--device cuda: no CUDA device here')
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config
    inductor_config.force_disable_caches = True  # the cold compile a fresh run pays
    inductor_config.compile_threads = args.threads
    header = {'utc': time.strftime('%Y-%m-%d %H:%M', time.gmtime()), 'torch': torch.__version__,
              'cpu': platform.processor() or platform.machine(), 'threads': args.threads, 'batch': args.batch,
              'img_size': args.img_size, 'device': args.device, 'precision': args.precision,
              'gpu': torch.cuda.get_device_name(0) if args.device == 'cuda' else None, 'load_before': load_average()}
    rows = []

    def save() -> None:  # whole or not at all: a run killed mid-write leaves the previous file
        if args.json_file:
            tmp = args.json_file.with_name(args.json_file.name + '.tmp')
            tmp.write_text(json.dumps({**header, 'rows': rows}, indent=1))
            os.replace(tmp, args.json_file)

    for name in args.models:
        rows.append(bench_model(name, args.steps, args.batch, args.img_size, args.device, args.precision))
        save()
    header['load_after'] = load_average()
    save()
    if args.json:
        print(json.dumps({**header, 'rows': rows}, indent=1))
        return 0
    where = header['gpu'] or f'{args.threads} thread(s)'
    print(f'# {header["utc"]} UTC, torch {header["torch"]}, {where}, {args.precision}, batch {args.batch}, '
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
