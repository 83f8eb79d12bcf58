"""The one place that owns checkpoint atomicity.

Layout (``root = <output_dir>/checkpoints``, a folder every rank sees)::

    root/step_00000120/
        global_step120/            DeepSpeed's sharded save (model + ZeRO optimizer partitions, one file per rank)
        global_step120_universal/  made on demand when resuming at another world size (ds_to_universal)
        zero_to_fp32.py            copied by DeepSpeed (consolidates fp32 weights offline)
        rank_00000.pt ...          per rank: data loader state, RNG states
        ema_00000.pt ...           per rank: EMA (its ZeRO-3 partition, or the whole EMA on rank 0 otherwise)
        teacher_00000.pt ...       the same for the MIM teacher (an EMA of the backbone), when the objective has one
        trainer.pt                 rank 0: step, samples seen, epoch, scheduler, counters, world size, config
        config.yaml                the resolved config, for people
        COMPLETE                   commit marker (JSON), written last

Save: every rank writes its files (each via temp file + rename), a barrier, then rank 0 writes ``COMPLETE`` via
rename. A step folder without ``COMPLETE`` (a crash mid-save, kill -9) is never resumed from; it is deleted when the
run saves that step again or prunes. DeepSpeed's own ``latest`` file is not used: it is written before every rank
has finished (pipeline-anchors.md §4.4).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pretrain.engine import dist as edist

__all__ = ['CheckpointManager', 'ResumePlan', 'TrainState', 'average_files', 'find_complete_checkpoints',
           'load_average', 'rng_state', 'set_rng_state', 'DEBUG_SAVE_PAUSE_ENV']

MARKER = 'COMPLETE'
STEP_DIR = re.compile(r'^step_(\d{8})$')
# Tests only: 'STEP:SECONDS' sleeps inside the save of STEP after the rank files are written and before the commit,
# so that a test can kill -9 the run mid-save.
DEBUG_SAVE_PAUSE_ENV = 'PRETRAIN_DEBUG_SAVE_PAUSE'


@dataclass
class TrainState:
    """What the trainer needs to continue: counted in optimizer steps and images."""
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # images consumed over all ranks (including dropped non-finite micro-batches)
    epoch: int = 0
    epoch_samples: int = 0  # of samples_seen, those of the current epoch (to continue it at another world size)
    nonfinite_total: int = 0
    loss_scale_skips: int = 0  # fp16 steps the dynamic loss scaler skipped (gradient overflow)
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return dict(step=self.step, samples_seen=self.samples_seen, epoch=self.epoch, epoch_samples=self.epoch_samples,
                    nonfinite_total=self.nonfinite_total, loss_scale_skips=self.loss_scale_skips,
                    extra=dict(self.extra))

    def load_state_dict(self, s: dict) -> None:
        self.step, self.samples_seen, self.epoch = int(s['step']), int(s['samples_seen']), int(s['epoch'])
        self.epoch_samples = int(s.get('epoch_samples', 0))
        self.nonfinite_total = int(s.get('nonfinite_total', 0))
        self.loss_scale_skips = int(s.get('loss_scale_skips', 0))
        self.extra = dict(s.get('extra', {}))


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


def find_complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """``[(step, folder)]`` of committed checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, MARKER)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def _average_file(name: str, rank: int) -> str:
    return f'{name}_{rank:05d}.pt'


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
    saved = torch.load(present[min(present)], map_location='cpu', weights_only=True, mmap=True)
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
    from pretrain.engine.ema import merge_saved_states

    files = average_files(step_dir, name)
    if not files:
        return None
    return merge_saved_states([torch.load(f, map_location='cpu', weights_only=True) for f in files])


