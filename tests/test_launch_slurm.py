"""Launch on a real one-node Slurm cluster (tests/slurm_cluster.py starts it): Submitit cascades with afterok, a
failing stage that blocks its dependent, plain sbatch scripts, and requeue (USR2 signal / scontrol requeue) that
resumes to the same weights as an uninterrupted run. CPU only, tiny InternImage on the 200 real ImageNet photos."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REAL_DATA, REPO_ROOT
from tests.slurm_cluster import slurm_cluster  # noqa: F401 - the session fixture

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PY = sys.executable
STEPS = 24
TRAIN_CONFIG = 'configs/stage/supervised_tiny.yaml'


@pytest.fixture(scope='module')
def shards(tmp_path_factory) -> Path:
    """8 shards of 25 real ImageNet-1K photos with labels, written by our own writer."""
    out = tmp_path_factory.mktemp('launch_shards')
    r = subprocess.run([PY, '-m', 'data_pipelines', 'write', 'imagefolder', str(REAL_DATA / 'imagenet-1k-samples'),
                        str(out), '--label-from', 'filename-prefix', '--class-map',
                        str(REAL_DATA / 'imagenet-1k-wnids.txt'), '--samples-per-shard', '25', '--prefix', 'shard',
                        '--no-progress'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob('shard-*.tar'))) == 8
    return out


def fast_overrides(shards: Path, steps: int, interval: int) -> list[str]:
    """A few-second stage: 32 px, no EMA/Mixup/val, a log line and metrics row every step."""
    return [f'data.train=[{{name: tiny, urls: "{shards}/shard-{{000000..000007}}.tar"}}]', 'data.val=[]',
            'schedule.epochs=null', f'schedule.total_steps={steps}', 'schedule.warmup_steps=1',
            f'checkpoint.interval_steps={interval}', 'checkpoint.keep_last=10', 'data.img_size=32',
            'data.num_workers=0', 'ema.enabled=false', 'loss.mixup_alpha=0.0', 'loss.cutmix_alpha=0.0',
            'logging.tensorboard=false', 'logging.interval_steps=1', 'deepspeed.precision=fp32']


RESOURCES = {'nodes': 1, 'tasks_per_node': 2, 'cpus_per_task': 1, 'mem_gb': 6, 'timeout_min': 10,
             'max_requeues': 2, 'signal_delay_s': 60}


def write_yaml(path: Path, obj: dict) -> Path:
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


def launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, '-m', 'launch', *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def run_folder(stdout: str) -> Path:
    for line in stdout.splitlines():
        if line.startswith('run folder: '):
            return Path(line.removeprefix('run folder: ').strip())
    raise AssertionError(f'no run folder in:\n{stdout}')


@pytest.fixture
def jobs_to_cancel():
    """Job ids a test submitted; cancelled at teardown so nothing keeps running after a failure."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(['scancel', *ids], capture_output=True, timeout=60)


def status_rows(run: Path) -> list[dict]:
    """What `python -m launch status RUN --json` prints, in-process (polled: no interpreter start per poll)."""
    from launch.run import open_run
    from launch.status import collect
    return collect(open_run(run))


def wait_finished(run: Path, timeout_s: float) -> list[dict]:
    from launch.status import is_finished
    deadline = time.time() + timeout_s
    while True:
        rows = status_rows(run)
        if is_finished(rows):
            return rows
        if time.time() > deadline:
            raise AssertionError(f'run not finished in {timeout_s}s: {rows}')
        time.sleep(2)


def events(stage_dir: Path) -> list[dict]:
    f = stage_dir / 'events.jsonl'
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def logs_tail(stage_dir: Path) -> str:
    return '\n'.join(f'--- {p.name}\n' + p.read_text()[-1500:] for p in sorted((stage_dir / 'logs').glob('*.*'))
                     if p.suffix in ('.out', '.err'))


