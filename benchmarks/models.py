"""InternImage-T vs ConvNeXt-T training-step time on CPU, and InternImage-B peak training memory with checkpointing.

Two measurements, one command::

    python benchmarks/models.py [--steps 5] [--threads 1] [--batch 8] [--mem-batch 16] [--core-op DCNv3] [--json]

* ``time``: forward + cross-entropy + backward of ``internimage_t`` (our DCNv3, ``--core-op DCNv3`` = backend 'auto',
  i.e. the fused CPU kernel when it builds; ``DCNv3_pytorch`` = the grid_sample reference, as the official
  pure-PyTorch op) and timm ``convnext_tiny``, both in train mode with drop_path_rate 0.1, batch 8, 224x224, random
  inputs. Steps alternate between the two models in the same process so that load from other processes on a
  shared machine hits both alike; after one warm-up step each, the median and the minimum of ``--steps`` steps are
  reported, and the ratios of both (load from other processes only adds time, so the minimum is the less noisy).
* ``memory``: one forward + backward of ``internimage_b`` at batch 16, 224x224, each configuration (no
  checkpointing; per-block checkpointing) in a fresh subprocess; reports the process peak RSS (``VmHWM``), the RSS
  after building the model, and the growth during the step (activations + gradients + workspace). By default the
  subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed blocks to the system and the
  peak RSS is the peak of live memory; with glibc's dynamic threshold (``--mmap-threshold 0``) freed blocks below
  32 MiB stay in the heap and the peak RSS also counts that fragmentation (it hides most of what checkpointing saves).

``--threads`` (default 1) sets torch's intra-op threads for every measurement: on a shared 2-core machine, two
OpenMP threads competing with other processes make timings much noisier (and slower) than one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import timm  # noqa: E402

import pretrain.models  # noqa: E402,F401  (registers internimage_*)


def _rss_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def _train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return time.perf_counter() - start


def bench_time(steps: int, batch: int, core_op: str) -> dict:
    torch.manual_seed(0)
    models = {
        f'internimage_t ({core_op})': timm.create_model('internimage_t', core_op=core_op, drop_path_rate=0.1),
        'convnext_tiny': timm.create_model('convnext_tiny', drop_path_rate=0.1),
    }
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.train()
        _train_step(model, x, y)  # warm-up: kernel build/load, allocator, oneDNN primitive caches
    for _ in range(steps):
        for name, model in models.items():
            times[name].append(_train_step(model, x, y))
    medians = {name: statistics.median(t) for name, t in times.items()}
    minima = {name: min(t) for name, t in times.items()}
    names = list(models)
    return {
        'batch': batch, 'steps': steps,
        'median_s': medians,
        'min_s': minima,
        'all_s': times,
        'params_m': {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()},
        'ratio_internimage_over_convnext': medians[names[0]] / medians[names[1]],
        'ratio_of_minima': minima[names[0]] / minima[names[1]],
    }


def _memory_child(batch: int, checkpointing: bool, core_op: str) -> dict:
    torch.manual_seed(0)
    model = timm.create_model('internimage_b', core_op=core_op).train()
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    rss_model = _rss_kib('VmRSS')
    seconds = _train_step(model, x, y)
    return {'checkpointing': checkpointing, 'batch': batch, 'rss_after_build_mib': rss_model / 1024,
            'peak_rss_mib': _rss_kib('VmHWM') / 1024, 'step_s': seconds}


def bench_memory(batch: int, threads: int, core_op: str, mmap_threshold: int) -> list[dict]:
    env = dict(os.environ)
    if mmap_threshold > 0:
        env['MALLOC_MMAP_THRESHOLD_'] = str(mmap_threshold)
    rows = []
    for checkpointing in (False, True):
        cmd = [sys.executable, os.path.abspath(__file__), '--memory-child', str(int(checkpointing)),
               '--mem-batch', str(batch), '--threads', str(threads), '--core-op', core_op]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row['step_growth_mib'] = row['peak_rss_mib'] - row['rss_after_build_mib']
        row['malloc_mmap_threshold'] = mmap_threshold or 'glibc default (dynamic)'
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--mem-batch', type=int, default=16)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--core-op', default='DCNv3', choices=['DCNv3', 'DCNv3_pytorch'])
    parser.add_argument('--mmap-threshold', type=int, default=65536,
                        help='MALLOC_MMAP_THRESHOLD_ for the memory subprocesses (0: glibc default)')
    parser.add_argument('--skip-time', action='store_true')
    parser.add_argument('--skip-memory', action='store_true')
    parser.add_argument('--json', action='store_true')
    parser.add_argument('--memory-child', type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_child is not None:
        print(json.dumps(_memory_child(args.mem_batch, bool(args.memory_child), args.core_op)))
        return

    from pretrain.ops import resolve_backend

    result = {
        'machine': {'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(),
                    'torch_threads': args.threads, 'torch': torch.__version__, 'timm': timm.__version__,
                    'dcn_backend': resolve_backend('pytorch' if args.core_op == 'DCNv3_pytorch' else 'auto',
                                                   torch.device('cpu'))},
    }
    if not args.skip_time:
        result['time'] = bench_time(args.steps, args.batch, args.core_op)
    if not args.skip_memory:
        result['memory'] = bench_memory(args.mem_batch, args.threads, args.core_op, args.mmap_threshold)

    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}")
    if 'time' in result:
        t = result['time']
        print(f"\nfwd+bwd step, CPU, batch {t['batch']}, 224x224, {t['steps']} alternating steps:")
        for name, s in t['median_s'].items():
            print(f'  {name:28s} median {s:7.3f} s   min {t["min_s"][name]:7.3f} s   '
                  f'({t["params_m"][name]:.1f}M params)')
        print(f"  ratio InternImage-T / ConvNeXt-T: {t['ratio_internimage_over_convnext']:.2f} (medians), "
              f"{t['ratio_of_minima']:.2f} (minima)")
    if 'memory' in result:
        rows = result['memory']
        print(f'\nInternImage-B fwd+bwd, batch {rows[0]["batch"]}, 224x224, one subprocess per row, '
              f'MALLOC_MMAP_THRESHOLD_={rows[0]["malloc_mmap_threshold"]}:')
        for r in rows:
            print(f"  checkpointing={str(r['checkpointing']):5s}  peak RSS {r['peak_rss_mib']:8.0f} MiB   "
                  f"after build {r['rss_after_build_mib']:6.0f} MiB   growth in step {r['step_growth_mib']:8.0f} MiB"
                  f"   step {r['step_s']:.1f} s")
        print(f"  peak RSS ratio (no ckpt / ckpt): {rows[0]['peak_rss_mib'] / rows[1]['peak_rss_mib']:.2f}; "
              f"step growth ratio: {rows[0]['step_growth_mib'] / rows[1]['step_growth_mib']:.2f}")


if __name__ == '__main__':
    main()
