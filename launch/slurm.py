"""Slurm: plain sbatch scripts, Submitit submission with afterok chains, and job state from scontrol / sacct."""
from __future__ import annotations

import os
import shlex
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from launch.config import Resources
from launch.run import Run

__all__ = ['sbatch_directives', 'sbatch_script', 'submit_sbatch', 'submit_submitit', 'query_job', 'cancel']


def sbatch_directives(r: Resources, job_name: str) -> list[tuple[str, object]]:
    """``(option, value)`` pairs for one stage's resources (value True: a bare flag); the same for both paths."""
    opts: list[tuple[str, object]] = [('job-name', job_name), ('nodes', r.nodes),
                                      ('ntasks-per-node', r.tasks_per_node), ('cpus-per-task', r.cpus_per_task)]
    if r.gpus_per_node:
        opts.append(('gpus-per-node', r.gpus_per_node))
    if r.mem_gb is not None:
        opts.append(('mem', f'{int(round(r.mem_gb * 1024))}M'))
    opts.append(('time', r.timeout_min))
    for key in ('partition', 'account', 'qos', 'constraint'):
        if getattr(r, key):
            opts.append((key, getattr(r, key)))
    if r.exclusive:
        opts.append(('exclusive', True))
    # No B: prefix: the signal goes to every task of the job steps (the ranks), not to the batch shell.
    opts += [('signal', f'{r.requeue_signals[0]}@{r.signal_delay_s}')] if r.requeue_signals else []
    opts += [('requeue', True) if r.max_requeues > 0 else ('no-requeue', True), ('open-mode', 'append')]
    opts += [(k.lstrip('-'), v) for k, v in r.sbatch_args.items()]
    return opts


def _flag(key: str, value) -> str:
    return f'--{key}' if value is True else f'--{key}={shlex.quote(str(value))}'


def sbatch_script(run: Run, name: str, dependency: str | None = None) -> str:
    """A self-contained batch script for stage ``name`` of ``run``: ``sbatch FILE`` runs it as it is."""
    st = run.stage_spec(name)
    sdir = run.stage_dir(name)
    logs = sdir / 'logs'
    opts = sbatch_directives(st.resources, f'{run.meta["name"]}.{name}')
    opts += [('output', str(logs / '%j_batch.out'))]
    if dependency:
        opts.append(('dependency', dependency))
    python = run.meta['python']
    worker = [python, '-P', '-m', 'launch.worker', *run.worker_argv(name)]
    lines = [
        '#!/bin/bash',
        f'# Stage {name!r} of run {run.root.name}, written by `python -m launch`; submit: sbatch {sdir}/job.sbatch',
        f'# Code: {run.code_dir} ({"snapshot taken at submission" if run.meta["snapshot"] else "the live repository"})'
        '; logs: one .out/.err per rank in logs/; status: python -m launch status ' + str(run.root),
        *[f'#SBATCH {_flag(k, v)}' for k, v in opts],
        'set -euo pipefail',
        f'cd {shlex.quote(str(run.workdir))}',
        f'export PYTHONPATH={shlex.quote(str(run.code_dir))}${{PYTHONPATH:+:$PYTHONPATH}}',
        '# Rendezvous: each rank derives it from the step\'s Slurm variables (pretrain.common.dist.rendezvous).',
        'export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}',
        *[f'export {k}={shlex.quote(v)}' for k, v in run.job_env().items()],
        'echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"',
        # --kill-on-bad-exit: one failed rank ends the step instead of leaving the others in a collective.
        f'srun --kill-on-bad-exit=1 --output={shlex.quote(str(logs))}/%j_%t.out '
        f'--error={shlex.quote(str(logs))}/%j_%t.err \\',
        '    ' + ' '.join(shlex.quote(a) for a in worker),
        '',
    ]
    return '\n'.join(lines)


def _sbatch(args: list[str]) -> str:
    r = subprocess.run(['sbatch', '--parsable', *args], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f'sbatch {" ".join(args)} failed ({r.returncode}): {r.stderr.strip()}')
    return r.stdout.strip().split(';')[0]


def submit_sbatch(run: Run) -> list[str]:
    """Write each stage's job.sbatch and submit them with sbatch, chained with afterok; returns the job ids."""
    ids: list[str] = []
    prev: str | None = None
    for s in run.meta['stages']:
        dep = f'afterok:{prev}' if prev else None
        path = run.stage_dir(s['name']) / 'job.sbatch'
        path.write_text(sbatch_script(run, s['name'], dep))
        job = _sbatch([str(path)])
        s['job_ids'].append(job)
        s['dependency'] = dep
        run.save()
        ids.append(job)
        prev = job
    return ids


