"""One entry path (issue 19 §6) and the pieces that bound a hang (§0), one process each: the rendezvous from Slurm
variables, the shared exit statuses and requeue limit, the watchdog on a really stuck process, the loader's worker
start method and what it ships, and full training batches after skipped samples (§1)."""
from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pretrain.common.dist import detect_env, rendezvous, slurm_port

REPO = Path(__file__).resolve().parents[1]


# ---- rendezvous ----------------------------------------------------------------------------------------------------

def test_rendezvous_prefers_the_step_node_list_and_the_job_port():
    step = {'SLURM_JOB_ID': '123456', 'SLURM_JOB_NODELIST': 'gpu[01-08]', 'SLURM_STEP_NODELIST': 'gpu[05-06]'}
    # Inside an srun step that uses part of the allocation, the ranks run on the step's nodes, not the job's first.
    assert rendezvous(step) == ('gpu05', 10000 + 123456 % 20000)
    assert rendezvous({k: v for k, v in step.items() if k != 'SLURM_STEP_NODELIST'}) == ('gpu01', slurm_port(123456))
    assert rendezvous({**step, 'MASTER_ADDR': 'head', 'MASTER_PORT': '4321'}) == ('head', 4321)
    assert slurm_port('19999') == 29999 and slurm_port(20000) == 10000  # a requeued job (same id): same port
    with pytest.raises(ValueError, match='SLURM_STEP_NODELIST'):
        rendezvous({'SLURM_JOB_ID': '1'})
    with pytest.raises(ValueError, match='SLURM_JOB_ID'):
        rendezvous({'SLURM_STEP_NODELIST': 'n1'})


def test_detect_env_uses_the_one_rendezvous_under_slurm_and_torchrun_wins():
    env = {'SLURM_PROCID': '3', 'SLURM_NTASKS': '4', 'SLURM_LOCALID': '1', 'SLURM_JOB_ID': '77',
           'SLURM_JOB_NODELIST': 'a[1-2]', 'SLURM_STEP_NODELIST': 'a2'}
    e = detect_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (3, 4, 1, 'a2', 10077)
    e = detect_env({**env, 'RANK': '0', 'WORLD_SIZE': '2', 'MASTER_ADDR': 'x', 'MASTER_PORT': '5'})
    assert (e.rank, e.world_size, e.master_addr, e.master_port, e.source) == (0, 2, 'x', 5, 'torchrun')


