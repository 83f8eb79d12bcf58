"""Launch across two Slurm nodes (n1, n2: network namespaces on a bridge, each with its own slurmd; see
tests/slurm_cluster.py), one gloo rank per node: the rendezvous and ranks from the node list, USR2 save-and-requeue on
both nodes to the same weights as an uninterrupted run, a node lost mid-run, and a two-stage afterok cascade.
CPU only, tiny InternImage on the 200 real ImageNet photos (the shards and helpers of test_launch_slurm.py)."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import lose_node, restore_node, slurm_cluster, two_node_cluster  # noqa: F401 - fixtures
from tests.test_launch_slurm import (  # noqa: F401 - fixtures
    TRAIN_CONFIG,
    events,
    fast_overrides,
    fp32_weights,
    jobs_to_cancel,
    launch,
    logs_tail,
    run_folder,
    shards,
    wait_finished,
    write_yaml,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.dist]

STEPS = 16
RESOURCES_2N = {'nodes': 2, 'tasks_per_node': 1, 'cpus_per_task': 1, 'mem_gb': 3, 'timeout_min': 10,
                'partition': 'twonode', 'max_requeues': 2, 'signal_delay_s': 60}
# A lost peer is noticed by the gloo collective timeout (no FIN arrives over a cut link): 15 s, not the default 10 min.
COLLECTIVE_TIMEOUT_MIN = 0.25
RANK_LINE = re.compile(r'\[launch rank (\d+)\] rank (\d+) of (\d+), local rank (\d+), node (\S+);'
                       r'.* rendezvous (\S+):(\d+) \((\w+)\)')


def stage_yaml(tmp: Path, name: str, shards: Path, steps: int, interval: int, extra: list[str] = ()) -> Path:  # noqa: F811
    return write_yaml(tmp / f'{name}.yaml', {
        'name': name, 'train_config': TRAIN_CONFIG, 'overrides': fast_overrides(shards, steps, interval) + list(extra),
        'runs_root': str(tmp / 'runs'), 'resources': RESOURCES_2N})


def submitted(r: subprocess.CompletedProcess, jobs: list[str]) -> tuple[Path, list[dict]]:
    """The run folder and its stages of a `python -m launch ...` that submitted; their jobs cancelled at teardown."""
    assert r.returncode == 0, r.stderr
    run = run_folder(r.stdout)
    stages = json.loads((run / 'run.json').read_text())['stages']
    jobs += [s['job_ids'][-1] for s in stages]
    return run, stages


def rank_lines(stage: Path) -> dict[int, list[tuple]]:
    """rank -> each ``(rank, world, local rank, node, master addr, port, source)`` its worker logged (one a start)."""
    out: dict[int, list[tuple]] = {}
    for f in sorted((stage / 'logs').glob('*.out')):
        for m in RANK_LINE.finditer(f.read_text()):
            out.setdefault(int(m.group(1)), []).append((int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5),
                                                        m.group(6), int(m.group(7)), m.group(8)))
    return out


def wait_metrics_rows(stage: Path, rows: int, timeout_s: float = 240) -> None:
    metrics = stage / 'out' / 'metrics.jsonl'
    deadline = time.time() + timeout_s
    while not (metrics.exists() and sum(1 for _ in metrics.open()) >= rows):
        assert time.time() < deadline, logs_tail(stage)
        time.sleep(0.2)


@pytest.fixture(scope='module')
def cascade_2n(two_node_cluster, shards, tmp_path_factory):  # noqa: F811
    """A two-stage cascade (`python -m launch cascade`) on both nodes: 'first' (STEPS steps, uninterrupted, the
    reference weights of the USR2 test), then 'second' (2 steps, afterok, from first's weights)."""
    tmp = tmp_path_factory.mktemp('casc2n')
    cfg = write_yaml(tmp / 'cascade.yaml', {
        'name': 'casc2n', 'runs_root': str(tmp / 'runs'), 'resources': RESOURCES_2N,
        'stages': [{'name': 'first', 'train_config': TRAIN_CONFIG, 'overrides': fast_overrides(shards, STEPS, 4)},
                   {'name': 'second', 'train_config': TRAIN_CONFIG, 'overrides': fast_overrides(shards, 2, 2)}]})
    jobs: list[str] = []
    try:
        run, stages = submitted(launch('cascade', str(cfg)), jobs)
        rows = wait_finished(run, 360)
    finally:
        subprocess.run(['scancel', *jobs], capture_output=True, timeout=60)
    return {'run': run, 'stages': stages, 'rows': rows}


@pytest.fixture(scope='module')
def usr2_2n(two_node_cluster, shards, tmp_path_factory):  # noqa: F811
    """A STEPS-step stage submitted with `python -m launch submit` (Submitit), sent `scancel --signal=USR2` once
    past step 5, requeued, and run to the end."""
    tmp = tmp_path_factory.mktemp('usr2_2n')
    jobs: list[str] = []
    try:
        run, stages = submitted(launch('submit', str(stage_yaml(tmp, 'usr2_2n', shards, STEPS, 4))), jobs)
        job, stage = stages[0]['job_ids'][0], run / 'stages' / 'usr2_2n'
        wait_metrics_rows(stage, 5)
        r = subprocess.run(['scancel', '--signal=USR2', job], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        rows = wait_finished(run, 300)
    finally:
        subprocess.run(['scancel', *jobs], capture_output=True, timeout=60)
    return {'run': run, 'job': job, 'rows': rows, 'stage': stage}


def test_submitted_stage_runs_across_both_nodes(usr2_2n):
    stage, job, rows = usr2_2n['stage'], usr2_2n['job'], usr2_2n['rows']
    assert rows[0]['state'] == 'COMPLETED' and rows[0]['step'] == STEPS, logs_tail(stage)
    assert events(stage)[0]['world_size'] == 2
    # One rank per node, each with local rank 0; both met at the first node of the job's node list, on the port of
    # the job id; the same after the requeue (one line per start).
    port = 10000 + int(job) % 20000
    assert rank_lines(stage) == {0: [(0, 2, 0, 'n1', 'n1', port, 'slurm')] * 2,
                                 1: [(1, 2, 0, 'n2', 'n1', port, 'slurm')] * 2}, logs_tail(stage)
    assert 'checkpoint committed' in (stage / 'logs' / f'{job}_0_log.out').read_text()


def test_usr2_on_two_nodes_resumes_to_same_weights(usr2_2n, cascade_2n):
    import torch
    stage, rows = usr2_2n['stage'], usr2_2n['rows']
    assert rows[0]['state'] == 'COMPLETED' and rows[0]['restarts'] == 1 and rows[0]['step'] == STEPS, logs_tail(stage)
    ev = events(stage)
    requeued = [e for e in ev if e['event'] == 'end' and e['status'] == 'requeued']
    assert len(requeued) == 1 and requeued[0]['signal'] == 'USR2', ev
    step, ckpt = requeued[0]['step'], Path(requeued[0]['checkpoint'])
    assert 5 <= step < STEPS and ckpt.name == f'step_{step:08d}' and (ckpt / 'COMPLETE').is_file()
    # both nodes saved that step: each rank's ZeRO partition is there
    shards_saved = sorted(p.name for p in ckpt.rglob('*optim_states.pt'))
    assert len(shards_saved) == 2 and any('rank_0' in n for n in shards_saved) \
        and any('rank_1' in n for n in shards_saved), shards_saved
    reference_rows = cascade_2n['rows']
    assert reference_rows[0]['state'] == 'COMPLETED' and reference_rows[0]['step'] == STEPS, reference_rows
    weights = fp32_weights(rows[0]['last_checkpoint'])
    reference = fp32_weights(reference_rows[0]['last_checkpoint'])
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in weights), \
        sorted(((weights[k] - reference[k]).abs().max().item(), k) for k in weights)[-5:]


def test_node_lost_mid_run_is_noticed_and_rerun_resumes(two_node_cluster, shards, tmp_path,  # noqa: F811
                                                       jobs_to_cancel):  # noqa: F811
    """n2's link is cut and everything on it killed while the job trains (saving every 2 steps, so the loss often
    lands in a save): rank 0 on n1 notices within the collective timeout, requeues the job and exits; once n2 is back
    the rerun resumes from the newest complete checkpoint and finishes. Plain sbatch (`launch sbatch --submit`)."""
    steps = 20  # watchdog off (it must be shorter than the collective timeout; 15 s is too tight at start-up)
    cfg = stage_yaml(tmp_path, 'lost2n', shards, steps, 2,
                     [f'run.collective_timeout_min={COLLECTIVE_TIMEOUT_MIN}', 'run.watchdog_min=0'])
    run, stages = submitted(launch('sbatch', str(cfg), '--submit'), jobs_to_cancel)
    job, stage = stages[0]['job_ids'][0], run / 'stages' / 'lost2n'
    ckpts = stage / 'out' / 'checkpoints'
    wait_metrics_rows(stage, 7)
    # Aim the loss at a save in progress (a step folder without COMPLETE yet), so that a half-written checkpoint is
    # there to be refused; a save too quick to catch within 30 s is lost from after it.
    deadline = time.time() + 30
    while time.time() < deadline and not any(not (d / 'COMPLETE').exists() for d in ckpts.glob('step_*')):
        time.sleep(0.02)
    t_lost = time.time()
    lose_node('n2')
    try:
        deadline = time.time() + 120
        while not [e for e in events(stage) if e['event'] == 'end']:
            assert time.time() < deadline, f'rank 0 did not notice the lost node in 120 s:\n{logs_tail(stage)}'
            time.sleep(0.2)
        end = [e for e in events(stage) if e['event'] == 'end'][0]
        noticed_s = end['time'] - t_lost
        # Checkpoints as the failed attempt left them, before anything reruns.
        seen = {int(p.name.split('_')[1]): (p / 'COMPLETE').is_file() for p in ckpts.glob('step_*')}
    finally:
        restore_node('n2')
    print(f'node loss noticed by rank 0 after {noticed_s:.1f} s (collective timeout '
          f'{COLLECTIVE_TIMEOUT_MIN * 60:g} s); checkpoints then (step: complete): {dict(sorted(seen.items()))}')
    assert end['status'] == 'requeued' and end.get('stalled') and end.get('requeued'), end
    assert 'a collective timed out' in end['error'], end  # noticed by the timeout, not the watchdog
    assert noticed_s < COLLECTIVE_TIMEOUT_MIN * 60 + 45, noticed_s  # the timeout plus the save/exit, never minutes
    rows = wait_finished(run, 300)
    assert rows[0]['state'] == 'COMPLETED' and rows[0]['step'] == steps and rows[0]['restarts'] >= 1, \
        logs_tail(stage)
    newest_complete = max(s for s, done in seen.items() if done)
    rank0 = (stage / 'logs' / f'{job}_0.out').read_text()
    resumed = re.findall(r'resumed from (\S+) at step (\d+)', rank0)
    assert resumed, rank0[-3000:]
    assert resumed[0] == (str(ckpts / f'step_{newest_complete:08d}'), str(newest_complete)), (resumed, seen)
    assert all(step > newest_complete for step, done in seen.items() if not done), seen  # only the last save is torn
    # the rerun ran on both nodes again
    assert [x[3] for x in rank_lines(stage)[1]][-1] == 'n2'


def test_cascade_afterok_on_two_nodes(cascade_2n):
    run, (first, second), rows = cascade_2n['run'], cascade_2n['stages'], cascade_2n['rows']
    assert second['dependency'] == f'afterok:{first["job_ids"][0]}'
    assert [x['state'] for x in rows] == ['COMPLETED', 'COMPLETED'], rows
    d1, d2 = run / 'stages' / 'first', run / 'stages' / 'second'
    assert events(d2)[0]['time'] >= events(d1)[-1]['time']  # the dependent started after its predecessor ended
    assert (d2 / 'init' / f'first_step_{STEPS:08d}.pt').is_file(), logs_tail(d2)  # from the predecessor's weights
    for d in (d1, d2):
        lines = rank_lines(d)
        assert [x[3] for x in lines[0]] == ['n1'] and [x[3] for x in lines[1]] == ['n2'], lines
