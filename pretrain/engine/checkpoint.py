"""The one place that owns checkpoint atomicity, and the registry of everything a checkpoint holds.

Layout (``root = <output_dir>/checkpoints``, a folder every rank sees)::

    root/step_00000120/
        global_step120/            DeepSpeed's sharded save (model + ZeRO optimizer partitions, one file per rank)
        zero_to_fp32.py            copied by DeepSpeed (consolidates fp32 weights offline)
        rank_00000.pt ...          per rank: its registered per-rank parts (data loader position, RNG states)
        ema_00000.pt ...           per rank: a registered weight average (its ZeRO-3 partition, or rank 0's whole)
        teacher_00000.pt ...       the same for the MIM teacher (an EMA of the backbone), when the objective has one
        trainer.pt                 rank 0: the registered global parts (train state, scheduler, sparsity masks),
                                   world size, config
        config.yaml                the resolved config, for people
        COMPLETE                   commit marker (JSON), written last
    root/step_00000120.universal/global_step120_universal/
                                   DeepSpeed's universal checkpoint, made when resuming at another world size

Parts register with :meth:`CheckpointManager.register` (torchtitan's ``CheckpointManager(states={...})``): each has
``state_dict()`` / ``load_state_dict()`` and a scope that says where it is saved and when it is restored.

Save: every rank writes its files (each via temp file + rename), the ranks agree that every write succeeded, then
rank 0 writes ``COMPLETE`` via rename. A step folder without ``COMPLETE`` (a crash mid-save, kill -9) is never resumed
from; it is deleted when the run saves that step again or prunes. A failed write on any rank (a full disk) fails the
save on every rank: the partial folder is removed and :class:`CheckpointSaveError` names the step, the cause and the
last complete checkpoint. A committed folder is never written again: the universal conversion and the weights-only
load's ``latest`` file live outside it. DeepSpeed's own ``latest`` file is not used: it is written before every rank
has finished (pipeline-anchors.md §4.4).

Resume: rank 0 chooses the step (the newest committed folder it sees, or the one the config names) and broadcasts
it; every rank checks that it sees that folder committed, so ranks with different views of the file system stop
together with an error instead of loading different steps.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pretrain.common import dist as edist
from pretrain.common.safe_load import check_folder, safe_load
from pretrain.engine import watchdog
from pretrain.engine.folders import MARKER, STEP_DIR, find_complete_checkpoints

__all__ = ['CheckpointManager', 'CheckpointSaveError', 'ResumePlan', 'TrainState', 'LoaderPosition', 'RNGStreams',
           'average_files', 'find_complete_checkpoints', 'load_average', 'rng_state', 'set_rng_state',
           'DEBUG_SAVE_PAUSE_ENV', 'SCOPES']

UNIVERSAL_SUFFIX = '.universal'
# Tests only: 'STEP:SECONDS' sleeps inside the save of STEP after the rank files are written and before the commit,
# so that a test can kill -9 the run mid-save.
DEBUG_SAVE_PAUSE_ENV = 'PRETRAIN_DEBUG_SAVE_PAUSE'
# Where a registered part is saved and when it is restored:
#   global    rank 0 writes it into trainer.pt; every rank loads it on every resume (same value on every rank)
#   per_rank  every rank writes it into rank_RRRRR.pt; loaded only at the same world size, else the part's
#             ``load_other_world_size(saved)`` (``saved``: its state from every saved rank) says what it did instead
#   average   a weight average (pretrain.common.ema.EMA): <name>_RRRRR.pt from rank 0, or from every rank when
#             ZeRO-3 partitions it; loaded from every saved rank's file (``load_state_dicts``), at any world size
SCOPES = ('global', 'per_rank', 'average')
_RESERVED = ('world_size', 'config')  # trainer.pt keys that are not parts
# Below this much free space, a save that failed without an errno (torch.save's "unexpected pos") is put down to a
# full disk.
_LOW_SPACE_BYTES = 64 << 20


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; every rank raises it with the same one-line message."""