def fp32_weights(step_dir: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    step = int(Path(step_dir).name.split('_')[1])
    return get_fp32_state_dict_from_zero_checkpoint(step_dir, tag=f'global_step{step}')


# ------------------------------------------------------------------------------------------------------------------


def test_cluster_runs_two_rank_srun(slurm_cluster):  # noqa: F811
    """The fixture's cluster is real: an idle node, and srun runs two tasks with Slurm's rank variables."""
    r = subprocess.run(['srun', '-n', '2', '-t', '1', 'bash', '-c', 'echo $SLURM_PROCID/$SLURM_NTASKS'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == ['0/2', '1/2']
    assert slurm_cluster.cpus >= 1 and slurm_cluster.partition


def test_cascade_two_stages_afterok_init_from_predecessor(slurm_cluster, shards, tmp_path, jobs_to_cancel):  # noqa: F811
    cfg = write_yaml(tmp_path / 'cascade.yaml', {
        'name': 'casc', 'runs_root': str(tmp_path / 'runs'), 'resources': RESOURCES,
        'stages': [{'name': 'first', 'train_config': TRAIN_CONFIG, 'overrides': fast_overrides(shards, 4, 2)},
                   {'name': 'second', 'train_config': TRAIN_CONFIG,
                    'overrides': fast_overrides(shards, 2, 2) + ['optim.lr_base=2.0e-4']}]})
    r = launch('cascade', str(cfg))
    assert r.returncode == 0, r.stderr
    run = run_folder(r.stdout)
    meta = json.loads((run / 'run.json').read_text())
    jobs_to_cancel += [s['job_ids'][-1] for s in meta['stages']]
    first, second = meta['stages']
    assert second['dependency'] == f'afterok:{first["job_ids"][0]}'
    rows = wait_finished(run, 420)
    assert [x['state'] for x in rows] == ['COMPLETED', 'COMPLETED'], rows
    assert [x['step'] for x in rows] == [4, 2]
    assert rows[0]['last_checkpoint'].endswith('first/out/checkpoints/step_00000004')
    d1, d2 = run / 'stages' / 'first', run / 'stages' / 'second'
    # the dependent started only after its predecessor ended
    assert events(d2)[0]['time'] >= events(d1)[-1]['time']
    # it started from the predecessor's final weights, consolidated once by its rank 0
    init = d2 / 'init' / 'first_step_00000004.pt'
    assert init.is_file(), logs_tail(d2)
    import torch
    saved = torch.load(init, map_location='cpu', weights_only=True)
    expected = fp32_weights(rows[0]['last_checkpoint'])
    assert saved['model'].keys() == expected.keys()
    assert all(torch.equal(saved['model'][k], expected[k]) for k in expected)
    # each rank's stdout/stderr, and the code ran from the snapshot taken at submission
    job1 = first['job_ids'][0]
    for rank in (0, 1):
        assert (d1 / 'logs' / f'{job1}_{rank}_log.out').is_file()
        assert (d1 / 'logs' / f'{job1}_{rank}_log.err').is_file()
    assert events(d1)[0]['code'] == events(d1)[0]['pretrain_code'] == str(run / 'code')
    assert (run / 'stages' / 'first' / 'train_config.yaml').is_file()
    r = launch('status', str(run))
    assert r.returncode == 0 and 'COMPLETED' in r.stdout, r.stdout + r.stderr  # 0: every stage completed
    assert [x['state'] for x in json.loads((run / 'summary.json').read_text())['stages']] == ['COMPLETED'] * 2


def test_failing_stage_blocks_dependent_and_status_says_why(slurm_cluster, shards, tmp_path, jobs_to_cancel):  # noqa: F811
    # A model that does not exist fails on the cluster (a missing path would be refused at submission).
    bad = fast_overrides(shards, 2, 2) + ['model.name=internimage_nonexistent']
    cfg = write_yaml(tmp_path / 'cascade.yaml', {
        'name': 'failing', 'runs_root': str(tmp_path / 'runs'), 'resources': RESOURCES,
        'stages': [{'name': 'broken', 'train_config': TRAIN_CONFIG, 'overrides': bad},
                   {'name': 'after', 'train_config': TRAIN_CONFIG, 'overrides': fast_overrides(shards, 2, 2)}]})
    r = launch('cascade', str(cfg))
    assert r.returncode == 0, r.stderr
    run = run_folder(r.stdout)
    meta = json.loads((run / 'run.json').read_text())
    jobs_to_cancel += [s['job_ids'][-1] for s in meta['stages']]
    rows = wait_finished(run, 300)
    broken, after = rows
    assert broken['state'] == 'FAILED', rows
    assert after['state'] == 'PENDING' and after['reason'] == 'DependencyNeverSatisfied', rows
    assert not (run / 'stages' / 'after' / 'events.jsonl').exists()  # it never ran
    text = launch('status', str(run)).stdout
    assert 'will never start' in text and "stage 'broken'" in text and 'ended FAILED' in text, text
    assert 'internimage_nonexistent' in after['why'], after['why']  # the predecessor's error is quoted


def test_stage_with_config_outside_snapshot_folders_runs(slurm_cluster, shards, tmp_path, jobs_to_cancel):  # noqa: F811
    """The bug this guards: a training config inside the repository but outside the snapshotted folders (runs/, where
    users keep experiments) was mapped into code/, where it did not exist, and the job failed at start. The job reads
    the resolved copy in its stage folder: it completes even though the submitted file is gone by then."""
    folder = REPO_ROOT / 'runs' / f'test_experiments_{tmp_path.name}'
    folder.mkdir(parents=True)
    try:
        train = folder / 'train.yaml'
        train.write_text((REPO_ROOT / TRAIN_CONFIG).read_text())
        cfg = write_yaml(tmp_path / 'stage.yaml', {
            'name': 'outside', 'train_config': str(train.relative_to(REPO_ROOT)),
            'overrides': fast_overrides(shards, 2, 2), 'runs_root': str(tmp_path / 'runs'),
            'resources': {**RESOURCES, 'tasks_per_node': 1}})
        r = launch('submit', str(cfg))
    finally:
        import shutil
        shutil.rmtree(folder)
    assert r.returncode == 0, r.stderr
    run = run_folder(r.stdout)
    meta = json.loads((run / 'run.json').read_text())
    jobs_to_cancel.append(meta['stages'][0]['job_ids'][0])
    stage = run / 'stages' / 'outside'
    assert meta['stages'][0]['train_config'] == str(stage / 'train_config.yaml')
    rows = wait_finished(run, 420)
    assert rows[0]['state'] == 'COMPLETED' and rows[0]['step'] == 2, logs_tail(stage)
    rank0 = next((stage / 'logs').glob('*_0_log.out')).read_text()
    assert f'config {stage / "train_config.yaml"}' in rank0, rank0[-3000:]


@pytest.fixture(scope='module')
def uninterrupted(slurm_cluster, shards, tmp_path_factory):  # noqa: F811
    """A 24-step stage from a script written by `python -m launch sbatch`, submitted by hand with plain `sbatch`
    from another directory; it runs uninterrupted and is the reference for the requeue tests."""
    tmp = tmp_path_factory.mktemp('sbatch')
    cfg = write_yaml(tmp / 'stage.yaml', {
        'name': 'plain', 'train_config': TRAIN_CONFIG, 'overrides': fast_overrides(shards, STEPS, 5),
        'runs_root': str(tmp / 'runs'), 'resources': RESOURCES})
    r = launch('sbatch', str(cfg))
    assert r.returncode == 0, r.stderr
    run = run_folder(r.stdout)
    script = run / 'stages' / 'plain' / 'job.sbatch'
    sub = subprocess.run(['sbatch', '--parsable', str(script)], capture_output=True, text=True, timeout=60,
                         cwd='/')  # the script does not depend on where it is submitted from
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip()
    try:
        meta = json.loads((run / 'run.json').read_text())
        meta['stages'][0]['job_ids'].append(job)  # a hand-submitted job: tell status about it
        (run / 'run.json').write_text(json.dumps(meta))
        rows = wait_finished(run, 420)
    finally:
        subprocess.run(['scancel', job], capture_output=True, timeout=60)
    return {'run': run, 'job': job, 'rows': rows}


def test_sbatch_script_runs_under_sbatch(uninterrupted):
    run, job, rows = uninterrupted['run'], uninterrupted['job'], uninterrupted['rows']
    stage = run / 'stages' / 'plain'
    assert rows[0]['state'] == 'COMPLETED', logs_tail(stage)
    assert rows[0]['step'] == STEPS and rows[0]['restarts'] == 0
    for rank in (0, 1):
        assert (stage / 'logs' / f'{job}_{rank}.out').is_file() and (stage / 'logs' / f'{job}_{rank}.err').is_file()
    assert events(stage)[0]['world_size'] == 2
    # Each rank derives the rendezvous from the srun step's variables: the first step node, the port of the job id.
    for rank in (0, 1):
        rank_out = (stage / 'logs' / f'{job}_{rank}.out').read_text()
        assert f':{10000 + int(job) % 20000} (slurm)' in rank_out, rank_out[-2000:]
    assert events(stage)[0]['code'] == str(run / 'code')


def _interrupted_run(shards: Path, tmp_path: Path, name: str, interrupt: str, jobs: list[str]):
    """Submit a stage with `python -m launch sbatch --submit` (``usr2_submitit``: `python -m launch submit`, Submitit);
    once it passed step 6, ``usr2*``: scancel --signal=USR2, ``requeue``: scontrol requeue; wait until it
    completes."""
    cfg = write_yaml(tmp_path / f'{name}.yaml', {
        'name': name, 'train_config': TRAIN_CONFIG, 'overrides': fast_overrides(shards, STEPS, 5),
        'runs_root': str(tmp_path / 'runs'), 'resources': RESOURCES})
    r = launch('submit', str(cfg)) if interrupt == 'usr2_submitit' else launch('sbatch', str(cfg), '--submit')
    assert r.returncode == 0, r.stderr
    run = run_folder(r.stdout)
    meta = json.loads((run / 'run.json').read_text())
    job = meta['stages'][0]['job_ids'][0]
    jobs.append(job)
    stage = run / 'stages' / name
    metrics = stage / 'out' / 'metrics.jsonl'
    deadline = time.time() + 300
    while not (metrics.exists() and sum(1 for _ in metrics.open()) >= 6):
        assert time.time() < deadline, logs_tail(stage)
        time.sleep(0.2)
    cmd = ['scontrol', 'requeue', job] if interrupt == 'requeue' else ['scancel', '--signal=USR2', job]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = wait_finished(run, 420)
    assert rows[0]['state'] == 'COMPLETED', logs_tail(stage)
    return rows, stage


@pytest.mark.parametrize('interrupt', ['usr2', 'requeue', 'usr2_submitit'])
def test_interrupted_stage_resumes_to_same_weights(interrupt, uninterrupted, shards, tmp_path, jobs_to_cancel):
    import torch
    rows, stage = _interrupted_run(shards, tmp_path, f'interrupted_{interrupt}', interrupt, jobs_to_cancel)
    ev = events(stage)
    starts = [e for e in ev if e['event'] == 'start']
    assert len(starts) == 2 and [e['restart_count'] for e in starts] == [0, 1], ev
    assert rows[0]['restarts'] == 1 and rows[0]['step'] == STEPS
    if interrupt.startswith('usr2'):
        # every rank saved at the same step boundary, then the job requeued itself
        requeued = [e for e in ev if e['event'] == 'end' and e['status'] == 'requeued']
        assert len(requeued) == 1 and requeued[0]['signal'] == 'USR2', ev
        assert 6 <= requeued[0]['step'] < STEPS
        assert requeued[0]['checkpoint'].endswith(f'step_{requeued[0]["step"]:08d}')
        assert Path(requeued[0]['checkpoint'], 'COMPLETE').is_file()
    weights = fp32_weights(rows[0]['last_checkpoint'])
    reference = fp32_weights(uninterrupted['rows'][0]['last_checkpoint'])
    assert weights.keys() == reference.keys()
    diff = {k: (weights[k] - reference[k]).abs().max().item() for k in weights}
    assert all(torch.equal(weights[k], reference[k]) for k in weights), \
        f'max abs differences: {sorted(diff.items(), key=lambda kv: -kv[1])[:5]}'
