"""Optimizer steps per second of the training loop before and after the host-sync cut, in the same run.

"Before" is the trainer of a base commit (default 81faeca, extracted with ``git archive`` into a temp folder),
"after" is this working tree. Both run ``Trainer.train()`` of a tiny InternImage (channels 16, one block per stage,
32 px) on 2 gloo ranks (``torchrun``), from the same in-memory micro-batches (so no data loading is timed), with
``grad_accum_steps`` micro-batches per step, logging every 5 steps, no checkpoint and no evaluation (on the CPU
unless GPUs are present: then one per rank). The rate is read from the metrics lines' wall-clock times, from the
first log line (after warm-up) to the last. The two trees alternate (before, after, before, after, ...) so that a
change in the machine's load hits both.

    python benchmarks/host_syncs.py                  # supervised and m3i (supervised part), 2 ranks x 1 thread
    python benchmarks/host_syncs.py --rounds 3 --steps 60 --objective m3i
    python benchmarks/host_syncs.py --count          # collectives and host reads per step instead of timing
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = {
    'supervised': {'kind': 'supervised'},
    # every part's weight stated (the later trees require it; the base accepts it)
    'm3i': {'kind': 'm3i', 'supervised': {'weight': 1.0}, 'contrastive': {'weight': 0.0}, 'mim': {'weight': 0.0},
            'fcmae': {'weight': 0.0}},
}


class InMemoryLoader:
    """A fixed list of micro-batches per epoch, with the loader methods the trainer calls."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        pass

    def skip_counts(self) -> dict:
        return {}