def test_both_command_lines_share_the_requeue_limit_and_the_entry():
    from launch.worker import parse_args
    from pretrain.engine.run import DEFAULT_MAX_REQUEUES

    assert parse_args(['--stage-dir', 'd', 'c.yaml']).max_requeues == DEFAULT_MAX_REQUEUES
    cli = subprocess.run([sys.executable, '-m', 'pretrain', 'train', '--help'], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0 and 'run_training' in cli.stdout
    for module in ('pretrain/engine/cli.py', 'launch/worker.py'):  # neither builds a Trainer of its own
        text = (REPO / module).read_text()
        assert 'run_training(' in text and 'Trainer(' not in text, module


# ---- watchdog: a real stuck process --------------------------------------------------------------------------------

_STUCK = textwrap.dedent('''
    import sys, time
    from pretrain.engine import watchdog
    watchdog.start(float(sys.argv[1]) / 60, rank=5, dump_dir=sys.argv[2],
                   on_stall=lambda reason: print('on_stall:', reason, flush=True))
    for _ in range(3):
        watchdog.beat()
        time.sleep(0.1)
    with watchdog.paused():  # longer than the limit, but paused: not a stall
        time.sleep(3 * float(sys.argv[1]))
    def wait_for_a_peer_that_never_answers():
        while True:
            time.sleep(1)
    wait_for_a_peer_that_never_answers()
''')


def test_watchdog_dumps_every_stack_and_exits_75_on_a_stuck_process(tmp_path):
    from pretrain.engine.watchdog import STALL_EXIT_CODE

    r = subprocess.run([sys.executable, '-c', _STUCK, '1.5', str(tmp_path / 'dump')], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == STALL_EXIT_CODE == 75, r.stderr
    assert '[watchdog rank 5] no progress for' in r.stderr and 'run.watchdog_min=0.025' in r.stderr
    # Every thread: the main one where it is stuck (past the paused block, 3x the limit, which did not fire), and
    # the watchdog's own.
    assert 'in wait_for_a_peer_that_never_answers' in r.stderr
    assert '\nThread 0x' in r.stderr and 'Current thread 0x' in r.stderr
    dump = (tmp_path / 'dump' / 'rank5.txt').read_text()
    assert 'in wait_for_a_peer_that_never_answers' in dump
    assert r.stdout.startswith('on_stall: no progress for')


# ---- data: worker start method, pickling, full training batches ----------------------------------------------------

def test_loader_workers_start_from_the_forkserver_and_what_they_get_pickles():
    from data_pipelines.loader import SourceSpec, build_loader
    from data_pipelines.text import build_tokenizer
    from data_pipelines.transforms import build_train_transform
    from tests.data_helpers import CC12M_TAR

    tokenizer = build_tokenizer('ViT-B-32', context_length=16)
    loader = build_loader(SourceSpec('cc12m', CC12M_TAR), batch_size=4, num_workers=1,
                          transform=build_train_transform(32), tokenizer=tokenizer)
    assert loader.multiprocessing_context.get_start_method() == 'forkserver'
    copy = pickle.loads(pickle.dumps(loader.dataset))  # what each worker receives
    assert torch.equal(copy.tokenizer('a photo of a cat'), tokenizer('a photo of a cat'))
    batch = next(iter(loader))
    assert batch['image'].shape == (4, 3, 32, 32) and batch['text'].shape == (4, 16)
    with pytest.raises(ValueError, match='worker_start_method'):
        build_loader(SourceSpec('cc12m', CC12M_TAR), batch_size=4, num_workers=1, transform=build_train_transform(32),
                     worker_start_method='threads')


@pytest.mark.parametrize('drop_last', [True, False])
def test_a_skipped_sample_never_leaves_a_short_training_batch(tmp_path, drop_last):
    from data_pipelines.loader import SourceSpec, build_loader
    from data_pipelines.transforms import build_train_transform
    from tests.data_helpers import IMAGENET_SAMPLES, read_tar, write_tar
    photos = sorted(Path(IMAGENET_SAMPLES).iterdir())[:8]
    samples = [(f's{i}', {'jpg': p.read_bytes(), 'cls': b'1'}) for i, p in enumerate(photos)]
    samples[5] = ('s5', {'jpg': b'not a jpeg', 'cls': b'1'})
    write_tar(str(tmp_path / 'a.tar'), samples)
    assert len(read_tar(str(tmp_path / 'a.tar'))) == 8
    loader = build_loader(SourceSpec('x', str(tmp_path / 'a.tar')), batch_size=4, num_workers=0,
                          transform=build_train_transform(32), drop_last=drop_last)
    sizes = [b['image'].shape[0] for b in loader]
    assert loader.skip_counts() and sum(loader.skip_counts().values()) == 1
    # Training (drop_last): the short batch of 3 is dropped; evaluation keeps it.
    assert sizes == ([4] if drop_last else [4, 3])


def test_evaluation_beats_the_watchdog_also_after_this_ranks_share_is_used_up():
    """A rank whose val share ended keeps calling next(it, None) until every rank is done: that is progress too."""
    from pretrain.engine import watchdog
    from pretrain.engine.data import _BeatingLoader

    it = iter(_BeatingLoader([1, 2]))
    assert [next(it), next(it)] == [1, 2]
    before = watchdog._last_beat_s
    assert next(it, None) is None
    assert watchdog._last_beat_s > before