@dataclass
class TrainState:
    """What the trainer needs to continue: counted in optimizer steps and images."""
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # images consumed over all ranks (including dropped non-finite micro-batches)
    epoch: int = 0
    epoch_samples: int = 0  # of samples_seen, those of the current epoch (to continue it at another world size)
    nonfinite_total: int = 0
    loss_scale_skips: int = 0  # fp16 steps the dynamic loss scaler skipped (gradient overflow)

    def state_dict(self) -> dict:
        return dict(step=self.step, samples_seen=self.samples_seen, epoch=self.epoch, epoch_samples=self.epoch_samples,
                    nonfinite_total=self.nonfinite_total, loss_scale_skips=self.loss_scale_skips)

    def load_state_dict(self, s: dict) -> None:
        self.step, self.samples_seen, self.epoch = int(s['step']), int(s['samples_seen']), int(s['epoch'])
        self.epoch_samples = int(s.get('epoch_samples', 0))
        self.nonfinite_total = int(s.get('nonfinite_total', 0))
        self.loss_scale_skips = int(s.get('loss_scale_skips', 0))


@dataclass
class ResumePlan:
    """Where and how to resume: ``mode`` is 'exact' (same world size), 'universal' (another world size, optimizer
    state kept through DeepSpeed's universal checkpoint) or 'weights_only' (another world size, fresh optimizer)."""
    step_dir: str
    step: int
    mode: str
    saved_world_size: int

    @property
    def ds_tag(self) -> str:
        return f'global_step{self.step}' + ('_universal' if self.mode == 'universal' else '')

    @property
    def universal_dir(self) -> str:
        """The folder beside the step folder that holds its universal conversion (``<tag>_universal/``)."""
        return self.step_dir.rstrip(os.sep) + UNIVERSAL_SUFFIX


class LoaderPosition:
    """The training loader's position as a per-rank part. At another world size :meth:`load_other_world_size`
    continues the saved epoch: in epoch mode with the samples no saved rank had read (from every saved rank's
    position), in resampled mode with fresh draws after the samples already seen in it (``train_state``'s count,
    loaded before the per-rank parts)."""

    def __init__(self, loader, train_state: TrainState):
        self.loader, self.train_state = loader, train_state

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            self.loader.load_state_dict(state)

    def load_other_world_size(self, saved: list) -> str:
        state = self.train_state
        if getattr(self.loader, 'continues_epochs', False) and state.epoch_samples:
            # resampled with samples_per_epoch: the rest of the epoch, drawn afresh, so it ends where it would
            self.loader.set_epoch(state.epoch, consumed=state.epoch_samples)
            return (f'data loader position (epoch {state.epoch} goes on with fresh draws after its '
                    f'{state.epoch_samples} samples already seen)')
        if getattr(getattr(self.loader, 'dataset', None), 'mode', None) == 'epoch' and None not in saved:
            try:  # the samples of the epoch that no saved rank had read, cut over this run's ranks
                return f'data loader position ({self.loader.load_other_world_size(saved)})'
            except ValueError as e:  # the saved positions cannot be mapped: fall back to the epoch's start
                self.loader.set_epoch(state.epoch)
                return f'data loader position (restarts the saved epoch: {e})'
        self.loader.set_epoch(state.epoch)
        return 'data loader position (restarts the saved epoch)'


class RNGStreams:
    """The torch / numpy / python (/ cuda) RNG states of this rank as a per-rank part; at another world size
    ``reseed()`` (called after the train state is loaded) derives fresh streams instead."""

    def __init__(self, reseed: Callable[[], None]):
        self.reseed = reseed

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)

    def load_other_world_size(self, saved: list) -> str:  # noqa: ARG002 - fresh streams, whatever was saved
        self.reseed()
        return 'RNG states (reseeded from seed, step and rank)'


def rng_state() -> dict:
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, fsync, rename: ``path`` is the whole old file or the whole new one."""
    tmp = f'{os.fspath(path)}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _average_file(name: str, rank: int) -> str:
    return f'{name}_{rank:05d}.pt'


def _rank_file(rank: int) -> str:
    """A rank's per-rank parts (``rank_RRRRR.pt``)."""
    return _average_file('rank', rank)


def average_files(step_dir: str | os.PathLike, name: str) -> list[str]:
    """The files of the weight average ``name`` (``ema``, ``teacher``) saved in ``step_dir``, in rank order: one
    per saved rank when it is partitioned (ZeRO-3), else rank 0's alone. ``[]`` when the folder holds none of them.

    Whether it is partitioned, and over how many ranks, is read from the saved state itself (memory-mapped, so the
    tensors are not read). Raises :class:`FileNotFoundError` naming the folder and the missing files when only
    some of the ranks' files are there."""
    step_dir = os.fspath(step_dir)
    pattern = re.compile(rf'^{re.escape(name)}_(\d{{5}})\.pt$')
    present = {int(m.group(1)): os.path.join(step_dir, f) for f in os.listdir(step_dir) if (m := pattern.match(f))}
    if not present:
        return []
    saved = safe_load(present[min(present)], mmap=True)
    partitioned = any(saved['partitioned'].values())
    ranks = int(saved['world_size']) if partitioned else 1
    missing = [_average_file(name, r) for r in range(ranks) if r not in present]
    if missing:
        how = f'partitioned over {ranks} ranks, one file each' if partitioned else 'saved by rank 0 alone'
        raise FileNotFoundError(f'{step_dir}: the {name} weights are incomplete ({how}): {len(missing)} of '
                                f'{ranks} files missing: {", ".join(missing[:8])}{" ..." if len(missing) > 8 else ""}')
    return [present[r] for r in range(ranks)]


