"""One run per output folder: an exclusive lock held by rank 0 for the life of the run.

``<output_dir>/RUN_LOCK`` is a small JSON file (host, PID, Slurm job id, start time) locked with ``fcntl.lockf``.
The kernel drops the lock when its holder exits or is killed, so a lock whose holder is gone is free again: the file
is left behind and simply re-locked and rewritten by the next run. A second run on the same folder finds it locked
and refuses with one line that names the holder.

``lockf`` (a POSIX record lock), not ``flock``: a process forked from the holder (a data-loader worker) does not
inherit it, so a worker that outlives a killed trainer for a few seconds cannot keep the folder locked, and Linux NFS
clients implement it with the server's lock manager. Its one trap: closing *any* descriptor of the file in the
holding process drops the lock; only this module opens the file.

A requeued Slurm job (same ``SLURM_JOB_ID``) whose previous incarnation is still shutting down takes the lock over:
it locks a fresh file and renames it over ``RUN_LOCK``, so later runs see the new holder.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ['RunLock', 'RunLockedError', 'LOCK_NAME', 'acquire_run_lock', 'describe_holder', 'lock_output_dir']

LOCK_NAME = 'RUN_LOCK'


class RunLockedError(RuntimeError):
    """Another live run holds the output folder."""


def _me() -> dict:
    return {'host': socket.gethostname(), 'pid': os.getpid(), 'slurm_job_id': os.environ.get('SLURM_JOB_ID') or None,
            'start_time': time.time()}


def describe_holder(info: dict) -> str:
    """One phrase naming a lock holder from its file: host, PID, Slurm job, start time (UTC)."""
    if not info:
        return 'an unknown process (the lock file is empty)'
    started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(float(info.get('start_time', 0))))
    job = f', Slurm job {info["slurm_job_id"]}' if info.get('slurm_job_id') else ''
    return f'PID {info.get("pid")} on {info.get("host")}{job}, started {started}'


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        return json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return {}


def _write(fd: int, info: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + '\n').encode())
    os.fsync(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: someone else holds it
        return False


@dataclass
class RunLock:
    """A held lock: ``path`` and the open descriptor that keeps it; :meth:`release` (or the process's exit) frees it."""
    path: str
    fd: int | None
    info: dict
    took_over: dict | None = None  # the holder whose lock a requeued job of the same Slurm job took over

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock; the file stays (the next run re-locks and rewrites it)
            self.fd = None


def lock_output_dir(output_dir: str) -> RunLock:
    """Lock ``output_dir`` for this process (one process, no communication). Raises :class:`RunLockedError` naming
    the holder when another live run holds it, unless that run belongs to this same Slurm job (a requeue), whose
    lock is taken over."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    me = _me()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if _try_lock(fd):
        _write(fd, me)
        return RunLock(path, fd, me)
    holder = _read(fd)
    os.close(fd)
    if not (me['slurm_job_id'] and holder.get('slurm_job_id') == me['slurm_job_id']):
        raise RunLockedError(f'{output_dir} is in use by another run ({describe_holder(holder)}); lock file {path}. '
                             'Wait for it to end, stop it, or use another run.output_dir')
    # Requeued: the same job's previous incarnation still holds it while Slurm stops it. A fresh locked file renamed
    # over the old name takes its place for every later reader.
    tmp = f'{path}.{me["host"]}.{me["pid"]}'
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    if not _try_lock(fd):
        os.close(fd)
        raise RunLockedError(f'could not lock {tmp} to take over {path} from {describe_holder(holder)}')
    _write(fd, me)
    os.replace(tmp, path)
    return RunLock(path, fd, me, took_over=holder)


def acquire_run_lock(output_dir: str, rank: int) -> RunLock | None:
    """Collective (every rank calls it, after the process group exists): rank 0 locks ``output_dir`` and tells the
    others whether it could, so that every rank raises the same :class:`RunLockedError` when another run holds the
    folder. Returns rank 0's :class:`RunLock` (None on the other ranks)."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = lock_output_dir(output_dir)
        except RunLockedError as e:
            error = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RunLockedError(error)
    return lock
