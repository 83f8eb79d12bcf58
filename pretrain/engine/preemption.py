"""Preemption and time-limit handling: a signal sets a flag; all ranks agree on it at the next step boundary.

Slurm sends ``SIGUSR2`` ``signal_delay_s`` before the time limit (``--signal=USR2@N``), on preemption (with
``SlurmctldParameters=preempt_send_user_signal``) or on ``scancel --signal=USR2 JOB``. A collective (ZeRO-sharded)
save cannot run inside a signal handler, and the signal may reach the ranks at different steps, so:

1. ``install(['USR2'])`` once per rank, before training: the handler only sets a process-local flag
   (``python -m pretrain train`` and the launch worker do it).
2. At every optimizer-step boundary the trainer calls ``agreed()`` on every rank (when handlers are installed): an
   all-reduce (MAX) of the flag, so either all ranks see ``True`` at the same step or none does.
3. On ``True``: every rank saves the checkpoint (the trainer's normal collective save) and the trainer raises
   :class:`Preempted`; the command line catches it and calls ``requeue_and_exit(...)``: a barrier, rank 0
   runs ``scontrol requeue $SLURM_JOB_ID`` (unless the requeue limit is reached), a second barrier, and every rank
   exits with :data:`REQUEUE_EXIT_CODE`. The requeued job resumes from the newest complete checkpoint by itself.

``requested()`` reads the local flag without communicating (for logging, or for loops without a process group).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ['install', 'installed', 'requested', 'agreed', 'request_requeue', 'requeue_and_exit', 'Preempted',
           'REQUEUE_EXIT_CODE', 'restart_count']

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved, run me again" (the local runner restarts on it)

_flag = {'signal': None, 'time': None, 'installed': False}


class Preempted(Exception):
    """Raised after the collective save that followed an agreed preemption signal."""

    def __init__(self, step: int, checkpoint: str | None, signal_name: str | None):
        super().__init__(f'preempted at step {step} by SIG{signal_name}; checkpoint {checkpoint}')
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


def _handler(signum, frame):  # noqa: ARG001 - the signal module's signature
    if _flag['signal'] is None:
        _flag['signal'] = signal.Signals(signum).name.removeprefix('SIG')
        _flag['time'] = time.time()
    # Only a flag: I/O or collectives here could deadlock the rank that was interrupted mid-collective.


def install(signals: list[str] | tuple[str, ...] = ('USR2',)) -> None:
    """Make each of ``signals`` (names without SIG) set the preemption flag in this process."""
    for name in signals:
        signal.signal(getattr(signal, f'SIG{name}'), _handler)
    _flag['installed'] = _flag['installed'] or bool(signals)


def installed() -> bool:
    """True once ``install`` set a handler in this process (the trainer then checks the flag every step)."""
    return _flag['installed']


def requested() -> bool:
    """True once one of the installed signals arrived in this process (no communication)."""
    return _flag['signal'] is not None


def signal_name() -> str | None:
    return _flag['signal']


def agreed() -> bool:
    """Collective: True on every rank when any rank got the signal (all-reduce MAX); without a process group, the
    local flag. Every rank must call it at the same step boundary."""
    from pretrain.common import dist as edist

    return edist.all_reduce_max(1.0 if requested() else 0.0) > 0


def restart_count() -> int:
    """How many times Slurm (or the local runner) has restarted this stage: 0 on the first run."""
    return int(os.environ.get('SLURM_RESTART_COUNT') or os.environ.get('LAUNCH_LOCAL_ATTEMPT') or 0)


def request_requeue(max_requeues: int, log=print) -> bool:
    """Ask Slurm to requeue this job (``scontrol requeue $SLURM_JOB_ID``) unless it was restarted ``max_requeues``
    times already; no communication, so a rank may call it alone (the watchdog). False outside Slurm, at the limit
    or when scontrol refuses (logged)."""
    job = os.environ.get('SLURM_JOB_ID')
    if not job:
        return False
    if restart_count() >= max_requeues:
        log(f'requeue limit reached ({restart_count()} of max_requeues={max_requeues}); not requeueing job {job}')
        return False
    r = subprocess.run(['scontrol', 'requeue', job], capture_output=True, text=True, timeout=60)
    log(f'scontrol requeue {job}: {"ok" if r.returncode == 0 else r.stderr.strip()}')
    return r.returncode == 0


def requeue_and_exit(rank: int, max_requeues: int, log=print) -> None:
    """After the collective save: rank 0 asks Slurm to requeue the job (when under Slurm and below the limit);
    barriers on both sides so no rank exits (and makes srun kill the others) before the request is in. Exits with
    :data:`REQUEUE_EXIT_CODE` on every rank; outside Slurm the caller (the local runner) restarts the stage."""
    from pretrain.common import dist as edist

    edist.barrier()
    if rank == 0:
        request_requeue(max_requeues, log)
    edist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(REQUEUE_EXIT_CODE)  # not sys.exit: background threads (loader workers, DeepSpeed) must not hold us
