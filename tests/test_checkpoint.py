"""Checkpointing: the registry of parts, when to save, the ranks agreeing on the step they resume from, a full disk,
and one run per output folder.

The 2-rank tests start real processes: ``torchrun`` on this file's ``__main__`` worker (gloo, no model) where the
checkpointer or the lock is the subject, and ``python -m pretrain train`` where the whole run is.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.engine.checkpoint import MARKER, CheckpointManager, TrainState, _describe_failure
from tests.test_engine import REPO, _env, _torchrun, kill_run, run_procs, stage_config

# ----------------------------------------------------------------------------------------------------------------
# one process


def test_parts_register_once_with_a_known_scope_and_the_methods_it_needs(tmp_path):
    ckpt = CheckpointManager(str(tmp_path), keep_last=2, rank=0, world_size=1)
    ckpt.register('train_state', TrainState())
    with pytest.raises(ValueError, match="'train_state': taken"):
        ckpt.register('train_state', TrainState())
    with pytest.raises(ValueError, match="'config': taken, reserved"):
        ckpt.register('config', TrainState())
    with pytest.raises(ValueError, match="scope 'node'"):
        ckpt.register('other', TrainState(), scope='node')
    with pytest.raises(TypeError, match="'ema' .*has no load_state_dicts"):
        ckpt.register('ema', TrainState(), scope='average')  # a weight average loads every saved rank's file
    with pytest.raises(RuntimeError, match='no engine registered'):
        ckpt.save(1)


def test_the_checkpointer_decides_when_to_save(tmp_path):
    ckpt = CheckpointManager(str(tmp_path), keep_last=2, rank=0, world_size=1, interval_steps=4, save_at_end=True,
                             total_steps=10)
    assert [s for s in range(1, 11) if ckpt.should_save(s)] == [4, 8, 10]
    ckpt.save_at_end = False
    assert [s for s in range(1, 11) if ckpt.should_save(s)] == [4, 8]
    assert ckpt.maybe_save(5) is None  # not due: nothing is written, no engine needed


def test_a_failed_write_is_described_with_its_cause_and_the_free_space(tmp_path):
    enospc = _describe_failure(OSError(errno.ENOSPC, 'No space left on device'), str(tmp_path))
    assert enospc.startswith('ENOSPC, no space left on device: ') and ' MiB free of ' in enospc
    # torch.save reports a full disk as a RuntimeError without errno; with plenty of space left it is not ENOSPC
    other = _describe_failure(RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 7 vs 5'),
                              str(tmp_path))
    assert other.startswith('RuntimeError: [enforce fail') and 'ENOSPC' not in other
    eio = _describe_failure(RuntimeError('save failed'), str(tmp_path))
    assert 'MiB free of' in eio and '\n' not in eio


def test_a_fresh_start_is_refused_where_an_earlier_run_left_checkpoints(tmp_path):
    ckpt = CheckpointManager(str(tmp_path), keep_last=2, rank=0, world_size=1)
    assert ckpt.plan_resume('none', 'error') is None  # nothing there: a fresh start
    (tmp_path / 'step_00000003').mkdir()  # a partial folder (no marker) is not an earlier run's checkpoint
    assert ckpt.plan_resume('none', 'error') is None
    _commit(tmp_path, 5, world_size=1)
    with pytest.raises(RuntimeError, match=r'checkpoint\.resume=none, but .* step 5.*checkpoint\.resume=auto'):
        ckpt.plan_resume('none', 'error')
    assert ckpt.plan_resume('auto', 'error').step == 5


def test_launch_status_finds_the_newest_checkpoint_without_importing_torch(tmp_path):
    """``launch status`` runs on login nodes, often in a loop: the folder layout is read without torch."""
    out = tmp_path / 'run' / 'stages' / 'train' / 'out'
    for step in (4, 8):
        _commit(out / 'checkpoints', step)
    (out / 'checkpoints' / 'step_00000012').mkdir()  # a save that did not finish
    (tmp_path / 'run' / 'run.json').write_text(json.dumps({'name': 'r', 'mode': 'local', 'stages': [
        {'name': 'train', 'job_ids': []}]}))
    probe = ('import sys, json; from launch.run import open_run; from launch.status import collect; '
             'row = collect(open_run(sys.argv[1]), query=False)[0]; '
             'print(json.dumps([row["checkpoint_step"], "torch" in sys.modules]))')
    r = subprocess.run([sys.executable, '-c', probe, str(tmp_path / 'run')], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [8, False], r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------------------------
# 2 processes: the checkpointer and the lock alone (gloo, no model)


def _commit(root: Path, step: int, world_size: int = 2) -> None:
    folder = root / f'step_{step:08d}'
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({'step': step, 'world_size': world_size}))


def _worker(kind: str, out_dir: str, *args: str) -> None:
    import torch.distributed as dist

    dist.init_process_group('gloo')
    rank = dist.get_rank()
    result: dict = {'pid': os.getpid()}
    try:
        if kind == 'plan':  # args: one checkpoint root per rank (a file system seen differently by each rank)
            ckpt = CheckpointManager(args[rank], keep_last=5, rank=rank, world_size=dist.get_world_size())
            plan = ckpt.plan_resume('auto', 'error')
            result['plan'] = None if plan is None else {'step': plan.step, 'step_dir': plan.step_dir}
        elif kind == 'universal':  # args: checkpoint root (its newest folder was saved by another world size)
            ckpt = CheckpointManager(args[0], keep_last=5, rank=rank, world_size=dist.get_world_size())
            plan = ckpt.plan_resume('auto', 'universal')
            result['plan'] = {'step': plan.step, 'mode': plan.mode}
            ckpt.prepare_universal(plan)
        elif kind == 'lock':  # args: output folder, seconds to hold the lock
            from pretrain.engine.run_lock import acquire_run_lock
            lock = acquire_run_lock(args[0], rank)
            result['took_over'] = lock.took_over if lock is not None else None
            Path(out_dir, f'locked_{rank}').write_text('1')
            time.sleep(float(args[1]))
    except Exception as e:  # noqa: BLE001 - the test reads what each rank raised
        result['error'] = f'{type(e).__name__}: {e}'
    Path(out_dir, f'rank{rank}.json').write_text(json.dumps(result))
    dist.destroy_process_group()


def _run_worker(nproc: int, kind: str, out_dir: Path, *args: str, extra_env: dict | None = None) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    run_procs(nproc, [str(Path(__file__)), kind, str(out_dir), *args], timeout=120, extra_env=extra_env)
    return [json.loads((out_dir / f'rank{r}.json').read_text()) for r in range(nproc)]


@pytest.mark.slow
@pytest.mark.dist
def test_the_ranks_agree_on_the_checkpoint_they_resume_from(tmp_path):
    """Rank 1 sees a newer committed folder than rank 0 (a file system whose views are out of step): both resume
    from rank 0's choice. When rank 1 does not see rank 0's choice at all, both stop with an error naming rank 1,
    instead of loading different steps or hanging."""
    seen0, seen1 = tmp_path / 'rank0' / 'checkpoints', tmp_path / 'rank1' / 'checkpoints'
    for step in (2, 4):
        _commit(seen0, step)
        _commit(seen1, step)
    _commit(seen1, 6)
    (seen0 / 'step_00000006').mkdir()  # rank 0 sees step 6 still being saved: no marker yet
    results = _run_worker(2, 'plan', tmp_path / 'newer_on_rank1', str(seen0), str(seen1))
    assert [r.get('error') for r in results] == [None, None]
    assert [r['plan']['step'] for r in results] == [4, 4]
    assert [r['plan']['step_dir'] for r in results] == [str(seen0 / 'step_00000004'), str(seen1 / 'step_00000004')]

    (seen1 / 'step_00000004' / MARKER).unlink()  # rank 1 does not see step 4 committed
    results = _run_worker(2, 'plan', tmp_path / 'missing_on_rank1', str(seen0), str(seen1))
    for r in results:
        assert r['error'].startswith('RuntimeError: rank 0 chose to resume from step 4'), r
        assert f'rank 1 cannot read {seen1 / "step_00000004"}/{MARKER}' in r['error']
        assert 'rank 0 cannot' not in r['error']


@pytest.mark.slow
@pytest.mark.dist
def test_a_failed_universal_conversion_stops_every_rank_without_a_collective_wait(tmp_path):
    """Rank 0 runs ds_to_universal on a save it cannot read; rank 1, which waits for it on the file system (not in a
    collective), stops with rank 0's error, and so does rank 0. Nothing is written into the committed folder."""
    root = tmp_path / 'checkpoints'
    _commit(root, 3, world_size=1)
    (root / 'step_00000003' / 'global_step3').mkdir()  # an empty DeepSpeed save
    results = _run_worker(2, 'universal', tmp_path / 'out', str(root))
    assert [r['plan'] for r in results] == [{'step': 3, 'mode': 'universal'}] * 2
    assert results[0]['error'].startswith('RuntimeError: ds_to_universal failed'), results[0]
    assert results[1]['error'].startswith(f'RuntimeError: rank 0 could not convert {root / "step_00000003"}'
                                          '/global_step3 to a universal checkpoint: RuntimeError: ds_to_universal'
                                          ' failed'), results[1]
    assert sorted(p.name for p in (root / 'step_00000003').iterdir()) == [MARKER, 'global_step3']
    assert (root / 'step_00000003.universal' / 'FAILED').is_file()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f'the first run ended early ({proc.returncode})'
        assert time.time() < deadline, f'{path} did not appear'
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.dist
def test_one_run_per_output_folder(tmp_path):
    """A 2-rank run holds the output folder. A second 2-rank run refuses on both ranks with one line naming the
    holder's PID and host; after the first is killed (-9) the folder is free again; a requeue of the same Slurm job
    takes the lock over from its still-living predecessor."""
    import socket

    out = tmp_path / 'run'
    first_dir = tmp_path / 'first'
    first_dir.mkdir()
    first = subprocess.Popen(_torchrun(2, [str(Path(__file__)), 'lock', str(first_dir), str(out), '300']), cwd=REPO,
                             env={**_env(), 'SLURM_JOB_ID': '4242'}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(first_dir / 'locked_0', first)
        holder = json.loads((out / 'RUN_LOCK').read_text())
        assert holder['host'] == socket.gethostname() and holder['slurm_job_id'] == '4242'
        refused = _run_worker(2, 'lock', tmp_path / 'second', str(out), '0')
        for r in refused:
            assert r['error'].startswith(f'RunLockedError: {out} is in use by another run (PID {holder["pid"]} on '
                                         f'{holder["host"]}, Slurm job 4242, started '), r
            assert '\n' not in r['error']
        # the same Slurm job, requeued while its first incarnation is still stopping: takes over
        requeued = _run_worker(2, 'lock', tmp_path / 'requeued', str(out), '0', extra_env={'SLURM_JOB_ID': '4242'})
        assert requeued[0].get('error') is None and requeued[0]['took_over']['pid'] == holder['pid']
        assert json.loads((out / 'RUN_LOCK').read_text())['pid'] == requeued[0]['pid']
    finally:
        kill_run(first)

    # killed: the lock went with its holder (the lock file is left behind, naming it)
    second_dir = tmp_path / 'killed_holder'
    second_dir.mkdir()
    holder = subprocess.Popen(_torchrun(2, [str(Path(__file__)), 'lock', str(second_dir), str(out), '300']),
                              cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        _wait_for(second_dir / 'locked_0', holder)
    finally:
        kill_run(holder)
    stale = json.loads((out / 'RUN_LOCK').read_text())
    after = _run_worker(2, 'lock', tmp_path / 'after_kill', str(out), '0')
    assert [r.get('error') for r in after] == [None, None]
    assert after[0]['took_over'] is None  # not a takeover: the killed holder's lock was simply free
    assert json.loads((out / 'RUN_LOCK').read_text())['pid'] == after[0]['pid'] != stale['pid']


# ----------------------------------------------------------------------------------------------------------------
# 2 processes: whole runs through the CLI


@pytest.fixture(scope='module')
def shards(real_data, tmp_path_factory) -> str:
    from tests.data_helpers import write_photo_shards
    return write_photo_shards(real_data, tmp_path_factory.mktemp('shards'))


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs (room for one checkpoint of the tiny model, not two); unmounted after the test."""
    mnt = tmp_path / 'small_disk'
    mnt.mkdir()
    res = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=12m', 'tmpfs', str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {res.stderr.strip()}')
    try:
        yield mnt
    finally:
        subprocess.run(['umount', '-l', str(mnt)], check=False)


@pytest.mark.slow
@pytest.mark.dist
def test_a_full_disk_fails_the_save_on_every_rank_with_one_line(shards, small_disk, tmp_path):
    """2 ranks, output on a 12 MiB tmpfs: the step-2 checkpoint (about 8 MiB) commits, the step-4 save fills the
    disk. Both ranks stop (no hang in the save's barrier) with exit status 1 and one line naming the step, ENOSPC
    with the free space, and the step-2 checkpoint; the partial step-4 folder is gone; the warning before the save
    said it would not fit."""
    run = small_disk / 'run'
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, run, checkpoint={'interval_steps': 2, 'keep_last': 3},
                       data={'val': []}, ema={'enabled': False}, loss={'mixup_alpha': 0.0, 'cutmix_alpha': 0.0})
    res = subprocess.run(_torchrun(2, ['-m', 'pretrain', 'train', str(cfg)]), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=400)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-4000:]
    ckpts = run / 'checkpoints'
    lines = [ln for ln in out.splitlines() if 'checkpoint save of step 4 failed' in ln]
    assert len(lines) == 2, out[-4000:]  # one per rank
    for line in lines:
        assert 'ENOSPC, no space left on device: ' in line and ' MiB free of 12.0 MiB on ' in line, line
        assert f'the partial folder {ckpts / "step_00000004"} was removed' in line, line
        assert line.endswith(f'last complete checkpoint: {ckpts / "step_00000002"}'), line
    assert f'File "{REPO / "pretrain"}' not in out, out[-4000:]  # no traceback from our code (torchrun prints one)
    assert 'warning: the save of step 4 will probably fail' in out
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith('.')) == ['step_00000002']
    assert (ckpts / 'step_00000002' / MARKER).is_file()


@pytest.mark.slow
@pytest.mark.dist
def test_a_second_run_on_a_live_runs_folder_is_refused_and_a_killed_runs_folder_resumes(shards, tmp_path):
    """Through the CLI on 2 ranks: while a run is alive (held inside its step-4 save), a second one exits at once
    with one line naming the holder; after the first is killed -9, the next run takes the folder and resumes from
    its last commit (step 2)."""
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, tmp_path / 'run', checkpoint={'interval_steps': 2},
                       data={'val': []}, ema={'enabled': False}, loss={'mixup_alpha': 0.0, 'cutmix_alpha': 0.0})
    ckpts = tmp_path / 'run' / 'checkpoints'
    first = subprocess.Popen(_torchrun(2, ['-m', 'pretrain', 'train', str(cfg)]), cwd=REPO,
                             env={**_env(), 'PRETRAIN_DEBUG_SAVE_PAUSE': '4:300'}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(ckpts / 'step_00000004' / 'rank_00001.pt', first, timeout=300)
        holder = json.loads((tmp_path / 'run' / 'RUN_LOCK').read_text())
        second = subprocess.run(_torchrun(2, ['-m', 'pretrain', 'train', str(cfg)]), cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode != 0
        lines = [ln for ln in (second.stdout + second.stderr).splitlines() if 'is in use by another run' in ln]
        assert len(lines) == 2 and all(f'(PID {holder["pid"]} on {holder["host"]}, started ' in ln for ln in lines)
        assert f'File "{REPO / "pretrain"}' not in second.stderr, second.stderr[-3000:]
        assert first.poll() is None  # untouched by the refused run
    finally:
        kill_run(first)
    again = run_procs(2, ['-m', 'pretrain', 'train', str(cfg)])
    assert f'resumed from {ckpts / "step_00000002"} at step 2 (exact)' in again
    assert (ckpts / 'step_00000006' / MARKER).is_file()



def test_resume_none_is_a_fresh_start_for_the_job_not_for_each_attempt(shards, tmp_path):
    """checkpoint.resume=none on 1 rank: a first attempt leaves a checkpoint (stop_after_steps); a requeued attempt
    of the same job (restart count 1) resumes from it; a new job with the same config is refused, by name."""
    cfg = stage_config(tmp_path / 'cfg.yaml', shards, tmp_path / 'run', checkpoint={'interval_steps': 2,
                       'resume': 'none'}, data={'val': []}, ema={'enabled': False},
                       loss={'mixup_alpha': 0.0, 'cutmix_alpha': 0.0}, run={'stop_after_steps': 2})
    ckpts = tmp_path / 'run' / 'checkpoints'
    run_procs(1, ['-m', 'pretrain', 'train', str(cfg)])
    assert (ckpts / 'step_00000002' / MARKER).is_file()
    again = run_procs(1, ['-m', 'pretrain', 'train', str(cfg)], extra_env={'LAUNCH_LOCAL_ATTEMPT': '1'})
    assert 'restart 1 of the job: resuming' in again and f'resumed from {ckpts / "step_00000002"} at step 2' in again
    new_job = subprocess.run(_torchrun(1, ['-m', 'pretrain', 'train', str(cfg)]), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert new_job.returncode != 0
    assert f'checkpoint.resume=none, but {ckpts} already holds complete checkpoints (newest: step 4' in new_job.stderr


if __name__ == '__main__':
    _worker(sys.argv[1], sys.argv[2], *sys.argv[3:])
    from tests.dist_helpers import leave_worker
    leave_worker()
