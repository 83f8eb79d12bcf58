"""InternImage-H on one GPU (issue 14, part 3): M3I steps of the headline stage under ZeRO-3 bf16 with activation
checkpointing at 224 px: the largest micro-batch that fits, images/s, and peak memory against ``python -m pretrain
plan``'s prediction for the same config.

    python benchmarks/gpu_h.py [--config configs/stage/internimage_h_m3i.yaml] [--batches 32,64,128,256,512]
                               [--plan-json PLAN.json] [--json ROWS.json] [--budget-s S]
    python benchmarks/gpu_h.py --dry-run        # no GPU: the config resolves and the model builds on the meta device

The stage config is used as it ships (``configs/stage/internimage_h_m3i.yaml``: contrastive with the 12 x 768 text
tower, MIM with the EMA teacher, ZeRO-3, bf16, per-block checkpointing), with only the data and output folders
replaced: one real Trainer (DeepSpeed) on one GPU, synthetic batches (random images and token ids) so that the loader
is not measured. The micro-batch grows through ``--batches`` (one engine, only the batch tensors change size:
DeepSpeed does not check them), each size timed over ``--steps`` optimizer steps after ``--warmup``, with the peak
of ``torch.cuda.max_memory_allocated`` (reset per size); the first size that runs out of memory ends the sweep, and a
size whose predicted time would overrun ``--budget-s`` is reported as not run. A size that runs out of
``--budget-s`` during its steps (the first has no prediction; a later one may overrun its own) keeps the steps timed
so far (the row's ``steps``), or reports itself unfinished if that was still in the warm-up.

``--plan-json`` is the output of ``python -m pretrain plan CONFIG --world-size 1 --gpu-mem GIB --json`` (a CPU job;
``make gpu-check`` runs it beside the GPU parts). Each row then carries the plan's prediction of allocated memory at
that micro-batch: model states plus micro-batch x checkpointed activations per image (the plan's reserve for the CUDA
context and fragments is not allocated memory, so it is left out), and measured / predicted.
Rows are written to ``--json`` after each size, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / 'configs' / 'stage' / 'internimage_h_m3i.yaml'
GiB = 2**30


def stage_config(path: Path, out_dir: str, micro_batch: int):
    """The shipped stage config with its data and output folders replaced (nothing else changes)."""
    from pretrain.config import load_config
    return load_config(path, [f'deepspeed.micro_batch_size={micro_batch}', f'run.output_dir={out_dir}',
                              'checkpoint.resume=none', 'logging.tensorboard=false', 'logging.progress=false'])


def predicted_gib(plan: dict | None, batch: int) -> float | None:
    """The plan's allocated-memory prediction at ``batch`` (model states + batch x checkpointed activations)."""
    if not plan:
        return None
    return plan['model_states_gib']['total'] + batch * plan['activations_gib_per_sample']['checkpointing']


