"""Where a ZeRO-3 M3I step spends its time, phase by phase, on one process (CPU or GPU).

The shipped InternImage-H M3I stage config (``configs/stage/internimage_h_m3i.yaml``: contrastive + MIM teacher,
bf16, per-block checkpointing) with a smaller model, image size and text tower, through the real Trainer with one
synthetic batch. Every step prints the wall time of its phases: the teacher's forward (EMA swapped in and out), the
student's forward, the backward (with the recompute), DeepSpeed's step, the teacher's EMA update, and, under ZeRO-3,
the calls and time of DeepSpeed's fetch/release hooks and of its release planner (``__params_to_release``, which the
first replay of the recorded trace computes once per trace position). Then the median step after ``--warmup`` and
one swap in+out and one EMA update timed alone.

    python benchmarks/zero3_hooks.py                                  # ZeRO-3, leaf blocks (the default)
    python benchmarks/zero3_hooks.py --set deepspeed.stage3_leaf_blocks=false      # DeepSpeed's per-module hooks
    python benchmarks/zero3_hooks.py --set deepspeed.zero_stage=1 --set model.grad_checkpointing=false
    python benchmarks/zero3_hooks.py --model internimage_h --img-size 224 --batch 32 --full-text   # on a GPU
"""
from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / 'configs' / 'stage' / 'internimage_h_m3i.yaml'


def timed(totals: dict, counts: collections.Counter, obj, attr: str, key: str) -> None:
    """Wrap ``obj.attr`` so that its calls add their wall time to ``totals[key]``."""
    fn = getattr(obj, attr)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t
            counts[key] += 1
    setattr(obj, attr, wrapper)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='internimage_t')
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--full-text', action='store_true', help="the config's 12 x 768 text tower (default 2 x 256)")
    p.add_argument('--set', action='append', default=[], help='a config override KEY=VALUE (repeatable)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import pretrain.common.dist as edist
    from pretrain.config import load_config
    from pretrain.engine.trainer import Trainer

    edist.init_distributed()
    small_text = [] if args.full_text else [
        'objective.contrastive.text_layers=2', 'objective.contrastive.text_width=256',
        'objective.contrastive.text_heads=4', 'objective.contrastive.embed_dim=256', 'objective.mim.decoder_dim=64']
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(CONFIG, [f'model.name={args.model}', f'data.img_size={args.img_size}',
                                   f'deepspeed.micro_batch_size={args.batch}', f'run.output_dir={out}',
                                   'checkpoint.resume=none', 'logging.tensorboard=false', 'logging.progress=false',
                                   'objective.zero_shot.classnames=null', *small_text, *args.set])
        trainer = Trainer(cfg, build_data=False)
        totals: dict = collections.defaultdict(float)
        counts: collections.Counter = collections.Counter()
        objective, engine = trainer.objective, trainer.engine
        if getattr(objective, 'teacher', None) is not None:
            timed(totals, counts, objective, '_teacher_features', 'teacher forward')
        for attr, key in (('forward', 'forward'), ('backward', 'backward'), ('step', 'ds step')):
            timed(totals, counts, engine, attr, key)
        timed(totals, counts, objective, 'after_step', 'teacher update')
        if cfg.deepspeed.zero_stage == 3:
            coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
            for attr, key in (('fetch_sub_module', 'fetch hooks'), ('release_sub_module', 'release hooks'),
                              ('_PartitionedParameterCoordinator__params_to_release', 'release planner')):
                timed(totals, counts, coordinator, attr, key)
        from benchmarks.objectives import _batch
        batch = _batch(args.batch, args.img_size, cfg.objective.contrastive.context_length)
        ds = cfg.deepspeed
        print(f'{args.model} at {args.img_size} px, batch {args.batch}, ZeRO-{ds.zero_stage} {ds.precision}, '
              f'checkpointing {cfg.model.grad_checkpointing}, leaf blocks {ds.stage3_leaf_blocks}, '
              f'{trainer.device}', flush=True)
        times = []
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            trainer.train_step(lambda: batch)
            if trainer.device.type == 'cuda':
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            phases = ', '.join(f'{k} {v:.2f} s' + (f' ({counts[k]} calls)' if counts[k] > 1 else '')
                               for k, v in totals.items())
            print(f'step {i}: {times[-1]:.2f} s: {phases}', flush=True)
            totals.clear()
            counts.clear()
        print(f'median of {args.steps} steps after {args.warmup}: {statistics.median(times[args.warmup:]):.3f} s')
        teacher = getattr(objective, 'teacher', None)
        if teacher is not None:
            t = time.perf_counter()
            with teacher.swapped_in():
                pass
            swap = time.perf_counter() - t
            t = time.perf_counter()
            teacher.update()
            print(f'teacher swap in+out {swap:.3f} s, teacher EMA update {time.perf_counter() - t:.3f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
