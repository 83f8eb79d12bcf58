"""launch without Slurm: config validation (file and key named), the batch script text, the preemption flag agreed
across ranks, and the local mode (the same worker, restarted after a requeue signal)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from launch.config import LaunchConfigError, load_any, load_cascade, load_stage
from tests.conftest import REPO_ROOT

PY = sys.executable
TRAIN = 'configs/stage/supervised_tiny.yaml'


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # relative paths in launch files are relative to the repository root


def write(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj, sort_keys=False))
    return p


@pytest.mark.parametrize('body, key', [
    ({'train_config': TRAIN, 'resources': {'tasks_per_node': 0}}, 'resources.tasks_per_node'),
    ({'train_config': TRAIN, 'resources': {'timeout_min': '1h'}}, 'resources.timeout_min'),
    ({'train_config': TRAIN, 'resources': {'gpu_per_node': 8}}, 'resources.gpu_per_node'),
    ({'train_config': TRAIN, 'resources': {'gpus_per_node': 8, 'tasks_per_node': 1}}, 'resources.tasks_per_node'),
    ({'train_config': TRAIN, 'resources': {'sbatch_args': {'time': 30}}}, 'resources.sbatch_args.time'),
    ({'train_config': TRAIN, 'resources': {'requeue_signals': ['USR1']}}, 'resources.requeue_signals[0]'),
    ({'train_config': TRAIN, 'resources': {'timeout_min': 2, 'signal_delay_s': 120}}, 'resources.signal_delay_s'),
    ({'train_config': 'configs/stage/nope.yaml'}, 'train_config'),
    ({'train_config': TRAIN, 'overrides': ['run.output_dir=/x']}, 'overrides[0]'),
    ({'train_config': TRAIN, 'overrides': ['deepspeed.zero_stage=7']}, 'deepspeed.zero_stage'),
    ({'train_config': TRAIN, 'init_from': 'a'}, 'init_from'),
])
def test_stage_config_errors_name_file_and_key(tmp_path, body, key):
    path = write(tmp_path, 'stage.yaml', body)
    with pytest.raises(LaunchConfigError) as e:
        load_stage(path)
    assert str(path) in str(e.value) and key in str(e.value), str(e.value)


def test_cascade_defaults_merge_and_init_from(tmp_path):
    path = write(tmp_path, 'c.yaml', {
        'name': 'c', 'resources': {'tasks_per_node': 2, 'timeout_min': 30, 'partition': 'gpu'},
        'stages': [{'name': 'a', 'train_config': TRAIN},
                   {'name': 'b', 'train_config': TRAIN, 'resources': {'timeout_min': 5}},
                   {'name': 'c', 'train_config': TRAIN, 'init_from': 'a'},
                   {'name': 'd', 'train_config': TRAIN, 'init_from': None}]})
    c = load_cascade(path)
    assert [s.init_from for s in c.stages] == [None, 'a', 'a', None]
    assert [s.init_weights for s in c.stages] == ['raw'] * 4
    assert [s.resources.timeout_min for s in c.stages] == [30, 5, 30, 30]
    assert all(s.resources.partition == 'gpu' and s.resources.tasks_per_node == 2 for s in c.stages)


@pytest.mark.parametrize('stages, key', [
    ([{'name': 'a', 'train_config': TRAIN}, {'name': 'b', 'train_config': TRAIN, 'init_from': 'z'}],
     'stages[1].init_from'),
    ([{'name': 'a', 'train_config': TRAIN}, {'name': 'a', 'train_config': TRAIN}], 'stages[1].name'),
    ([{'name': 'a', 'train_config': TRAIN, 'resources': {'nodes': 0}}], 'stages[0].resources.nodes'),
    ([{'name': 'a b', 'train_config': TRAIN}], 'stages[0].name'),
    ([], 'stages'),
    ([{'name': 'a', 'train_config': TRAIN, 'init_weights': 'ema'}], 'stages[0].init_weights'),
    ([{'name': 'a', 'train_config': TRAIN, 'overrides': ['ema.enabled=false']},
      {'name': 'b', 'train_config': TRAIN, 'init_weights': 'ema'}], 'stages[1].init_weights'),
    ([{'name': 'a', 'train_config': TRAIN}, {'name': 'b', 'train_config': TRAIN, 'init_weights': 'best'}],
     'stages[1].init_weights'),
])
def test_cascade_errors_name_file_and_key(tmp_path, stages, key):
    path = write(tmp_path, 'c.yaml', {'name': 'c', 'stages': stages})
    with pytest.raises(LaunchConfigError) as e:
        load_cascade(path)
    assert str(path) in str(e.value) and key in str(e.value), str(e.value)


def test_shipped_launch_configs_load():
    for path in sorted((REPO_ROOT / 'configs' / 'launch').glob('*.yaml')) + \
            sorted((REPO_ROOT / 'configs' / 'cascade').glob('*.yaml')):
        assert load_any(path).stages, path


def test_check_command_fails_before_submitting(tmp_path):
    path = write(tmp_path, 's.yaml', {'train_config': TRAIN, 'runs_root': str(tmp_path / 'runs'),
                                      'resources': {'mem_gb': -1}})
    r = subprocess.run([PY, '-m', 'launch', 'submit', str(path)], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and 'resources.mem_gb' in r.stderr and str(path) in r.stderr, r.stderr
    assert not (tmp_path / 'runs').exists()  # nothing made, nothing submitted


def test_sbatch_script_text(tmp_path, tiny_shards):
    from launch.config import CascadeSpec
    from launch.run import create_run
    from launch.slurm import sbatch_script

    path = write(tmp_path, 's.yaml', {
        'name': 'big', 'train_config': TRAIN, 'runs_root': str(tmp_path / 'runs'),
        'overrides': shard_overrides(f'{tiny_shards}/shard-{{000000..000003}}.tar'),
        'resources': {'nodes': 4, 'tasks_per_node': 8, 'gpus_per_node': 8, 'cpus_per_task': 12, 'mem_gb': 480,
                      'timeout_min': 2880, 'partition': 'gpu', 'account': 'vision', 'qos': 'high',
                      'constraint': 'h100', 'exclusive': True, 'sbatch_args': {'mail-type': 'END', 'reservation': 'r1'},
                      'signal_delay_s': 300}})
    st = load_stage(path)
    run = create_run(CascadeSpec(name=st.name, runs_root=st.runs_root, stages=[st]), 'sbatch', 'stage')
    text = sbatch_script(run, 'big', dependency='afterok:41')
    for line in ['#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=8', '#SBATCH --gpus-per-node=8',
                 '#SBATCH --cpus-per-task=12', '#SBATCH --mem=491520M', '#SBATCH --time=2880',
                 '#SBATCH --partition=gpu', '#SBATCH --account=vision', '#SBATCH --qos=high',
                 '#SBATCH --constraint=h100', '#SBATCH --exclusive', '#SBATCH --signal=USR2@300',
                 '#SBATCH --requeue', '#SBATCH --open-mode=append', '#SBATCH --mail-type=END',
                 '#SBATCH --reservation=r1', '#SBATCH --dependency=afterok:41']:
        assert line in text.splitlines(), line
    assert 'MASTER_PORT' not in text  # one rendezvous: the ranks derive it (pretrain.common.dist.rendezvous)
    assert f'export PYTHONPATH={run.root / "code"}' in text
    assert '-m launch.worker' in text and f'--stage-dir {run.root / "stages" / "big"}' in text
    assert (run.root / 'code' / 'launch' / 'worker.py').is_file()  # the snapshot the script points at
    r = subprocess.run(['bash', '-n'], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


_AGREE = textwrap.dedent('''
    import os, signal, sys, time
    import torch.distributed as dist
    from pretrain.engine import preemption
    rank = int(sys.argv[1])
    dist.init_process_group('gloo', init_method='file://' + sys.argv[2], rank=rank, world_size=2)
    preemption.install(['USR2'])
    for step in range(1, 40):
        if rank == 1 and step == 5:
            os.kill(os.getpid(), signal.SIGUSR2)  # only rank 1 is signalled
        time.sleep(0.02 * (rank + 1))  # ranks reach the boundary at different times
        if preemption.agreed():
            print(f'agreed at step {step} requested={preemption.requested()}', flush=True)
            break
    dist.destroy_process_group()
''')


def test_preemption_flag_agreed_by_all_ranks_at_one_step(tmp_path):
    """One rank gets USR2; both ranks see the agreed flag at the same step boundary (a real gloo all-reduce)."""
    store = tmp_path / 'store'
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    procs = [subprocess.Popen([PY, '-c', _AGREE, str(r), str(store)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0].strip() == 'agreed at step 5 requested=False', outs
    assert outs[1][0].strip() == 'agreed at step 5 requested=True', outs


@pytest.mark.slow
def test_local_mode_restarts_after_usr2_and_completes(tmp_path, real_data):
    """`launch submit --local`: USR2 to a rank makes both save at the same step and exit 75; the local runner
    restarts the stage, which resumes from that checkpoint and completes."""
    shards = tmp_path / 'shards'
    r = subprocess.run([PY, '-m', 'data_pipelines', 'write', 'imagefolder', str(real_data / 'imagenet-1k-samples'),
                        str(shards), '--label-from', 'filename-prefix', '--class-map',
                        str(real_data / 'imagenet-1k-wnids.txt'), '--samples-per-shard', '25', '--no-progress',
                        '--prefix', 'shard'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    overrides = [f'data.train=[{{name: t, urls: "{shards}/shard-{{000000..000007}}.tar"}}]', 'data.val=[]',
                 'schedule.epochs=null', 'schedule.total_steps=40', 'schedule.warmup_steps=1',
                 'checkpoint.interval_steps=100', 'data.img_size=32', 'data.num_workers=0', 'ema.enabled=false',
                 'loss.mixup_alpha=0.0', 'loss.cutmix_alpha=0.0', 'logging.tensorboard=false',
                 'logging.interval_steps=1', 'deepspeed.precision=fp32']
    path = write(tmp_path, 's.yaml', {'name': 'loc', 'train_config': TRAIN, 'overrides': overrides,
                                      'runs_root': str(tmp_path / 'runs'),
                                      'resources': {'tasks_per_node': 2, 'max_requeues': 1}})
    proc = subprocess.Popen([PY, '-m', 'launch', 'submit', str(path), '--local'], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        stage = metrics = None
        while True:
            runs = list((tmp_path / 'runs').glob('loc-*'))
            if runs:
                stage = runs[0] / 'stages' / 'loc'
                metrics = stage / 'out' / 'metrics.jsonl'
                if metrics.exists() and sum(1 for _ in metrics.open()) >= 3:
                    break
            assert time.time() < deadline and proc.poll() is None, 'the stage did not reach step 3'
            time.sleep(0.2)
        pid = int(subprocess.run(['pgrep', '-f', '--', f'--stage-dir {stage}'], capture_output=True,
                                 text=True).stdout.split()[0])
        os.kill(pid, signal.SIGUSR2)  # one rank only
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    ev = [json.loads(x) for x in (stage / 'events.jsonl').read_text().splitlines()]
    assert [(e['event'], e.get('status')) for e in ev] == [('start', None), ('end', 'requeued'), ('start', None),
                                                          ('end', 'completed')], ev
    saved_at = ev[1]['step']
    assert 3 <= saved_at < 40 and Path(ev[1]['checkpoint'], 'COMPLETE').is_file()
    assert ev[2]['restart_count'] == 1 and ev[3]['step'] == 40
    assert f'resumed from {ev[1]["checkpoint"]} at step {saved_at}' in (stage / 'logs' / 'local_0.out').read_text()


# ------------------------------------------------------------------------------------------------------------------
# submit time: the config the job reads, and the paths it reads


@pytest.fixture
def tiny_shards(tmp_path, real_data) -> Path:
    """4 shards of 8 real photos each (our writer's layout) in ``tmp_path/shards``."""
    from tests.data_helpers import write_photo_shards
    out = tmp_path / 'shards'
    write_photo_shards(real_data, out, count=32, per_shard=8, prefix='shard')
    return out


def shard_overrides(urls: str) -> list[str]:
    return [f'data.train=[{{name: t, urls: "{urls}"}}]', 'data.val=[]']


@pytest.mark.parametrize('where', ['configs', 'runs', 'experiments_outside_repo'])
def test_job_reads_the_resolved_config_wherever_it_sat(where, tmp_path, tiny_shards):
    """A training config inside the snapshotted folders, inside the repository but outside them (runs/, which the
    snapshot leaves out) or outside the repository: the job reads the resolved copy in its stage folder, which
    loads to the submitted config with its overrides, also after the submitted file is gone."""
    from launch.run import create_run
    from pretrain.config import load_config

    text = (REPO_ROOT / TRAIN).read_text()
    if where == 'configs':
        src = REPO_ROOT / TRAIN
    else:
        folder = (REPO_ROOT / 'runs' / f'test_launch_{tmp_path.name}' if where == 'runs'
                  else tmp_path / 'experiments')
        folder.mkdir(parents=True)
        src = folder / 'train.yaml'
        src.write_text(text)
    overrides = shard_overrides(f'{tiny_shards}/shard-{{000000..000003}}.tar') + ['optim.lr_base=3.0e-4']
    path = write(tmp_path, 's.yaml', {'name': 'st', 'train_config': str(src), 'overrides': overrides,
                                      'runs_root': str(tmp_path / 'runs')})
    try:
        run = create_run(load_any(path), 'sbatch', 'stage')
        expected = load_config(src, overrides + [f'run.output_dir={run.stage_dir("st") / "out"}'])
        argv = run.worker_argv('st')
    finally:
        if where != 'configs':
            shutil.rmtree(src.parent)
    config = Path(run.stage_meta('st')['train_config'])
    assert config == run.stage_dir('st') / 'train_config.yaml' and str(config) in argv
    assert run.stage_meta('st')['submitted_config'] == str(src)
    if where != 'configs':
        assert not src.exists()  # the job does not need it
        assert not (run.code_dir / 'runs').exists()  # the snapshot stays code and configs/
    # what the worker does with its arguments: the resolved copy plus the overrides once more
    job_cfg = load_config(argv[argv.index(str(config))], argv[argv.index(str(config)) + 1:])
    assert job_cfg == expected and job_cfg.optim.lr_base == 3.0e-4


def _submit_error(args: list[str], capsys) -> str:
    from launch.__main__ import main
    assert main(args) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize('command', [['submit', '--local'], ['sbatch'], ['sbatch', '--submit'],
                                     ['cascade', '--local'], ['check']])
def test_missing_paths_fail_at_submit_naming_stage_key_and_path(command, tmp_path, tiny_shards, capsys):
    """Every mode refuses before making a run folder: the last shard of a pattern, a manifest, init weights and the
    head index that the job would not find are each named with their stage and key."""
    urls = f'{tiny_shards}/shard-{{000000..000004}}.tar'  # 000004 does not exist; the first one does
    overrides = shard_overrides(urls) + ['model.init_from=weights/nope.pt', f'model.head_index={tmp_path}/idx.txt']
    stage = {'name': 'stg', 'train_config': TRAIN, 'overrides': overrides}
    if command[0] == 'cascade':
        ok = {'name': 'ok', 'train_config': TRAIN, 'overrides': shard_overrides(f'{tiny_shards}/shard-000000.tar')}
        # the second stage's init weights come from the first: not checked; the rest is
        spec = {'name': 'c', 'runs_root': str(tmp_path / 'runs'), 'stages': [ok, stage]}
    else:
        spec = {**stage, 'runs_root': str(tmp_path / 'runs')}
    path = write(tmp_path, 'spec.yaml', spec)
    err = _submit_error([command[0], str(path), *command[1:]], capsys)
    assert f"stage 'stg': data.train[0].urls: last shard {tiny_shards}/shard-000004.tar does not exist" in err, err
    assert 'first shard' not in err
    assert f"stage 'stg': model.head_index: head class index {tmp_path}/idx.txt does not exist" in err, err
    if command[0] == 'cascade':
        assert 'model.init_from' not in err, err
    else:
        assert (f"stage 'stg': model.init_from: init weights weights/nope.pt does not exist (relative to the job's "
                f"directory {REPO_ROOT})") in err, err
    assert not (tmp_path / 'runs').exists()  # nothing made, nothing submitted


def test_paths_resolve_from_the_jobs_directory_and_remote_urls_pass(tmp_path, tiny_shards, monkeypatch):
    """Relative shard paths are resolved against the directory the job runs in (where one submits); http(s) and
    pipe: URLs are the loader's business; a manifest given as a folder counts."""
    from launch.run import check_job_paths, create_run

    monkeypatch.chdir(tmp_path)
    cfg_path = REPO_ROOT / TRAIN
    sources = ('[{name: local, urls: "shards/shard-{000000..000003}.tar", manifest: shards},'
               ' {name: web, urls: "https://example.invalid/s-{000..009}.tar::pipe:curl -s http://x/{0..3}.tar"},'
               ' {name: file, urls: "file:shards/shard-000001.tar"}]')
    spec = load_any(write(tmp_path, 's.yaml', {'name': 'rel', 'train_config': str(cfg_path),
                                               'overrides': [f'data.train={sources}', 'data.val=[]'],
                                               'runs_root': 'runs'}))
    assert set(check_job_paths(spec, tmp_path)) == {'rel'}
    with pytest.raises(LaunchConfigError, match=r"data.train\[0\].urls: first shard shards/shard-000000.tar does not "
                                                r"exist \(relative to the job's directory /"):
        check_job_paths(spec, REPO_ROOT)  # the same config seen from another directory
    run = create_run(spec, 'sbatch', 'stage')
    assert run.workdir == tmp_path.resolve()
