"""One rank of a stage: ``python -m launch.worker --stage-dir DIR [--init-from DIR] CONFIG [key=value ...]``.

What ``python -m pretrain train CONFIG [overrides]`` does, plus what a launched stage needs around it:

- ``run.output_dir`` = ``<stage dir>/out``;
- ``--init-from PRED_OUT [--init-weights raw|ema]``: rank 0 consolidates the newest complete checkpoint of the
  predecessor stage (its raw or EMA weights) into
  ``<stage dir>/init/<...>.pt`` (fp32, ``{'model': state_dict}``, through ``pretrain.export``), every rank passes it
  as ``model.init_from`` (a resumed stage then loads its own checkpoint over it);
- preemption: ``--requeue-signals USR2`` makes the signal save a checkpoint on every rank at the next step boundary
  (the trainer checks ``pretrain.engine.preemption``) and requeue the job;
- rank 0 appends start/end events to ``<stage dir>/events.jsonl`` (what ``python -m launch status`` reads when Slurm
  has forgotten the job).

Training itself is :func:`pretrain.engine.run.run_training`, the same as ``python -m pretrain train``: the rendezvous
(``pretrain.common.dist.detect_env``: torchrun's variables, else Slurm's), the watchdog, the exit statuses (0 done,
75 saved and requeued, or stalled and requeued, to be restarted by the local runner too, 2 config error, 3 non-finite
loss, 1 anything else).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from pretrain.engine import preemption
from pretrain.engine.run import DEFAULT_MAX_REQUEUES, EXIT_CONFIG, run_training

__all__ = ['main', 'StageTask', 'record_event', 'ensure_init_weights']


_rank = {'rank': 0}  # this process's rank, for the log prefix (set by main)


def log(msg: str) -> None:
    print(f'[launch rank {_rank["rank"]}] {msg}', flush=True)


def record_event(stage_dir: str | Path, event: str, **fields) -> None:
    """Append one JSON line to ``<stage_dir>/events.jsonl`` (rank 0 only; O_APPEND keeps lines whole)."""
    row = {'event': event, 'time': time.time(), 'host': socket.gethostname(),
           'job_id': os.environ.get('SLURM_JOB_ID'), 'restart_count': preemption.restart_count(), **fields}
    with open(os.path.join(stage_dir, 'events.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')


def ensure_init_weights(pred_out: str | Path, dest_dir: str | Path, rank: int, timeout_s: float = 3600,
                        weights: str = 'raw') -> Path:
    """The predecessor's newest complete checkpoint as an fp32 ``{'model': state_dict, 'meta': ...}`` file under
    ``dest_dir``: ``python -m pretrain export``'s consolidation and official format (the backbone with its classifier;
    an M3I wrapper's other parts dropped). ``weights``: 'raw' (default) or 'ema' (file name ``..._ema.pt``).

    Rank 0 writes it once (temp file + rename); other ranks wait for it. Raises FileNotFoundError when the
    predecessor has no complete checkpoint."""
    from pretrain.engine.checkpoint import find_complete_checkpoints

    found = find_complete_checkpoints(os.path.join(pred_out, 'checkpoints'))
    if not found:
        raise FileNotFoundError(f'init_from: no complete checkpoint under {pred_out}/checkpoints')
    step, step_dir = found[-1]
    suffix = '' if weights == 'raw' else f'_{weights}'
    dest = Path(dest_dir) / f'{Path(pred_out).parent.name}_step_{step:08d}{suffix}.pt'
    if rank == 0 and not dest.exists():
        from pretrain.export import consolidate, write

        sd, meta = consolidate(step_dir, weights)
        write(sd, meta, 'official', dest)
        log(f'init weights: {len(sd)} tensors ({weights}) from {step_dir} -> {dest}'
            + (f'; dropped {", ".join(meta.dropped)}' if meta.dropped else ''))
    deadline = time.time() + timeout_s
    while not dest.exists():
        if time.time() > deadline:
            raise TimeoutError(f'rank {rank}: {dest} did not appear in {timeout_s:.0f}s (rank 0 writes it)')
        time.sleep(0.5)
    return dest


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog='python -m launch.worker', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--stage-dir', required=True, help='the stage folder in the run folder')
    p.add_argument('--init-from', default=None, help="the predecessor stage's output folder")
    p.add_argument('--init-weights', default='raw', choices=['raw', 'ema'], help="which of the predecessor's weights")
    p.add_argument('--max-requeues', type=int, default=DEFAULT_MAX_REQUEUES)
    p.add_argument('--requeue-signals', default='USR2', help="comma-separated signal names ('' = none)")
    p.add_argument('--workdir', default=None, help='chdir here first (relative paths in the training config)')
    p.add_argument('config')
    p.add_argument('overrides', nargs='*')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir:
        os.chdir(args.workdir)
    stage_dir = Path(args.stage_dir).resolve()
    from pretrain.common.dist import detect_env

    env = detect_env()
    rank = _rank['rank'] = env.rank
    signals = [s for s in args.requeue_signals.split(',') if s]
    preemption.install(signals)  # early: a signal while rank 0 writes the init weights is honoured at step one
    import launch
    import pretrain
    from pretrain.config import ConfigError, load_config
    from pretrain.export import ExportError
    overrides = list(args.overrides) + [f'run.output_dir={stage_dir / "out"}']
    if rank == 0:
        record_event(stage_dir, 'start', world_size=env.world_size, code=str(Path(launch.__file__).parent.parent),
                     pretrain_code=str(Path(pretrain.__file__).parent.parent))
    try:
        if args.init_from:
            init = ensure_init_weights(args.init_from, stage_dir / 'init', rank, weights=args.init_weights)
            overrides.append(f'model.init_from={init}')
        cfg = load_config(args.config, overrides)
    except (ConfigError, ExportError, FileNotFoundError, TimeoutError) as e:
        log(f'error: {e}')
        if rank == 0:
            record_event(stage_dir, 'end', status='failed', exit_code=EXIT_CONFIG, error=str(e))
        return EXIT_CONFIG
    # Which node each rank landed on, and its local rank: the first thing to read when a multi-node job misbehaves.
    node = os.environ.get('SLURMD_NODENAME') or socket.gethostname()
    log(f'rank {env.rank} of {env.world_size}, local rank {env.local_rank}, node {node}; '
        f'code {Path(launch.__file__).parent.parent}, config {args.config}, output {cfg.run.output_dir}, '
        f'requeue signals {signals or "none"}, restart {preemption.restart_count()}, rendezvous '
        f'{env.master_addr}:{env.master_port} ({env.source})')
    return run_training(cfg, requeue_signals=signals, max_requeues=args.max_requeues, log=log,
                        on_end=lambda fields: record_event(stage_dir, 'end', **fields))


class StageTask:
    """What Submitit runs in every task of a stage's job: ``main(argv)`` in-process.

    Not checkpointable on purpose: the worker replaces Submitit's USR2 handler with pretrain.engine.preemption (a
    collective save needs every rank, Submitit's handler runs on rank 0 only), and a requeued job re-runs this same
    pickle, which resumes from the newest complete checkpoint by itself (no stale resume path baked into the
    pickle)."""

    def __init__(self, argv: list[str], code_dir: str):
        self.argv, self.code_dir = list(argv), code_dir

    def __call__(self) -> int:
        if self.code_dir not in sys.path[:1]:
            sys.path.insert(0, self.code_dir)
        code = main(self.argv)
        if code != 0:  # an exception fails the task, the Slurm job ends FAILED, afterok dependents do not start
            raise RuntimeError(f'stage worker exited with status {code}')
        return code


if __name__ == '__main__':
    sys.exit(main())