def load_average(step_dir: str | os.PathLike, name: str) -> dict[str, torch.Tensor] | None:
    """The whole saved weight average ``name`` of ``step_dir`` as a state_dict (fp32, full shapes, ZeRO-3 partitions
    merged), or None when the folder holds none; raises like :func:`average_files` on an incomplete set."""
    from pretrain.common.ema import merge_saved_states

    files = average_files(step_dir, name)
    if not files:
        return None
    return merge_saved_states([safe_load(f) for f in files])


class CheckpointManager:
    """Saves and restores the DeepSpeed engine and every registered part; decides when to save; prunes to
    ``keep_last``. Collective methods (every rank calls them at the same point): :meth:`plan_resume`,
    :meth:`prepare_universal`, :meth:`load`, :meth:`save`, :meth:`maybe_save`.

    ``interval_steps`` / ``save_at_end`` / ``total_steps``: when :meth:`maybe_save` saves (``checkpoint.*`` of the
    config and the run's length in optimizer steps). ``config``: the resolved config, saved in ``trainer.pt`` and as
    ``config.yaml``. ``convert_timeout_s``: how long the other ranks wait for rank 0's universal conversion (None:
    derived from the checkpoint's size)."""

    def __init__(self, root: str, *, keep_last: int, rank: int, world_size: int, interval_steps: int | None = None,
                 save_at_end: bool = True, total_steps: int | None = None, config: dict | None = None,
                 convert_timeout_s: float | None = None, log=print):
        self.root, self.keep_last, self.rank, self.world_size, self.log = root, keep_last, rank, world_size, log
        self.interval_steps, self.save_at_end, self.total_steps = interval_steps, save_at_end, total_steps
        self.config, self.convert_timeout_s = config or {}, convert_timeout_s
        self.engine = None
        self.parts: dict[str, tuple[object, str]] = {}  # name -> (part, scope), in registration (= load) order
        self.last_committed: str | None = None  # the newest folder this run committed or resumed from
        self._sizes: dict[str, int] = {}  # step folder -> bytes (for the free-space check)
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            self._warn_if_short_of_space('the next save')
        edist.barrier()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, f'step_{step:08d}')

    def latest_complete(self) -> tuple[int, str] | None:
        found = find_complete_checkpoints(self.root)
        return found[-1] if found else None

    # --------------------------------------------------------------------------------------------------------------
    def register_engine(self, engine) -> None:
        """The DeepSpeed engine: model weights and ZeRO optimizer partitions (``global_step<N>/``)."""
        self.engine = engine

    def register(self, name: str, part, *, scope: str = 'global') -> None:
        """Add a stateful part under ``name`` (its key in the files; see :data:`SCOPES`). ``part`` has
        ``state_dict()`` and ``load_state_dict(state)`` (``load_state_dicts(states)`` for scope ``average``); a
        per-rank part may have ``load_other_world_size(saved: list) -> str``, what it does instead at another world size
        given its state from each saved rank in rank order (None where a rank file lacks it); the string is the
        report's note. Parts are loaded in registration order: register those others read from first."""
        if scope not in SCOPES:
            raise ValueError(f'checkpoint part {name!r}: scope {scope!r} is not one of {SCOPES}')
        if name in self.parts or name in _RESERVED or not re.fullmatch(r'[a-z][a-z0-9_]*', name):
            raise ValueError(f'checkpoint part {name!r}: taken, reserved or not a lower-case identifier')
        needs = ('state_dict', 'load_state_dicts' if scope == 'average' else 'load_state_dict')
        missing = [m for m in needs if not callable(getattr(part, m, None))]
        if missing:
            raise TypeError(f'checkpoint part {name!r} ({type(part).__name__}) has no {", ".join(missing)}')
        self.parts[name] = (part, scope)

    def _scoped(self, scope: str) -> dict:
        return {n: p for n, (p, s) in self.parts.items() if s == scope}

    # --------------------------------------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether :meth:`maybe_save` saves after optimizer step ``step``: every ``interval_steps``, and at
        ``total_steps`` when ``save_at_end``."""
        every = self.interval_steps and step % self.interval_steps == 0
        return bool(every or (self.save_at_end and step == self.total_steps))

    def maybe_save(self, step: int, *, force: bool = False) -> str | None:
        """Collective. Save after step ``step`` when :meth:`should_save` says so, or ``force`` (preemption, a run
        that stops early); returns the committed folder, else None."""
        if force or self.should_save(step):
            return self.save(step)
        return None

    def save(self, step: int) -> str:
        """Collective: commit a checkpoint of the engine and every registered part as ``step``. Returns the step
        folder. Raises :class:`CheckpointSaveError` on every rank when a write failed on any rank; the partial folder
        is removed and the previous checkpoints are untouched."""
        with watchdog.paused():  # an H-size save can outlast run.watchdog_min; the collective timeout still bounds it
            return self._save(step)

    def _save(self, step: int) -> str:
        if self.engine is None:
            raise RuntimeError('CheckpointManager.save: no engine registered (register_engine)')
        step_dir = self.step_dir(step)
        if os.path.isfile(os.path.join(step_dir, MARKER)):
            self.last_committed = step_dir
            return step_dir  # this step is already committed (e.g. the final save right after an interval save)
        failure = None
        if self.rank == 0:
            self._warn_if_short_of_space(f'the save of step {step}')
            try:
                if os.path.isdir(step_dir):
                    self._remove(step_dir)  # leftovers of a crashed save of this same step
                os.makedirs(step_dir)
            except OSError as e:
                failure = e
        self._agree_or_raise(failure, step, step_dir)
        t0 = time.time()
        try:
            self.engine.save_checkpoint(step_dir, tag=f'global_step{step}', save_latest=False)
        except Exception as e:  # noqa: BLE001 - any failed write (torch.save reports ENOSPC as a RuntimeError)
            failure = e
            # DeepSpeed 0.19.8's save_checkpoint does its collectives (barrier, tag check, ZeRO-3 gather) before its
            # file writes and one barrier after them: stand in for that barrier so the other ranks get out of it.
            edist.barrier()
        if failure is None:
            try:
                self._write_parts(step_dir)
            except Exception as e:  # noqa: BLE001 - as above
                failure = e
        pause = os.environ.get(DEBUG_SAVE_PAUSE_ENV, '')
        if pause and int(pause.split(':')[0]) == step:
            time.sleep(float(pause.split(':')[1]))
        self._agree_or_raise(failure, step, step_dir)  # also the barrier: every rank's files are on disk
        if self.rank == 0:
            marker = {'step': step, 'world_size': self.world_size, 'time': time.time(),
                      'save_seconds': time.time() - t0, 'parts': sorted(self.parts)}
            train_state = self._scoped('global').get('train_state')
            if train_state is not None:
                marker['samples_seen'] = train_state.samples_seen
            tmp = os.path.join(step_dir, MARKER + '.tmp')
            with open(tmp, 'w') as f:
                json.dump(marker, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(step_dir, MARKER))
            _fsync_dir(step_dir)
            self._prune(keep=step_dir)
        edist.barrier()
        self.last_committed = step_dir
        self.log(f'checkpoint committed: {step_dir}')
        return step_dir

    def _write_parts(self, step_dir: str) -> None:
        per_rank = {n: p.state_dict() for n, p in self._scoped('per_rank').items()}
        atomic_torch_save({**per_rank, 'rank': self.rank, 'world_size': self.world_size},
                          os.path.join(step_dir, _rank_file(self.rank)))
        for name, avg in self._scoped('average').items():
            if self.rank == 0 or any(avg.partitioned.values()):
                atomic_torch_save(avg.state_dict(), os.path.join(step_dir, _average_file(name, self.rank)))
        if self.rank == 0:
            import yaml

            atomic_torch_save({**{n: p.state_dict() for n, p in self._scoped('global').items()},
                               'world_size': self.world_size, 'config': self.config},
                              os.path.join(step_dir, 'trainer.pt'))
            with open(os.path.join(step_dir, 'config.yaml'), 'w') as f:
                yaml.safe_dump(self.config, f, sort_keys=False)

    def _agree_or_raise(self, failure: BaseException | None, step: int, step_dir: str) -> None:
        """Collective: returns when no rank failed; else every rank raises the same :class:`CheckpointSaveError`,
        after rank 0 removed the partial ``step_dir``."""
        mine = _describe_failure(failure, self.root) if failure is not None else None
        if edist.all_reduce_max(0.0 if mine is None else 1.0) == 0:
            return
        everyone = [mine]
        if dist.is_initialized() and self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, mine)
        failed = [(r, m) for r, m in enumerate(everyone) if m is not None]
        removed = 'no partial folder was left'
        if self.rank == 0 and os.path.isdir(step_dir):
            try:
                self._remove(step_dir)
                removed = f'the partial folder {step_dir} was removed'
            except OSError as e:
                removed = f'the partial folder {step_dir} (no {MARKER} marker, never resumed from) could not be ' \
                          f'removed: {e}'
        box = [removed]
        if dist.is_initialized() and self.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        last = self.last_committed or (self.latest_complete() or (None, None))[1]
        ranks = '; '.join(f'rank {r}: {m}' for r, m in failed[:2]) + (f'; {len(failed) - 2} more ranks failed'
                                                                          if len(failed) > 2 else '')
        raise CheckpointSaveError(f'checkpoint save of step {step} failed on {len(failed)} of {self.world_size} '
                                  f'ranks ({ranks}); {box[0]}; last complete checkpoint: {last or "none"}')

    def _warn_if_short_of_space(self, what: str) -> None:
        # Rank 0 only: older checkpoints are pruned after a commit, so the next save needs the space of a whole one.
        latest = self.latest_complete()
        if latest is None:
            return
        path = latest[1]
        if path not in self._sizes:
            self._sizes[path] = _folder_bytes(path)
        need, usage = self._sizes[path], shutil.disk_usage(self.root)
        if usage.free < need:
            self.log(f'warning: {what} will probably fail: {_mib(usage.free)} free on {_mount_point(self.root)}, '
                     f'but the last checkpoint ({path}) takes {_mib(need)} (older ones are pruned only after a '
                     'new one commits)')

    def _remove(self, path: str) -> None:
        # Rename first so that a half-deleted folder never looks like a step folder.
        trash = os.path.join(self.root, f'.trash_{os.path.basename(path)}_{os.getpid()}_{time.time_ns()}')
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self, keep: str) -> None:
        complete = find_complete_checkpoints(self.root)
        for _, path in complete[:-self.keep_last]:
            if path != keep:
                self._remove(path)
        newest = complete[-1][0] if complete else -1
        for name in os.listdir(self.root):
            m = STEP_DIR.match(name.removesuffix(UNIVERSAL_SUFFIX))
            path = os.path.join(self.root, name)
            # incomplete folders older than the newest commit are crash leftovers; a universal conversion served
            # its one resume once a newer checkpoint exists
            stale = not os.path.isfile(os.path.join(path, MARKER)) or name.endswith(UNIVERSAL_SUFFIX)
            if m and int(m.group(1)) < newest and stale:
                self._remove(path)
            elif name.startswith('.trash_'):
                shutil.rmtree(path, ignore_errors=True)

    # --------------------------------------------------------------------------------------------------------------
    def plan_resume(self, resume: str, on_world_size_change: str) -> ResumePlan | None:
        """Collective. Decide before the engine is built (a universal load needs ``checkpoint.load_universal`` in its
        config). Rank 0 chooses and broadcasts; every rank then checks that it sees the chosen folder committed.

        ``resume``: 'auto' = the newest complete checkpoint under root (None if there is none), 'none' (a fresh
        start: refused when root already holds a complete checkpoint, whose folder the new run's saves would mix
        with), or a step folder. Raises (on every rank) if the folder is not complete, some rank does not see it,
        the world size changed and the policy is 'error', or 'none' meets an earlier run's checkpoints."""
        choice: dict | None = None
        if self.rank == 0:
            try:
                choice = self._refuse_fresh_start() if resume == 'none' else self._choose(resume)
            except (OSError, ValueError, KeyError) as e:
                choice = {'error': f'{type(e).__name__}: {e}'}
        if dist.is_initialized() and self.world_size > 1:
            box = [choice]
            dist.broadcast_object_list(box, src=0)
            choice = box[0]
        if choice is None:
            return None
        if 'refused' in choice:
            raise RuntimeError(choice['refused'])
        if 'error' in choice:
            raise FileNotFoundError(f'resume ({resume}): rank 0: {choice["error"]}')
        step_dir = choice['step_dir'] if resume != 'auto' else self.step_dir(choice['step'])
        # Every rank must load the same step: one that sees another newest folder (a file system out of step)
        # stops the run with rank 0's choice named, instead of resuming elsewhere.
        mine = None
        try:
            with open(os.path.join(step_dir, MARKER)) as f:
                if int(json.load(f)['step']) != choice['step']:
                    mine = f'its {step_dir}/{MARKER} names another step'
        except (OSError, ValueError, KeyError) as e:
            mine = f'cannot read {step_dir}/{MARKER} ({type(e).__name__}: {e})'
        everyone = [mine]
        if dist.is_initialized() and self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, mine)
        bad = [f'rank {r} {m}' for r, m in enumerate(everyone) if m is not None]
        if bad:
            raise RuntimeError(f'rank 0 chose to resume from step {choice["step"]} ({step_dir}), but '
                               f'{"; ".join(bad[:4])}: every rank must see the same checkpoint folder (one node, or '
                               'a shared file system)')
        saved_world, step = choice['world_size'], choice['step']
        if saved_world == self.world_size:
            mode = 'exact'
        elif on_world_size_change == 'error':
            raise RuntimeError(f'{step_dir} was saved by {saved_world} ranks, this run has {self.world_size}; set '
                               'checkpoint.on_world_size_change=universal or weights_only')
        else:
            mode = on_world_size_change
        return ResumePlan(step_dir, step, mode, saved_world)

    def _refuse_fresh_start(self) -> dict | None:
        latest = self.latest_complete()
        if latest is None:
            return None
        return {'refused': f'checkpoint.resume=none, but {self.root} already holds complete checkpoints (newest: step '
                           f'{latest[0]}, {latest[1]}); this run\'s saves would mix with them. Continue that run '
                           'with checkpoint.resume=auto, or start afresh in another run.output_dir (or remove '
                           'the old checkpoints)'}

    def _choose(self, resume: str) -> dict | None:
        if resume == 'auto':
            latest = self.latest_complete()
            if latest is None:
                return None
            step_dir = latest[1]
        else:
            step_dir = resume
            if not os.path.isfile(os.path.join(step_dir, MARKER)):
                raise FileNotFoundError(f'{step_dir} is not a complete checkpoint (no {MARKER} marker)')
        with open(os.path.join(step_dir, MARKER)) as f:
            marker = json.load(f)
        return {'step_dir': step_dir, 'step': int(marker['step']), 'world_size': int(marker['world_size'])}

    def prepare_universal(self, plan: ResumePlan) -> None:
        """Collective. Rank 0 converts the DeepSpeed save to a universal checkpoint in ``plan.universal_dir`` (once;
        kept until a newer checkpoint commits). The other ranks wait for its result by polling the file system, not
        in a collective whose timeout a long conversion could exceed; they give up, with an error, after
        ``convert_timeout_s`` (or a bound derived from the checkpoint's size), and they say every minute that they
        wait. A failed conversion stops every rank with its error."""
        if plan.mode != 'universal':
            return
        out = os.path.join(plan.universal_dir, plan.ds_tag)
        done, failed = os.path.join(out, '.converted'), os.path.join(plan.universal_dir, 'FAILED')
        src = os.path.join(plan.step_dir, f'global_step{plan.step}')
        if self.rank == 0 and os.path.exists(failed):
            os.unlink(failed)  # an earlier attempt's
        edist.barrier()  # quick: no rank reads a stale FAILED
        if self.rank == 0 and not os.path.isfile(done):
            os.makedirs(plan.universal_dir, exist_ok=True)  # FAILED goes there, whatever fails first
            try:
                check_folder(src)  # ds_to_universal unpickles unrestricted
                self._convert(src, plan, out)
            except Exception as e:
                with open(failed, 'w') as f:
                    f.write(f'{type(e).__name__}: {e}'.replace('\n', ' ')[:4000])
                raise
        elif self.rank != 0:
            bound = self.convert_timeout_s or _conversion_bound_s(_folder_bytes(src))
            t0 = last_said = time.time()
            while not os.path.isfile(done):
                if os.path.isfile(failed):
                    with open(failed) as f:
                        raise RuntimeError(f'rank 0 could not convert {src} to a universal checkpoint: {f.read()}')
                if time.time() - t0 > bound:
                    raise TimeoutError(f'rank {self.rank}: rank 0\'s universal conversion of {src} did not finish in '
                                       f'{bound / 60:.0f} min (no {done}); see rank 0\'s log')
                if time.time() - last_said >= 60:
                    print(f'[pretrain rank {self.rank}] waiting for rank 0\'s universal conversion of {src}: '
                          f'{(time.time() - t0) / 60:.0f} of at most {bound / 60:.0f} min', flush=True)
                    last_said = time.time()
                time.sleep(1.0)
        edist.barrier()  # quick: every rank is past the conversion

    def _convert(self, src: str, plan: ResumePlan, out: str) -> None:
        os.makedirs(plan.universal_dir, exist_ok=True)
        tmp = out + '.tmp'
        shutil.rmtree(tmp, ignore_errors=True)
        # ds_to_universal extracts one saved rank's optimizer shard per worker, then merges per parameter
        workers = max(1, min(8, os.cpu_count() or 1))
        self.log(f'converting {src} ({plan.saved_world_size} ranks) to a universal checkpoint for '
                 f'{self.world_size} ranks in {plan.universal_dir} ({workers} workers)')
        t0 = time.time()
        # --inject_missing_state: ZeRO 1/2 saves carry no universal_checkpoint_info unless the model sets one
        # (Megatron's tensor-parallel patterns); ours is data-parallel only, so the bare version is the right one.
        cmd = [sys.executable, '-m', 'deepspeed.checkpoint.ds_to_universal', '--input_folder', src,
               '--output_folder', tmp, '--num_extract_workers', str(min(workers, plan.saved_world_size)),
               '--num_merge_workers', str(workers), '--inject_missing_state']
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f'ds_to_universal failed ({res.returncode}):\n{res.stdout[-3000:]}\n'
                               f'{res.stderr[-3000:]}')
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        with open(os.path.join(out, '.converted'), 'w') as f:
            f.write(f'{time.time() - t0:.1f} s\n')
        self.log(f'universal conversion done in {time.time() - t0:.1f} s')

    # --------------------------------------------------------------------------------------------------------------
    def load(self, plan: ResumePlan) -> dict:
        """Collective. Restore the engine and every registered part as far as the plan allows. Returns a report
        dict: mode, step, from, not_restored (what was not restored, and what was done instead)."""
        report: dict = {'mode': plan.mode, 'step': plan.step, 'from': plan.step_dir, 'not_restored': []}
        if plan.mode == 'weights_only':
            # DeepSpeed's ZeRO-3 module-only load consolidates through zero_to_fp32 without the tag, i.e. it reads
            # <dir>/latest. A private folder holds that file and a link to the save, so the committed folder is
            # not written.
            with tempfile.TemporaryDirectory(prefix='weights_only_') as side:
                with open(os.path.join(side, 'latest'), 'w') as f:
                    f.write(plan.ds_tag)
                check_folder(os.path.join(plan.step_dir, plan.ds_tag))  # DeepSpeed unpickles unrestricted
                os.symlink(os.path.abspath(os.path.join(plan.step_dir, plan.ds_tag)), os.path.join(side, plan.ds_tag))
                self.engine.load_checkpoint(side, tag=plan.ds_tag, load_module_only=True,
                                            load_optimizer_states=False, load_lr_scheduler_states=False)
            report['not_restored'].append('optimizer state (weights-only restart at a new world size)')
        else:
            load_dir = plan.universal_dir if plan.mode == 'universal' else plan.step_dir
            check_folder(os.path.join(load_dir, plan.ds_tag))  # DeepSpeed unpickles unrestricted
            path, _ = self.engine.load_checkpoint(load_dir, tag=plan.ds_tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f'DeepSpeed could not load {load_dir}/{plan.ds_tag}')
            _unalias_optimizer_steps(self.engine)
        saved = safe_load(os.path.join(plan.step_dir, 'trainer.pt'))
        legacy = saved.get('train_state', {}).get('extra', {})  # older saves kept some parts (sparsity) there
        for name, part in self._scoped('global').items():
            state = saved.get(name, legacy.get(name))
            if state is None:
                report['not_restored'].append(f'{name} (not in the checkpoint; starts afresh)')
            else:
                part.load_state_dict(state)
        per_rank = self._scoped('per_rank')
        if plan.mode == 'exact':
            mine = safe_load(os.path.join(plan.step_dir, _rank_file(self.rank)))
            for name, part in per_rank.items():
                if name in mine:
                    part.load_state_dict(mine[name])
                else:
                    report['not_restored'].append(f'{name} (not in the checkpoint; starts afresh)')
        elif per_rank:
            saved = self._read_saved_ranks(plan)
            for name, part in per_rank.items():
                other = getattr(part, 'load_other_world_size', None)
                report['not_restored'].append(other([s.get(name) for s in saved]) if other is not None else
                                              f'{name} (saved per rank by {plan.saved_world_size} ranks)')
        for name, avg in self._scoped('average').items():
            files = average_files(plan.step_dir, name)  # raises on an incomplete set
            if not files:
                report['not_restored'].append(f'{name} (not in the checkpoint; restarted from the current weights)')
                continue
            if plan.mode == 'exact' and len(files) > 1:
                # Partitioned at the same world size: only this rank's partition is needed; the others are
                # placeholders in order.
                own = safe_load(files[self.rank])
                states = [own if r == self.rank else _like_partition(own) for r in range(len(files))]
            else:
                states = [safe_load(f) for f in files]
            avg.load_state_dicts(states)
        self.last_committed = plan.step_dir
        return report

    def _read_saved_ranks(self, plan: ResumePlan) -> list[dict]:
        """Collective. Every saved rank's ``rank_*.pt`` (a resume at another world size): rank 0 reads them and
        broadcasts, so the shared file system serves N reads, not one per saved rank on every rank. Rank 0's read
        error is raised on every rank (the others with its message), none is left waiting."""
        paths = [os.path.join(plan.step_dir, _rank_file(r)) for r in range(plan.saved_world_size)]
        if not (dist.is_initialized() and self.world_size > 1):
            return [safe_load(p) for p in paths]
        box: list = [None]
        error = None
        if self.rank == 0:
            try:
                box[0] = ('ok', [safe_load(p) for p in paths])
            except Exception as e:  # noqa: BLE001 - told to every rank, then raised here as it was
                error, box[0] = e, ('error', f'{type(e).__name__}: {e}')
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        status, value = box[0]
        if status == 'error':
            raise RuntimeError(f'rank 0 could not read the per-rank states saved in {plan.step_dir}: {value}')
        return value


