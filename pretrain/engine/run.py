"""One entry path for a training stage: :func:`run_training` is what every rank runs, under ``python -m pretrain
train`` (torchrun, srun) and under ``python -m launch.worker`` (local mode, sbatch, Submitit) alike.

It owns the process group (started with ``run.collective_timeout_min``, torn down at the end), the watchdog
(``run.watchdog_min``), the preemption handlers, and the one mapping of outcomes to exit statuses:

==========  =====================================================================================================
status      meaning
==========  =====================================================================================================
0           completed (or stopped early by ``run.stop_after_steps``, with a checkpoint)
1           a failed checkpoint save (a full disk) or an output folder in use by another run (one line naming
            the step and cause, or the holder); any other error (a traceback on stderr)
2           config error (before any work; the callers map it)
3           too many non-finite steps in a row (the message names the step and the last good checkpoint)
75          saved and requeued after a requeue signal, or stalled (watchdog, collective timeout) and requeued: the
            local runner restarts the stage, Slurm runs the requeued job; both resume from the newest checkpoint
==========  =====================================================================================================
"""
from __future__ import annotations

import os
import traceback
from collections.abc import Callable

from pretrain.config import TrainConfig
from pretrain.engine import preemption, watchdog

__all__ = ['run_training', 'DEFAULT_MAX_REQUEUES', 'EXIT_FAILED', 'EXIT_CONFIG', 'EXIT_NONFINITE', 'EXIT_REQUEUE',
           'is_collective_timeout']

DEFAULT_MAX_REQUEUES = 3  # as launch's resources.max_requeues: a stage that keeps stalling stops after 3 restarts
EXIT_FAILED, EXIT_CONFIG, EXIT_NONFINITE = 1, 2, 3
EXIT_REQUEUE = preemption.REQUEUE_EXIT_CODE


def _print(msg: str) -> None:
    print(f'[pretrain] {msg}', flush=True)


def is_collective_timeout(error: BaseException) -> bool:
    """True for the error a gloo collective raises when a peer did not answer within the process group's timeout
    (nccl does not raise: its watchdog aborts the process)."""
    message = str(error).lower()
    # Gloo says 'Timed out waiting ...' in a send/recv, 'Application timeout caused pair closure' in a barrier.
    return isinstance(error, RuntimeError) and ('timed out' in message or 'application timeout' in message)


def run_training(cfg: TrainConfig, *, requeue_signals: list[str] | tuple[str, ...] = ('USR2',),
                 max_requeues: int = DEFAULT_MAX_REQUEUES, log: Callable[[str], None] = _print,
                 on_end: Callable[[dict], None] | None = None) -> int:
    """Train one stage from a validated config on this rank and return its exit status (table above); exits the
    process itself (``os._exit``) with 75 after a requeue signal or a stall. ``requeue_signals``: signal names that
    save and requeue (``preemption.install``); ``max_requeues``: Slurm restarts allowed (``SLURM_RESTART_COUNT``);
    ``on_end(fields)``: called on rank 0 once the outcome is known, with ``status`` ('completed', 'requeued',
    'failed'), ``exit_code`` and ``step`` / ``checkpoint`` / ``signal`` / ``error`` / ``stalled`` where known (the
    launch worker records it in events.jsonl)."""
    import torch.distributed as dist

    from pretrain.common import dist as edist

    preemption.install(list(requeue_signals))  # early: a signal during start-up is honoured at the first step
    env = edist.init_distributed(edist.detect_env(), timeout_min=cfg.run.collective_timeout_min)

    def end(**fields) -> None:
        if env.rank == 0 and on_end is not None:
            on_end(fields)

    def on_stall(reason: str) -> None:  # in the stalled process, just before it exits with 75
        requeued = preemption.request_requeue(max_requeues, log)
        end(status='requeued', exit_code=watchdog.STALL_EXIT_CODE, stalled=True, error=reason, requeued=requeued)

    from pretrain.engine.checkpoint import CheckpointSaveError
    from pretrain.engine.run_lock import RunLockedError
    from pretrain.engine.trainer import NonFiniteError, Trainer

    dump_dir = os.path.join(cfg.run.output_dir, 'watchdog')
    # Configured (no thread) before the build, so a collective timeout there still dumps, requeues and records.
    watchdog.start(0, rank=env.rank, dump_dir=dump_dir, on_stall=on_stall)
    try:
        trainer = Trainer(cfg, env)
        # Started after the build (resume, universal conversion: no beats there; the collective timeout bounds it).
        watchdog.start(cfg.run.watchdog_min, rank=env.rank, dump_dir=dump_dir, on_stall=on_stall)
        summary = trainer.train()
    except preemption.Preempted as e:
        watchdog.stop()
        log(str(e))
        end(status='requeued', exit_code=EXIT_REQUEUE, step=e.step, checkpoint=e.checkpoint, signal=e.signal_name)
        preemption.requeue_and_exit(env.rank, max_requeues, log=log)
        return EXIT_REQUEUE  # not reached: requeue_and_exit leaves the process
    except NonFiniteError as e:  # raised on every rank at the same step (the counts are agreed)
        watchdog.stop()
        edist.print_line(f'error: {e}')
        end(status='failed', exit_code=EXIT_NONFINITE, error=str(e))
        dist.destroy_process_group()
        return EXIT_NONFINITE
    except (CheckpointSaveError, RunLockedError) as e:  # raised on every rank, with the same one-line message
        watchdog.stop()
        edist.print_line(f'error: {e}')
        end(status='failed', exit_code=EXIT_FAILED, error=str(e))
        dist.destroy_process_group()
        return EXIT_FAILED
    except Exception as e:
        if is_collective_timeout(e):  # another rank is stuck or gone: a stall as seen from here
            traceback.print_exc()
            watchdog.stall(f'a collective timed out after run.collective_timeout_min={cfg.run.collective_timeout_min:g}'
                           f' min (another rank is stuck or dead): {e}')
        watchdog.stop()
        end(status='failed', exit_code=EXIT_FAILED, error=''.join(traceback.format_exception_only(e)).strip()[-2000:])
        raise
    watchdog.stop()
    end(status='completed', exit_code=0, step=summary['step'], checkpoint=summary['last_checkpoint'])
    dist.destroy_process_group()  # every rank got here: the group's peers are all still alive
    return 0
