"""Convergence on a known data set: Fashion-MNIST top-1 of a small InternImage against a ConvNeXt of its size.

Each model is trained from scratch through the real engine (``torchrun --nproc_per_node 2 -m pretrain train``:
2 CPU ranks with gloo, ZeRO-2, bf16, EMA, one intra-op thread and one loader worker per rank) on the 60,000
training images and evaluated on the 10,000 test images, with the same recipe and budget (the two stage configs
differ only in ``model``). Per model it reports the parameter count, the wall time of the whole training command
(start-up, training, the evaluations, the final checkpoint), the final top-1 of the raw and the EMA weights, and the
machine's load average before and after (the timings are only comparable on an otherwise idle machine).

    python benchmarks/convergence.py                               # the 15-minute budget (configs as shipped)
    python benchmarks/convergence.py --tag long40-64px --epochs 40 --only internimage data.img_size=64 \
        data.scale_min=0.7 run.eval_interval_steps=1170 checkpoint.interval_steps=1170
                                                                   # the longer run of 2026-12-07 (93.9%)
    python benchmarks/convergence.py --epochs 0.2 --only internimage   # a short probe
    python benchmarks/convergence.py --fit ...                     # then: top-1 on the training images
    python benchmarks/convergence.py --tag budget15 --fit-only     # the same for runs already trained

``--fit`` adds, after the last training command (outside every wall time), the top-1 of each final checkpoint's
raw and EMA weights on all 60,000 training images and on the 10,000 test images, without augmentation (the eval
transform), both in fp32 in one process: how well the model fits what it trained on, which beside the test top-1
tells underfitting (both low and close) from overfitting (a wide gap). Written to ``convergence-<tag>-fit.json``.

Writes the shards first when they are missing (``python -m data_pipelines write idx``, under runs/fashion_mnist),
and a JSON record of every result to ``runs/fashion_mnist/convergence-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / 'runs' / 'fashion_mnist'
CONFIGS = {'internimage': 'configs/stage/fashion_mnist_internimage.yaml',
           'convnext': 'configs/stage/fashion_mnist_convnext.yaml'}


def load_average() -> float:
    """The 1-minute load average (``uptime``'s first figure)."""
    return os.getloadavg()[0]


def train(name: str, config: str, overrides: list[str], out_dir: Path, log: Path) -> dict:
    """Run one training command; returns {model, wall_s, top1_raw, top1_ema, steps, params, load_before/after}."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '-m', 'pretrain', 'train', config,
           f'run.output_dir={out_dir}', *overrides]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    load_before = load_average()
    cpu_before = _children_cpu_s()
    t0 = time.perf_counter()
    with open(log, 'w') as f:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall_s = time.perf_counter() - t0
    cpu_s = _children_cpu_s() - cpu_before
    if code != 0:
        raise SystemExit(f'{name}: training failed (exit {code}); log: {log}')
    summary = json.loads((out_dir / 'summary.json').read_text())
    evaluation = summary['eval']
    return {'model': name, 'config': config, 'command': ' '.join(cmd[1:]), 'wall_s': round(wall_s, 1),
            'cpu_s': round(cpu_s, 1),
            'steps': summary['step'], 'samples_seen': summary['samples_seen'],
            'top1_raw': evaluation['raw']['top1'], 'top1_ema': evaluation.get('ema', {}).get('top1'),
            'params': count_params(config), 'load_before': load_before, 'load_after': load_average()}


def top1_on_shards(out_dir: Path, shards: dict[str, Path]) -> dict:
    """{set: {'raw': top-1 (%), 'ema': top-1 or None}} of the run's last checkpoint on every sample of each shard
    folder in ``shards`` ({set name: folder with a manifest}), with the run's eval transform (no augmentation), fp32
    weights and inputs, in this process. ``ema`` is None for a run without EMA weights."""
    from pretrain.demo import classify_shards
    from pretrain.export import consolidate
    from pretrain.models import create_backbone

    top1 = {name: {'raw': None, 'ema': None} for name in shards}
    raw, meta = consolidate(out_dir, 'raw')
    states = {'raw': raw, **({'ema': consolidate(out_dir, 'ema')[0]} if meta.config['ema']['enabled'] else {})}
    model = create_backbone(meta.model, num_classes=meta.num_classes, **meta.model_kwargs)
    data = meta.config['data']
    for weights, state in states.items():
        model.load_state_dict(state)
        for name, folder in shards.items():
            top1[name][weights] = classify_shards(model, folder, data['img_size'], data['eval_crop_pct'],
                                                  data['interpolation'])
    return top1


def fit(names: list[str], run_root: Path) -> list[dict]:
    """Per model under ``run_root``: top-1 of its last checkpoint on the 60k training and the 10k test images, both
    through :func:`top1_on_shards` (so the two columns differ only in the images; the engine's own test figures
    are bf16 here). A run that cannot be read is reported and skipped."""
    rows = []
    for name in names:
        try:
            rows.append({'model': name, **top1_on_shards(run_root / name, {'train': DATA / 'train',
                                                                            'test': DATA / 'test'})})
        except Exception as e:  # noqa: BLE001 - report the run and go on with the next
            print(f'{name}: --fit failed on {run_root / name}: {type(e).__name__}: {e}', flush=True)
    print('\n| model | weights | train top-1 (60k, no aug.) | test top-1 (10k) | gap |')
    print('|---|---|---|---|---|')
    for r in rows:
        for weights in ('raw', 'ema'):
            if r['train'][weights] is not None:
                print(f"| {r['model']} | {weights} | {r['train'][weights]:.2f} | {r['test'][weights]:.2f} | "
                      f"{r['train'][weights] - r['test'][weights]:.2f} |")
    return rows


def _children_cpu_s() -> float:
    # CPU seconds of finished child processes (ranks and loader workers): on a shared machine, wall time grows with
    # the other jobs' load, CPU time much less; an idle 2-core machine needs about cpu_s / 2 of wall time.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def count_params(config: str) -> int:
    """Parameters of the config's model (built on the CPU, as in training)."""
    import timm

    import pretrain.models  # noqa: F401  (registers InternImage with timm)
    from pretrain.config import load_config

    model_cfg = load_config(str(REPO / config)).model
    model = timm.create_model(model_cfg.name, num_classes=model_cfg.num_classes, **model_cfg.kwargs)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=float, default=None, help='override schedule.epochs of both configs')
    parser.add_argument('--only', choices=sorted(CONFIGS), action='append', help='run only this model (repeatable)')
    parser.add_argument('--tag', help='output folder suffix (default: the time)')
    parser.add_argument('--fit', action='store_true',
                        help='after training, evaluate each final checkpoint on the training and the test images')
    parser.add_argument('--fit-only', action='store_true',
                        help='no training: --fit on the runs already under runs/fashion_mnist/convergence-TAG')
    parser.add_argument('overrides', nargs='*', help='key.sub=value, applied to both configs')
    args = parser.parse_args(argv)
    if args.tag is None:
        if args.fit_only:
            parser.error('--fit-only evaluates runs already trained: name them with --tag')
        args.tag = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
    from pretrain.demo import fashion_mnist_jobs, write_verified_shards

    os.chdir(REPO)
    write_verified_shards(fashion_mnist_jobs(), DATA)  # the shards named by both configs (written once)
    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f'schedule.epochs={args.epochs}')
    names = args.only or list(CONFIGS)
    run_root = DATA / f'convergence-{args.tag}'
    if not args.fit_only:
        train_all(names, overrides, run_root, DATA / f'convergence-{args.tag}.json')
    if args.fit or args.fit_only:  # after every training, so that no evaluation runs beside a timed one
        rows = fit(names, run_root)
        (DATA / f'convergence-{args.tag}-fit.json').write_text(json.dumps(rows, indent=1))
        return 0 if len(rows) == len(names) else 1
    return 0


def train_all(names: list[str], overrides: list[str], run_root: Path, record: Path) -> None:
    """Train each model under ``run_root``, one after the other; write the JSON ``record`` and print the table."""
    results = []
    for name in names:
        out_dir = run_root / name
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        result = train(name, CONFIGS[name], overrides, out_dir, out_dir.parent / f'{name}.log')
        results.append(result)
        print(json.dumps(result), flush=True)
    record.write_text(json.dumps({'overrides': overrides, 'cpus': os.cpu_count(), 'results': results}, indent=1))
    print('\n| model | params | steps | wall (s) | CPU (s) | top-1 raw | top-1 EMA | load before/after |')
    print('|---|---|---|---|---|---|---|---|')
    for r in results:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
              f"{r['top1_raw']:.2f} | "
              f"{r['top1_ema'] if r['top1_ema'] is None else round(r['top1_ema'], 2)} | "
              f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    print(f'record: {record}')


if __name__ == '__main__':
    sys.exit(main())