def sweep(args) -> list[dict]:
    import pretrain.common.dist as edist
    from benchmarks.objectives import _batch
    from pretrain.engine.trainer import Trainer

    plan = json.loads(Path(args.plan_json).read_text()) if args.plan_json and Path(args.plan_json).is_file() else None
    batches = [int(b) for b in args.batches.split(',')]
    rows: list[dict] = []
    deadline = time.monotonic() + args.budget_s
    edist.init_distributed()
    gpu = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.monotonic()
        cfg = stage_config(Path(args.config), out, batches[0])
        trainer = Trainer(cfg, build_data=False)
        build_s = time.monotonic() - t0
        print(f'{cfg.model.name}: Trainer built in {build_s:.0f} s (ZeRO-{cfg.deepspeed.zero_stage} '
              f'{cfg.deepspeed.precision}, checkpointing {cfg.model.grad_checkpointing}), {gpu}', flush=True)
        base = {'model': cfg.model.name, 'objective': cfg.objective.kind if cfg.objective.kind != 'multi' else 'm3i',
                'img_size': cfg.data.img_size, 'zero_stage': cfg.deepspeed.zero_stage,
                'precision': cfg.deepspeed.precision, 'grad_checkpointing': cfg.model.grad_checkpointing, 'gpu': gpu,
                'params': sum(p.ds_numel if hasattr(p, 'ds_numel') else p.numel()
                              for p in trainer.engine.module.parameters()),
                'trainer_build_s': round(build_s, 1)}
        context = cfg.objective.contrastive.context_length
        last: tuple[int, float] | None = None  # (batch, seconds per step) of the last size that ran
        for i, batch in enumerate(batches):
            warmup = args.warmup + (1 if i == 0 else 0)  # the first size also pays the cuDNN autotuning
            row = dict(base, batch=batch)
            if last is not None:
                need = last[1] * batch / last[0] * (warmup + args.steps)
                if time.monotonic() + need > deadline:
                    rows.append(dict(row, error=f'not run (budget): ~{need:.0f} s needed, '
                                                f'{max(deadline - time.monotonic(), 0):.0f} s left'))
                    break
            data = _batch(batch, cfg.data.img_size, context)  # benchmarks/objectives.py's synthetic M3I batch
            data['image'] = data['image'].pin_memory()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            try:
                for k in range(warmup + args.steps):
                    t = time.perf_counter()
                    trainer.train_step(lambda: data)  # noqa: B023 - called at once
                    torch.cuda.synchronize()
                    if k >= warmup:
                        times.append(time.perf_counter() - t)
                    # The first size has no estimate to check against, and a later one may overrun its estimate.
                    if time.monotonic() > deadline and k < warmup + args.steps - 1:
                        break
            except (torch.OutOfMemoryError, RuntimeError) as exc:  # DeepSpeed can re-raise an OOM as RuntimeError
                if 'out of memory' not in str(exc).lower():
                    raise
                rows.append(dict(row, error=f'out of memory: {str(exc).splitlines()[0][:200]}',
                                 predicted_alloc_gib=predicted_gib(plan, batch)))
                print(f'batch {batch}: out of memory', flush=True)
                break
            if not times:
                rows.append(dict(row, error=f'not finished (budget): only warm-up steps ({k + 1} of {warmup}) ran '
                                            f'before the {args.budget_s:.0f} s budget ran out'))
                print(f'batch {batch}: out of time in the warm-up', flush=True)
                break
            step_s = statistics.median(times)
            peak = torch.cuda.max_memory_allocated() / GiB
            pred = predicted_gib(plan, batch)
            row.update(images_per_s=batch / step_s, step_ms=step_s * 1e3, peak_mem_gib=peak,
                       peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB,
                       predicted_alloc_gib=pred, measured_over_predicted=peak / pred if pred else None,
                       steps=len(times), warmup=warmup)
            rows.append(row)
            last = (batch, step_s)
            print(f'batch {batch}: {row["images_per_s"]:.1f} images/s, {row["step_ms"]:.0f} ms/step, peak '
                  f'{peak:.1f} GiB allocated' + (f' (plan {pred:.1f} GiB: {peak / pred:.2f}x)' if pred else ''),
                  flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


def dry_run(args) -> int:
    """No GPU: the config resolves and its model builds on the meta device (the CPU rehearsal of gpu-check)."""
    from pretrain.objectives import build_model
    cfg = stage_config(Path(args.config), tempfile.gettempdir(), 16)
    with torch.device('meta'):
        model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f'{cfg.model.name} ({cfg.objective.kind}): {n / 1e6:.0f}M parameters on the meta device; '
          f'ZeRO-{cfg.deepspeed.zero_stage} {cfg.deepspeed.precision}, checkpointing {cfg.model.grad_checkpointing}')
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default=str(CONFIG))
    p.add_argument('--batches', default='32,64,128,256,512')
    p.add_argument('--steps', type=int, default=2)
    p.add_argument('--warmup', type=int, default=2)  # ZeRO-3 replays the teacher's part of its trace first in step 3
    p.add_argument('--plan-json', default=None)
    p.add_argument('--json', type=Path, default=None)
    p.add_argument('--budget-s', type=float, default=1e9)
    p.add_argument('--dry-run', action='store_true')
    args = p.parse_args()
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print('benchmarks/gpu_h.py needs a CUDA GPU (--dry-run checks the config without one)', file=sys.stderr)
        return 2
    rows = sweep(args)
    fits = [r['batch'] for r in rows if 'images_per_s' in r]
    print(f'largest micro-batch that ran: {max(fits) if fits else None}')
    return 0 if fits else 1


if __name__ == '__main__':
    sys.exit(main())