def _folder_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _mib(n: float) -> str:
    return f'{n / 2 ** 20:.1f} MiB'


def _mount_point(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _conversion_bound_s(saved_bytes: int) -> float:
    # How long the other ranks wait for rank 0's ds_to_universal: 30 min plus 300 s per GiB saved, 3x the slope
    # benchmarks/universal_conversion.py measured on a loaded 2-core machine (InternImage-H: ~100 min; docs/ENGINE.md).
    return 1800.0 + 300.0 * saved_bytes / 2 ** 30


def _describe_failure(exc: BaseException, path: str) -> str:
    """One line: the cause of a failed write (ENOSPC named, with the free space on ``path``'s file system)."""
    code = None
    e: BaseException | None = exc
    while e is not None and code is None:
        code = e.errno if isinstance(e, OSError) and e.errno else None
        e = e.__cause__ or e.__context__
    try:
        usage = shutil.disk_usage(path)
        space = f'{_mib(usage.free)} free of {_mib(usage.total)} on {_mount_point(path)}'
        low = usage.free < _LOW_SPACE_BYTES
    except OSError:
        space, low = 'free space unknown', False
    detail = ' '.join(str(exc).split())[:160]
    if code == errno.ENOSPC or (code is None and low):
        return f'ENOSPC, no space left on device: {space} ({type(exc).__name__}: {detail})'
    if code is not None:
        return f'{errno.errorcode.get(code, code)}, {os.strerror(code)}: {space} ({type(exc).__name__}: {detail})'
    return f'{type(exc).__name__}: {detail} ({space})'


def _unalias_optimizer_steps(engine) -> None:
    # DeepSpeed 0.19.8's ZeRO-3 universal load gives every sub-group's state the same 'step' tensor object
    # (stage3.py load_hp_checkpoint_state_from_checkpoint_dir_stage3); torch's AdamW increments it in place once per
    # sub-group, so the step count (and with it Adam's bias correction) would run ahead. One tensor per state.
    inner = getattr(getattr(engine, 'optimizer', None), 'optimizer', None)
    for st in getattr(inner, 'state', {}).values():
        if isinstance(st, dict) and torch.is_tensor(st.get('step')):
            st['step'] = st['step'].clone()


def _like_partition(state: dict) -> dict:
    # Stand-in for another rank's EMA state: zero partitions of the same sizes (so the concatenation lines up) and
    # this rank's own whole (non-partitioned) entries, which are the same on every rank.
    return {**state, 'shadow': {k: torch.zeros_like(v) if state['partitioned'][k] else v
                                for k, v in state['shadow'].items()}}
