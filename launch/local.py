"""Local mode: the stages of a run, one after the other, on this machine (the same worker as on Slurm).

Each stage starts ``tasks_per_node`` rank processes with the torchrun variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port) and each rank's stdout/stderr in
``logs/local_<rank>.out/.err``. A stage that exits with 75 (saved after a requeue signal) is restarted, up to
``max_requeues`` times; a stage that fails stops the run (its dependents do not start, as with afterok).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

from launch.run import Run
from pretrain.common.dist import free_port
from pretrain.engine.preemption import REQUEUE_EXIT_CODE

__all__ = ['run_local']


def _run_stage_once(run: Run, name: str, attempt: int) -> int:
    st = run.stage_spec(name)
    n = st.resources.tasks_per_node
    if st.resources.nodes != 1:
        print(f'[launch local] stage {name}: nodes={st.resources.nodes} on one machine: running '
              f'{n} ranks (one node)', flush=True)
    logs = run.stage_dir(name) / 'logs'
    port = free_port()
    env_base = dict(os.environ, PYTHONPATH=str(run.code_dir) + (
        f':{os.environ["PYTHONPATH"]}' if os.environ.get('PYTHONPATH') else ''),
        WORLD_SIZE=str(n), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(n),
        OMP_NUM_THREADS=str(st.resources.cpus_per_task), LAUNCH_LOCAL_ATTEMPT=str(attempt), **run.job_env())
    env_base.pop('SLURM_JOB_ID', None)
    procs = []
    for rank in range(n):
        env = dict(env_base, RANK=str(rank), LOCAL_RANK=str(rank))
        with open(logs / f'local_{rank}.out', 'a') as out, open(logs / f'local_{rank}.err', 'a') as err:
            procs.append(subprocess.Popen([run.meta['python'], '-P', '-m', 'launch.worker', *run.worker_argv(name)],
                                          env=env, stdout=out, stderr=err, cwd=str(run.code_dir)))
    codes: dict[int, int] = {}
    try:
        while len(codes) < n:
            for rank, p in enumerate(procs):
                if rank not in codes and p.poll() is not None:
                    codes[rank] = p.returncode
            failed = [c for c in codes.values() if c not in (0, REQUEUE_EXIT_CODE)]
            if failed:  # one rank failed: the others would wait in a collective forever
                for rank, p in enumerate(procs):
                    if rank not in codes:
                        p.send_signal(signal.SIGTERM)
                for rank, p in enumerate(procs):
                    codes.setdefault(rank, p.wait(timeout=60))
                break
            time.sleep(0.5)
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.kill()
        raise
    bad = [c for c in codes.values() if c not in (0, REQUEUE_EXIT_CODE)]
    if bad:
        return bad[0]
    return REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in codes.values() else 0


def run_local(run: Run) -> int:
    """Run every stage in order; returns 0 when all completed, else the failing stage's exit status."""
    for s in run.meta['stages']:
        name = s['name']
        st = run.stage_spec(name)
        s['job_ids'].append(f'local-{os.getpid()}')
        run.save()
        attempt = 0
        while True:
            print(f'[launch local] stage {name} (attempt {attempt + 1}); logs in {run.stage_dir(name) / "logs"}',
                  flush=True)
            code = _run_stage_once(run, name, attempt)
            if code == REQUEUE_EXIT_CODE and attempt < st.resources.max_requeues:
                attempt += 1
                continue
            break
        if code != 0:
            print(f'[launch local] stage {name} ended with status {code}; later stages are not run', flush=True)
            return code
        print(f'[launch local] stage {name} completed', flush=True)
    return 0