class CheckpointManager:
    """Saves and restores the engine, our trainer state, data loader, RNG and EMA; prunes to ``keep_last``."""

    def __init__(self, root: str, *, keep_last: int, rank: int, world_size: int, log=print):
        self.root, self.keep_last, self.rank, self.world_size, self.log = root, keep_last, rank, world_size, log
        if rank == 0:
            os.makedirs(root, exist_ok=True)
        edist.barrier()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, f'step_{step:08d}')

    def latest_complete(self) -> tuple[int, str] | None:
        found = find_complete_checkpoints(self.root)
        return found[-1] if found else None

    # --------------------------------------------------------------------------------------------------------------
    def plan_resume(self, resume: str, on_world_size_change: str) -> ResumePlan | None:
        """Decide before the engine is built (a universal load needs ``checkpoint.load_universal`` in its config).

        ``resume``: 'auto' = the newest complete checkpoint under root (None if there is none), 'none', or a step
        folder. Raises if the folder is not complete or the world size changed and the policy is 'error'.
        """
        if resume == 'none':
            return None
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
        saved_world, step = int(marker['world_size']), int(marker['step'])
        if saved_world == self.world_size:
            mode = 'exact'
        elif on_world_size_change == 'error':
            raise RuntimeError(f'{step_dir} was saved by {saved_world} ranks, this run has {self.world_size}; set '
                               'checkpoint.on_world_size_change=universal or weights_only')
        else:
            mode = on_world_size_change
        return ResumePlan(step_dir, step, mode, saved_world)

    def prepare_universal(self, plan: ResumePlan) -> None:
        """Rank 0 converts the DeepSpeed save to a universal checkpoint (once; kept beside it); all ranks wait."""
        if plan.mode != 'universal':
            return
        out = os.path.join(plan.step_dir, plan.ds_tag)
        if self.rank == 0 and not os.path.isfile(os.path.join(out, '.converted')):
            src = os.path.join(plan.step_dir, f'global_step{plan.step}')
            tmp = out + '.tmp'
            shutil.rmtree(tmp, ignore_errors=True)
            self.log(f'converting {src} ({plan.saved_world_size} ranks) to a universal checkpoint for '
                     f'{self.world_size} ranks')
            # --inject_missing_state: ZeRO 1/2 saves carry no universal_checkpoint_info unless the model sets one
            # (Megatron's tensor-parallel patterns); ours is data-parallel only, so the bare version is the right one.
            cmd = [sys.executable, '-m', 'deepspeed.checkpoint.ds_to_universal', '--input_folder', src,
                   '--output_folder', tmp, '--num_extract_workers', '1', '--num_merge_workers', '1',
                   '--inject_missing_state']
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f'ds_to_universal failed ({res.returncode}):\n{res.stdout[-3000:]}\n'
                                   f'{res.stderr[-3000:]}')
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            with open(os.path.join(out, '.converted'), 'w') as f:
                f.write('ok\n')
        edist.barrier()

    # --------------------------------------------------------------------------------------------------------------
    def save(self, engine, state: TrainState, *, scheduler, loader, averages: dict, config: dict) -> str:
        """Collective: every rank calls it. ``averages``: named :class:`~pretrain.engine.ema.EMA` objects (``ema``,
        ``teacher``; None entries are skipped), saved as ``<name>_<rank>.pt``. Returns the committed step folder."""
        averages = {k: v for k, v in averages.items() if v is not None}
        step_dir = self.step_dir(state.step)
        if os.path.isfile(os.path.join(step_dir, MARKER)):
            return step_dir  # this step is already committed (e.g. the final save right after an interval save)
        if self.rank == 0 and os.path.isdir(step_dir):
            self._remove(step_dir)  # leftovers of a crashed save of this same step
        edist.barrier()
        t0 = time.time()
        engine.save_checkpoint(step_dir, tag=f'global_step{state.step}', save_latest=False)
        atomic_torch_save({'loader': loader.state_dict() if loader is not None else None, 'rng': rng_state(),
                            'rank': self.rank, 'world_size': self.world_size},
                           os.path.join(step_dir, f'rank_{self.rank:05d}.pt'))
        for name, avg in averages.items():
            if self.rank == 0 or any(avg.partitioned.values()):
                atomic_torch_save(avg.state_dict(), os.path.join(step_dir, _average_file(name, self.rank)))
        if self.rank == 0:
            import yaml
            atomic_torch_save({'train_state': state.state_dict(), 'scheduler': scheduler.state_dict(),
                                'world_size': self.world_size, 'config': config},
                               os.path.join(step_dir, 'trainer.pt'))
            with open(os.path.join(step_dir, 'config.yaml'), 'w') as f:
                yaml.safe_dump(config, f, sort_keys=False)
        pause = os.environ.get(DEBUG_SAVE_PAUSE_ENV, '')
        if pause and int(pause.split(':')[0]) == state.step:
            time.sleep(float(pause.split(':')[1]))
        edist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            marker = {'step': state.step, 'world_size': self.world_size, 'samples_seen': state.samples_seen,
                      'time': time.time(), 'save_seconds': time.time() - t0}
            tmp = os.path.join(step_dir, MARKER + '.tmp')
            with open(tmp, 'w') as f:
                json.dump(marker, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(step_dir, MARKER))
            _fsync_dir(step_dir)
            self._prune(keep=step_dir)
        edist.barrier()
        return step_dir

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
            m = STEP_DIR.match(name)
            path = os.path.join(self.root, name)
            # incomplete folders older than the newest commit are crash leftovers
            if m and int(m.group(1)) < newest and not os.path.isfile(os.path.join(path, MARKER)):
                self._remove(path)
            elif name.startswith('.trash_'):
                shutil.rmtree(path, ignore_errors=True)

    # --------------------------------------------------------------------------------------------------------------
    def load(self, plan: ResumePlan, engine, state: TrainState, *, scheduler, loader, averages: dict) -> dict:
        """Restore everything the plan allows. Returns a report dict (mode, step, what was not restored)."""
        report: dict = {'mode': plan.mode, 'step': plan.step, 'from': plan.step_dir, 'not_restored': []}
        if plan.mode == 'weights_only':
            # DeepSpeed's ZeRO-3 module-only load consolidates through zero_to_fp32 without the tag, i.e. it reads
            # <dir>/latest; point it at this step folder's own save.
            latest = os.path.join(plan.step_dir, 'latest')
            if self.rank == 0 and not os.path.isfile(latest):
                with open(latest + '.tmp', 'w') as f:
                    f.write(plan.ds_tag)
                os.replace(latest + '.tmp', latest)
            edist.barrier()
            engine.load_checkpoint(plan.step_dir, tag=plan.ds_tag, load_module_only=True,
                                   load_optimizer_states=False, load_lr_scheduler_states=False)
            report['not_restored'].append('optimizer state (weights-only restart at a new world size)')
        else:
            path, _ = engine.load_checkpoint(plan.step_dir, tag=plan.ds_tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f'DeepSpeed could not load {plan.step_dir}/{plan.ds_tag}')
            _unalias_optimizer_steps(engine)
        trainer = torch.load(os.path.join(plan.step_dir, 'trainer.pt'), map_location='cpu', weights_only=False)
        state.load_state_dict(trainer['train_state'])
        scheduler.load_state_dict(trainer['scheduler'])
        if plan.mode == 'exact':
            mine = torch.load(os.path.join(plan.step_dir, f'rank_{self.rank:05d}.pt'), map_location='cpu',
                              weights_only=False)
            if loader is not None and mine['loader'] is not None:
                loader.load_state_dict(mine['loader'])
            set_rng_state(mine['rng'])
        else:
            report['not_restored'].append('RNG states (reseeded from seed, step and rank)')
            if loader is not None and getattr(loader, 'continues_epochs', False) and state.epoch_samples:
                # resampled with samples_per_epoch: the rest of the epoch, drawn afresh, so it ends where it would
                loader.set_epoch(state.epoch, consumed=state.epoch_samples)
                report['not_restored'].insert(0, f'data loader position (epoch {state.epoch} goes on with fresh '
                                                 f'draws after its {state.epoch_samples} samples already seen)')
            else:
                report['not_restored'].insert(0, 'data loader position (restarts the saved epoch)')
                if loader is not None:
                    loader.set_epoch(state.epoch)
        for name, avg in averages.items():
            if avg is None:
                continue
            files = average_files(plan.step_dir, name)  # raises on an incomplete set
            if not files:
                report['not_restored'].append(f'{name} (not in the checkpoint; restarted from the current weights)')
                continue
            if plan.mode == 'exact' and len(files) > 1:
                # Partitioned at the same world size: only this rank's partition is needed; the others are
                # placeholders in order.
                own = torch.load(files[self.rank], map_location='cpu', weights_only=False)
                states = [own if r == self.rank else _like_partition(own) for r in range(len(files))]
            else:
                states = [torch.load(f, map_location='cpu', weights_only=False) for f in files]
            avg.load_state_dicts(states)
        return report


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
