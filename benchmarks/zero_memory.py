"""Per-rank model-state memory for ZeRO 0/1/2/3 with 2 CPU ranks, measured and compared with `python -m pretrain plan`.

    python benchmarks/zero_memory.py [--model internimage_t] [--precision bf16] [--world-size 2] [--stages 0,1,2,3,3i]

Launches itself under torchrun once per stage. Each rank builds the model and the DeepSpeed engine through the
trainer (same config path as training) and takes one optimizer step on a 2-image 32 px batch (so Adam's states
exist). After a second forward and backward, before that step, it measures the **live tensor bytes** it holds: every
tensor reachable by the garbage collector, deduplicated by storage (flat ZeRO buffers and their views count once).
The resident set size is printed for reference, and the plan's model-state figure (parameters + gradients +
optimizer, no EMA) beside the measurement.

Stage ``3i`` is ZeRO-3 with ``deepspeed.zero_init`` (the model built partitioned, pretrain/engine/zero_init.py). For
it the columns that matter are the peak resident set size of each rank (the construction peak: the plain build holds
the whole fp32 model on every rank) and the seconds the Trainer took to build.

Measured values here are CPU numbers: DeepSpeed's communication buckets are sized by ``deepspeed.bucket_size``; they
are set small (``--bucket-size``) so they do not hide the model states of a 30M-parameter model.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def live_tensor_bytes() -> int:
    import torch
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj) or obj.device.type == 'meta':
                continue
            storage = obj.untyped_storage()
        except (RuntimeError, ReferenceError):  # some tensor subclasses / freed proxies
            continue
        key = storage.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def worker(args) -> None:
    import resource
    import time

    import torch

    from pretrain.config import config_from_dict
    from pretrain.engine.trainer import Trainer

    torch.set_num_threads(1)
    cfg = config_from_dict({
        'model': {'name': args.model, 'num_classes': 1000, 'drop_path_rate': 0.0},
        'data': {'train': [{'name': 'unused', 'urls': 'unused.tar'}], 'img_size': 32},
        'schedule': {'total_steps': 10},
        'deepspeed': {'zero_stage': args.stage, 'precision': args.precision, 'micro_batch_size': 2,
                      'bucket_size': args.bucket_size, 'stage3_param_persistence_threshold': 0,
                      'zero_init': args.zero_init},
        'checkpoint': {'resume': 'none'},
        'logging': {'tensorboard': False, 'progress': False},
        'run': {'output_dir': args.out_dir},
    })
    # The model as built, before DeepSpeed takes it: measured where the Trainer calls deepspeed.initialize.
    import deepspeed
    built, initialize, start = {}, deepspeed.initialize, time.perf_counter()

    def measured_initialize(*a, **kw):
        built.update(build_seconds=time.perf_counter() - start, built_live_bytes=live_tensor_bytes(),
                     build_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return initialize(*a, **kw)

    deepspeed.initialize = measured_initialize
    trainer = Trainer(cfg, build_data=False)
    deepspeed.initialize = initialize
    x = torch.randn(2, 3, 32, 32).to(trainer.dtype)
    y = torch.zeros(2, dtype=torch.long)
    batch = {'image': x, 'label': y, 'key': ['a', 'b']}
    trainer.train_step(lambda: batch)  # the first step creates Adam's states
    # Peak of model states: parameters + optimizer states + gradients, i.e. after the backward, before the step.
    loss, _ = trainer.objective.loss(batch, 1, 0)
    trainer.engine.backward(loss)
    del loss
    measured = live_tensor_bytes() - x.numel() * x.element_size() - y.numel() * y.element_size()
    trainer.engine.step()
    rank = trainer.rank
    num_params = sum(int(getattr(p, 'ds_numel', p.numel())) for p in trainer.engine.module.parameters())
    out = {'stage': args.stage, 'rank': rank, 'live_tensor_bytes': measured, 'rss_bytes': rss_bytes(),
           'params': num_params, **built}
    with open(os.path.join(args.out_dir, f'stage{_name(args.stage, args.zero_init)}_rank{rank}.json'), 'w') as f:
        json.dump(out, f)


def _name(stage: int, zero_init: bool) -> str:
    return f'{stage}i' if zero_init else str(stage)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='internimage_t')
    parser.add_argument('--precision', default='bf16', choices=['bf16', 'fp32'])
    parser.add_argument('--world-size', type=int, default=2)
    parser.add_argument('--stages', default='0,1,2,3')
    parser.add_argument('--bucket-size', type=int, default=2_000_000)
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--stage', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--zero-init', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--out-dir', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    from pretrain.engine.plan import GiB, model_state_bytes

    out_dir = args.out_dir or tempfile.mkdtemp(prefix='zero_memory_')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    from pretrain.common.dist import free_port

    rows = []
    for token in args.stages.split(','):
        stage, zero_init = int(token.rstrip('i')), token.endswith('i')
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(args.world_size),
               '--master_port', str(free_port()), __file__, '--worker', '--stage', str(stage), '--model',
               args.model, '--precision', args.precision, '--bucket-size', str(args.bucket_size), '--out-dir',
               out_dir, *(['--zero-init'] if zero_init else [])]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if res.returncode != 0:
            print(res.stdout[-3000:], res.stderr[-3000:], file=sys.stderr)
            return 1
        per_rank = [json.loads(Path(out_dir, f'stage{_name(stage, zero_init)}_rank{r}.json').read_text())
                    for r in range(args.world_size)]
        measured = max(r['live_tensor_bytes'] for r in per_rank)
        planned = model_state_bytes(per_rank[0]['params'], stage=stage, world_size=args.world_size,
                                    precision=args.precision).total
        rows.append((token, per_rank[0]['params'], measured, planned, max(r['rss_bytes'] for r in per_rank),
                     per_rank))
    zero0 = rows[0][2] if rows and rows[0][0] == '0' else None
    print(f'{args.model}, {args.precision}, {args.world_size} CPU ranks, bucket {args.bucket_size} elements')
    print('| ZeRO | params | measured live tensors / rank (GiB) | vs ZeRO-0 | plan (GiB) | plan / measured '
          '| RSS (GiB) | model as built: live tensors, per rank (GiB) | peak RSS while building, per rank (GiB) '
          '| build (s) |')
    print('|---|---|---|---|---|---|---|---|---|---|')

    def per_rank_gib(ranks, key):
        return ' / '.join(f'{r[key] / GiB:.2f}' for r in ranks)

    for token, params, measured, planned, rss, ranks in rows:
        rel = f'{100 * measured / zero0:.0f}%' if zero0 else '-'
        print(f'| {token} | {params / 1e6:.1f}M | {measured / GiB:.3f} | {rel} | {planned / GiB:.3f} | '
              f'{planned / measured:.2f} | {rss / GiB:.2f} | {per_rank_gib(ranks, "built_live_bytes")} '
              f'| {per_rank_gib(ranks, "build_peak_rss_bytes")} | {max(r["build_seconds"] for r in ranks):.1f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