@contextmanager
def _chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def submit_submitit(run: Run) -> list[str]:
    """Submit every stage through Submitit's AutoExecutor (Slurm), each stage after its predecessor with afterok.

    Submission happens from inside the code snapshot (as submitit.helpers.RsyncSnapshot does), with the snapshot
    first on PYTHONPATH, so the pickled task and everything it imports come from the snapshot."""
    import submitit

    from launch.worker import StageTask

    ids: list[str] = []
    prev: str | None = None
    for s in run.meta['stages']:
        name = s['name']
        r = run.stage_spec(name).resources
        ex = submitit.AutoExecutor(folder=run.stage_dir(name) / 'logs', cluster='slurm')
        extra = {k: v for k, v in sbatch_directives(r, '') if k in ('requeue', 'no-requeue')}
        extra.update({k.lstrip('-'): v for k, v in r.sbatch_args.items()})
        dep = f'afterok:{prev}' if prev else None
        if dep:
            extra['dependency'] = dep
        params = dict(name=f'{run.meta["name"]}.{name}', nodes=r.nodes, tasks_per_node=r.tasks_per_node,
                      cpus_per_task=r.cpus_per_task, timeout_min=r.timeout_min,
                      slurm_signal_delay_s=r.signal_delay_s, slurm_additional_parameters=extra,
                      slurm_setup=[f'export PYTHONPATH={shlex.quote(str(run.code_dir))}${{PYTHONPATH:+:$PYTHONPATH}}',
                                   'export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}',
                                   *[f'export {k}={shlex.quote(v)}' for k, v in run.job_env().items()]])
        if r.gpus_per_node:
            params['gpus_per_node'] = r.gpus_per_node
        if r.mem_gb is not None:
            params['mem_gb'] = r.mem_gb
        for key in ('partition', 'account', 'qos', 'constraint'):
            if getattr(r, key):
                params[f'slurm_{key}'] = getattr(r, key)
        if r.exclusive:
            params['slurm_exclusive'] = True
        ex.update_parameters(**params)
        env_before = os.environ.get('PYTHONPATH')
        os.environ['PYTHONPATH'] = str(run.code_dir) + (f':{env_before}' if env_before else '')
        try:
            with _chdir(run.code_dir):
                job = ex.submit(StageTask(run.worker_argv(name), str(run.code_dir)))
        finally:
            if env_before is None:
                os.environ.pop('PYTHONPATH', None)
            else:
                os.environ['PYTHONPATH'] = env_before
        s['job_ids'].append(str(job.job_id))
        s['dependency'] = dep
        run.save()
        ids.append(str(job.job_id))
        prev = str(job.job_id)
    return ids


def _parse_scontrol(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for tok in text.split():
        if '=' in tok:
            k, v = tok.split('=', 1)
            out.setdefault(k, v)
    return out


def query_job(job_id: str) -> dict | None:
    """``{'state', 'reason', 'dependency', 'exit_code', 'restarts', 'source'}`` from scontrol (live and recently
    finished jobs), else sacct (accounting), else None (Slurm has forgotten the job)."""
    try:
        r = subprocess.run(['scontrol', 'show', 'job', '-o', str(job_id)], capture_output=True, text=True,
                           timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        r = None
    if r is not None and r.returncode == 0 and r.stdout.strip():
        f = _parse_scontrol(r.stdout)
        return {'state': f.get('JobState', 'UNKNOWN'), 'reason': f.get('Reason', 'None'),
                'dependency': f.get('Dependency', '(null)'), 'exit_code': f.get('ExitCode'),
                'restarts': int(f.get('Restarts', 0) or 0), 'source': 'scontrol'}
    try:
        r = subprocess.run(['sacct', '-j', str(job_id), '-X', '-n', '-P', '-o', 'State,ExitCode,Reason'],
                           capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if r.returncode == 0 and r.stdout.strip():
        state, exit_code, reason = (r.stdout.strip().splitlines()[-1].split('|') + ['', '', ''])[:3]
        return {'state': state.split()[0], 'reason': reason or 'None', 'dependency': '(null)',
                'exit_code': exit_code, 'restarts': None, 'source': 'sacct'}
    return None


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(['scancel', *job_ids], capture_output=True, text=True, timeout=60)


def wait_until(predicate, timeout_s: float, poll_s: float = 2.0, what: str = 'condition'):
    """Poll ``predicate()`` until it returns a truthy value (returned) or ``timeout_s`` passes (TimeoutError)."""
    deadline = time.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f'{what} not reached in {timeout_s:.0f}s')
        time.sleep(poll_s)


def log_files(run: Run, name: str) -> list[Path]:
    return sorted((run.stage_dir(name) / 'logs').glob('*.out')) + sorted((run.stage_dir(name) / 'logs').glob('*.err'))
