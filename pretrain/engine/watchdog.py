"""A per-rank watchdog: a rank that makes no progress for ``run.watchdog_min`` minutes dumps the stack of every
Python thread and leaves, so that a hang costs minutes and says where it is, instead of the allocation.

- ``beat()`` marks progress: the trainer calls it once per micro-batch, the validation loader once per batch
  (``pretrain/engine/data.py``). It only stores a time stamp, so it costs nothing and is harmless when no watchdog
  runs.
- ``start(timeout_min, ...)`` (``run_training`` does it on every rank, once the Trainer is built) starts a daemon
  thread that checks the time since the last beat. On expiry, :func:`stall`: the reason and every thread's stack
  (``faulthandler``) go to stderr and to ``<dump_dir>/rank<R>.txt``, ``on_stall(reason)`` runs (``run_training``:
  ``scontrol requeue`` of the Slurm job, the stage's end event) and the process exits with
  :data:`STALL_EXIT_CODE` (75, :data:`~pretrain.engine.preemption.REQUEUE_EXIT_CODE`): the local runner restarts
  the stage, Slurm runs the requeued job, and either resumes from the newest complete checkpoint. Every rank stalls
  when one does (the others wait for it in a collective), so every rank dumps its stacks.
- ``paused()``: a block that may legitimately run longer than the limit without beats (a large checkpoint save).
- A backstop in C: ``faulthandler.dump_traceback_later`` is re-armed at every check, so if the watchdog thread
  itself cannot run (a thread holding the GIL for ever) the stacks are still dumped and the process exits (status 1).
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from pretrain.engine.preemption import REQUEUE_EXIT_CODE

__all__ = ['beat', 'start', 'stop', 'paused', 'stall', 'STALL_EXIT_CODE']

STALL_EXIT_CODE = REQUEUE_EXIT_CODE  # "run me again": the resumed job continues from the last checkpoint

_last_beat_s = time.monotonic()
_paused = 0
_config: dict = {'rank': 0, 'dump_dir': None, 'on_stall': None, 'timeout_min': 0.0}
_thread: _Watchdog | None = None
_stall_lock = threading.Lock()


def beat() -> None:
    """Mark progress on this rank (cheap: one time stamp)."""
    global _last_beat_s
    _last_beat_s = time.monotonic()


@contextmanager
def paused() -> Iterator[None]:
    """No stall is declared inside this block; the clock restarts when it ends."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1
        beat()


class _Watchdog(threading.Thread):
    def __init__(self, timeout_s: float):
        super().__init__(name='pretrain-watchdog', daemon=True)
        self.timeout_s = timeout_s
        self.poll_s = min(max(timeout_s / 10, 0.5), 30.0)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.poll_s):
            # Re-armed at each check: fires only when this thread could not run for the whole window.
            faulthandler.dump_traceback_later(self.timeout_s + 3 * self.poll_s, exit=True)
            idle_s = time.monotonic() - _last_beat_s
            if not _paused and idle_s > self.timeout_s:
                stall(f'no progress for {idle_s / 60:.2f} min (run.watchdog_min={self.timeout_s / 60:g})')
        faulthandler.cancel_dump_traceback_later()


def start(timeout_min: float, *, rank: int, dump_dir: str | None,
          on_stall: Callable[[str], None] | None = None) -> None:
    """Configure :func:`stall` (rank, where the stack dump goes, what runs before the exit) and, when
    ``timeout_min > 0``, start the watchdog thread of this process (the clock starts now)."""
    global _thread
    stop()
    _config.update(rank=rank, dump_dir=dump_dir, on_stall=on_stall, timeout_min=timeout_min)
    beat()
    if timeout_min > 0:
        _thread = _Watchdog(timeout_min * 60)
        _thread.start()


def stop() -> None:
    """Stop the watchdog thread (if any); :func:`beat` stays a harmless no-op."""
    global _thread
    if _thread is not None:
        _thread.stopped.set()
        if _thread is not threading.current_thread():
            _thread.join()
        _thread = None


def stall(reason: str) -> NoReturn:
    """Declare this rank stuck: log ``reason`` and every thread's stack (stderr and ``<dump_dir>/rank<R>.txt``), run
    ``on_stall(reason)``, exit with :data:`STALL_EXIT_CODE` without waiting for any other thread."""
    with _stall_lock:  # the watchdog thread and the main thread (a collective timeout) may both get here
        rank = _config['rank']
        header = (f'[watchdog rank {rank}] {reason}; stacks of every thread follow; exiting with status '
                  f'{STALL_EXIT_CODE} (requeue: resume from the last complete checkpoint)')
        print(header, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if _config['dump_dir']:
            try:
                os.makedirs(_config['dump_dir'], exist_ok=True)
                path = os.path.join(_config['dump_dir'], f'rank{rank}.txt')
                with open(path, 'w') as f:
                    f.write(f'{time.strftime("%Y-%m-%d %H:%M:%S")} {header}\n')
                    f.flush()
                    faulthandler.dump_traceback(file=f, all_threads=True)
                print(f'[watchdog rank {rank}] stacks written to {path}', file=sys.stderr, flush=True)
            except OSError as e:  # a full or gone output disk must not keep us from exiting
                print(f'[watchdog rank {rank}] could not write the stack dump: {e}', file=sys.stderr, flush=True)
        if _config['on_stall'] is not None:
            try:
                _config['on_stall'](reason)
            except Exception as e:  # noqa: BLE001 - the exit below matters more than the hook
                print(f'[watchdog rank {rank}] on_stall failed: {e!r}', file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():  # loader workers: they would outlive os._exit
            child.kill()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(STALL_EXIT_CODE)  # not sys.exit: the stuck threads would keep the process alive
