"""What each M3I objective adds to a training step, against the supervised step, measured in the same run.

One process, the real Trainer (DeepSpeed, bf16 or fp32), synthetic batches of the configured size; for each
objective setup the median time of full optimizer steps (forward, backward, step, EMA/teacher update) after
warm-up steps, and the ratio to the supervised step. The MIM setup includes the teacher's forward (EMA swapped into
the student's parameters and back), the dense masking hooks and the decoder.

    python benchmarks/objectives.py                       # InternImage-T at 128 px, batch 8, CPU
    python benchmarks/objectives.py --img-size 224 --batch 32 --precision bf16    # on a GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def _multi(supervised: float, contrastive: float, mim: float) -> dict:
    """An ``objective.kind: multi`` section stating every part's weight."""
    return {'kind': 'multi', 'supervised': {'weight': supervised}, 'contrastive': {'weight': contrastive},
            'mim': {'weight': mim}, 'fcmae': {'weight': 0.0}}


SETUPS = {
    'supervised': {'kind': 'supervised'},
    'm3i: supervised only': _multi(1.0, 0.0, 0.0),
    'm3i: contrastive': _multi(0.0, 1.0, 0.0),
    'm3i: mim (teacher)': _multi(0.0, 0.0, 1.0),
    'm3i: contrastive + mim + supervised': _multi(1.0, 1.0, 1.0),
}


def _batch(n: int, size: int, context: int) -> dict:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 49000, (n, context), generator=g)
    return {'image': torch.randn(n, 3, size, size, generator=g), 'label': torch.randint(0, 1000, (n,), generator=g),
            'key': [str(i) for i in range(n)], 'text': text, 'has_text': torch.ones(n, dtype=torch.bool)}


def measure(name: str, objective: dict, args, out_dir: str) -> float:
    from pretrain.config import config_from_dict
    from pretrain.engine.trainer import Trainer

    text = {'embed_dim': 512, 'text_width': 512, 'text_layers': 12, 'text_heads': 8}
    objective = {k: ({**v, **text} if k == 'contrastive' else v) for k, v in objective.items()}
    cfg = config_from_dict({
        'model': {'name': args.model, 'num_classes': 1000, 'drop_path_rate': 0.1},
        'objective': objective,
        'data': {'train': [{'name': 'unused', 'urls': 'unused.tar'}], 'img_size': args.img_size},
        'loss': {'mixup_alpha': 0.0, 'cutmix_alpha': 0.0},
        'schedule': {'total_steps': 1000},
        'deepspeed': {'zero_stage': 1, 'precision': args.precision, 'micro_batch_size': args.batch},
        'ema': {'enabled': False},
        'checkpoint': {'resume': 'none'},
        'logging': {'tensorboard': False, 'progress': False},
        'run': {'output_dir': os.path.join(out_dir, name.replace(' ', '_').replace(':', ''))},
    })
    trainer = Trainer(cfg, build_data=False)
    batch = _batch(args.batch, args.img_size, cfg.objective.contrastive.context_length)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        trainer.train_step(lambda: batch)
        if trainer.device.type == 'cuda':
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    del trainer
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='internimage_t')
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import pretrain.common.dist as edist
    edist.init_distributed()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    print(f'{args.model} at {args.img_size} px, batch {args.batch}, {args.precision}, ZeRO-1, {device}, '
          f'median of {args.steps} steps after {args.warmup} warm-up steps; text tower 12 x 512')
    with tempfile.TemporaryDirectory() as out:
        base = None
        print(f'{"setup":<38} {"s/step":>8} {"vs supervised":>14}')
        for name, objective in SETUPS.items():
            t = measure(name, objective, args, out)
            base = base if base is not None else t
            print(f'{name:<38} {t:8.3f} {t / base:13.2f}x', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