def count_syncs() -> dict[str, int]:
    """From now on, count calls of torch.distributed collectives and of tensor reads on the host (``item``,
    ``float()``, ``bool()``, ``int()``, ``tolist``: each a device sync on a GPU), by who asks: our code
    (``pretrain``), DeepSpeed's, or other. Returns the live counter."""
    import torch
    import torch.distributed as dist

    counts: dict[str, int] = {}

    def caller() -> str:
        # the innermost frame in our code or DeepSpeed's says who asked
        frame = sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename
            for who in ('/pretrain/', '/deepspeed/'):
                if who in path:
                    return who.strip('/')
            frame = frame.f_back
        return 'other'

    def wrap(owner, name: str, key: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            k = f'{key} ({caller()})'
            counts[k] = counts.get(k, 0) + 1
            return original(*args, **kwargs)
        setattr(owner, name, counted)

    for name in ('all_reduce', 'all_gather', 'all_gather_object', 'broadcast', 'barrier', 'reduce_scatter_tensor',
                 'all_gather_into_tensor'):
        wrap(dist, name, 'collectives')
    for name in ('item', '__float__', '__bool__', '__int__', 'tolist'):
        wrap(torch.Tensor, name, 'host reads')
    return counts


def worker(tree: str, objective: str, steps: int, accum: int, out_dir: str, count: bool) -> None:
    """One torchrun rank: ``steps`` + 5 optimizer steps of ``Trainer.train()`` from ``tree``'s code; with ``count``,
    rank 0 writes the collectives and host reads per optimizer step of ``train()`` (``counts.json``)."""
    sys.path.insert(0, tree)
    import torch

    from pretrain.config import config_from_dict
    from pretrain.engine.trainer import Trainer

    cfg = config_from_dict({
        'model': {'name': 'internimage_t', 'num_classes': 200, 'drop_path_rate': 0.0,
                  'kwargs': {'channels': 16, 'depths': [1, 1, 1, 1], 'groups': [1, 2, 4, 8]}},
        'objective': OBJECTIVES[objective],
        'data': {'train': [{'name': 'unused', 'urls': 'unused.tar'}], 'img_size': 32},
        'loss': {'mixup_alpha': 0.0, 'cutmix_alpha': 0.0},
        'schedule': {'total_steps': steps + 5, 'warmup_steps': 0, 'lr_scale_by_batch': False},
        'deepspeed': {'zero_stage': 2, 'precision': 'fp32', 'micro_batch_size': 4, 'grad_accum_steps': accum},
        'ema': {'enabled': True},
        'checkpoint': {'resume': 'none', 'interval_steps': 10 ** 9, 'save_at_end': False},
        'logging': {'interval_steps': 5, 'tensorboard': False, 'progress': False},
        'run': {'output_dir': out_dir, 'seed': 0},
    })
    trainer = Trainer(cfg, build_data=False)
    g = torch.Generator().manual_seed(trainer.rank)
    trainer.train_loader = InMemoryLoader([
        {'image': torch.randn(4, 3, 32, 32, generator=g), 'label': torch.randint(0, 200, (4,), generator=g),
         'key': [''] * 4} for _ in range(8 * accum)])
    counts = count_syncs() if count else None
    trainer.train()
    if counts is not None and trainer.rank == 0:
        per_step = {k: v / (steps + 5) for k, v in counts.items()}
        Path(out_dir, 'counts.json').write_text(json.dumps(per_step))


def steps_per_s(metrics_file: Path) -> float:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    rows = [r for r in rows if r.get('split') == 'train']
    first, last = rows[0], rows[-1]
    return (last['step'] - first['step']) / (last['time'] - first['time'])


def run(tree: Path, objective: str, steps: int, accum: int, out_dir: Path, threads: int, count: bool = False) -> float:
    import torch

    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'PYTHONPATH': str(tree), 'PYTHONUNBUFFERED': '1'}
    if not torch.cuda.is_available():
        env['DS_ACCELERATOR'] = 'cpu'  # gloo ranks on the CPU; with GPUs each rank takes one (nccl)
    from pretrain.common.dist import free_port
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(free_port()), str(Path(__file__).resolve()), '--worker', str(tree), objective,
           str(steps), str(accum), str(out_dir), str(int(count))]
    res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f'{tree} {objective}: exit {res.returncode}\n{res.stderr[-4000:]}')
    return steps_per_s(out_dir / 'metrics.jsonl')


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == '--worker':
        tree, objective, steps, accum, out_dir, count = sys.argv[2:8]
        worker(tree, objective, int(steps), int(accum), out_dir, count == '1')
        return
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--base', default='81faeca', help='the commit whose trainer is "before"')
    ap.add_argument('--objective', choices=[*OBJECTIVES, 'both'], default='both')
    ap.add_argument('--steps', type=int, default=40, help='timed optimizer steps per run (after 5 warm-up steps)')
    ap.add_argument('--accum', type=int, default=4, help='micro-batches per optimizer step')
    ap.add_argument('--rounds', type=int, default=2, help='before/after pairs per objective')
    ap.add_argument('--threads', type=int, default=1, help='OMP threads per rank')
    ap.add_argument('--count', action='store_true', help='instead of timing: collectives and host reads per step '
                    '(one run per tree, calls counted on rank 0, logging every 5 steps included)')
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    objectives = list(OBJECTIVES) if args.objective == 'both' else [args.objective]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / 'base'
        base.mkdir()
        archive = subprocess.run(['git', 'archive', args.base], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(['tar', '-x', '-C', str(base)], input=archive, check=True)
        print(f'2 ranks x {args.threads} thread(s), tiny InternImage 32 px, micro-batch 4 x {args.accum}, ZeRO-2 fp32, '
              f'{args.steps} timed steps; before = {args.base}, after = working tree')
        for objective in objectives:
            if args.count:
                for name, tree in (('before', base), ('after', REPO)):
                    out = Path(tmp) / f'{objective}_{name}_count'
                    run(tree, objective, args.steps, args.accum, out, args.threads, count=True)
                    per_step = json.loads((out / 'counts.json').read_text())
                    counted = ', '.join(f'{v:.1f} {k}' for k, v in sorted(per_step.items()))
                    print(f'{objective:>10} {name:>6}: {counted} per optimizer step')
                continue
            rates: dict[str, list[float]] = {'before': [], 'after': []}
            for r in range(args.rounds):
                for name, tree in (('before', base), ('after', REPO)):
                    out = Path(tmp) / f'{objective}_{name}_{r}'
                    rates[name].append(run(tree, objective, args.steps, args.accum, out, args.threads))
            b, a = statistics.median(rates['before']), statistics.median(rates['after'])
            print(f'{objective:>10}: before {b:.2f} steps/s {[round(x, 2) for x in rates["before"]]}, '
                  f'after {a:.2f} steps/s {[round(x, 2) for x in rates["after"]]}, after/before {a / b:.3f}')


if __name__ == '__main__':
    main()
