"""A real one-node Slurm cluster on this machine, for the ``slurm`` tests.

``ensure_cluster()`` reuses a cluster whose ``slurmctld`` answers; otherwise (as root, with apt-get) it installs
Debian's ``slurm-wlm`` and ``munge`` if missing, writes a munge key and ``/etc/slurm/slurm.conf`` (one node with this
machine's CPUs and ~20 GB, one default partition), starts ``munged``, ``slurmctld`` and ``slurmd``, and waits until
``sinfo`` shows the node idle. It returns a :class:`Cluster`, or raises :class:`ClusterUnavailable` with the reason
when installing is impossible (not root, no apt-get) -- the fixture turns that into a skip. Anything else that goes
wrong (a daemon that does not come up) is an error, not a skip.

The daemons stay up after the tests (cheap when idle) so the next session reuses them; ``python -m
tests.slurm_cluster stop`` stops the ones this module started. From the command line: ``python -m
tests.slurm_cluster [start|stop|status]``.

Settings that matter for the tests, and why:
- ``MinJobAge=3600``: without accounting (no slurmdbd) ``sacct`` fails, so finished jobs are only visible to
  ``scontrol show job`` for MinJobAge seconds; an hour covers a test session.
- ``DefMemPerCPU``: with ``CR_Core_Memory`` a job without ``--mem`` would otherwise hold the whole node's memory.
- ``JobRequeue=1``: batch jobs may be requeued (``scontrol requeue``, Submitit's preemption path).
- ``AuthInfo=cred_expire=30``: a requeued job waits ``cred_expire`` seconds before it may start again (default 120;
  measured here: 143 s from requeue to restart), which would dominate the requeue tests; ``sched_interval=5``:
  the main scheduling loop every 5 s instead of 60 s.
- ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none``: no cgroups needed (containers, CI runners).
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ['Cluster', 'ClusterUnavailable', 'ensure_cluster', 'stop_cluster', 'slurm_cluster', 'MARKER']

SLURM_CONF = Path('/etc/slurm/slurm.conf')
MUNGE_KEY = Path('/etc/munge/munge.key')
MARKER = '# written by tests/slurm_cluster.py'
PARTITION = 'debug'
REAL_MEMORY_MB = 20000
STATE_DIR = Path('/var/spool/slurmctld')
SPOOL_DIR = Path('/var/spool/slurmd')
LOG_DIR = Path('/var/log/slurm')
APT_PACKAGES = ['slurm-wlm', 'munge']


class ClusterUnavailable(RuntimeError):
    """Slurm cannot be installed or started here for a reason outside the code under test (not root, no apt)."""


@dataclass(frozen=True)
class Cluster:
    node: str
    partition: str
    cpus: int
    real_memory_mb: int
    reused: bool  # True when slurmctld already answered (nothing was started)


def _run(cmd: list[str], timeout: float = 30, check: bool = False, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kw)


def _controller_answers() -> bool:
    if shutil.which('sinfo') is None:
        return False
    try:
        return _run(['sinfo', '-h', '-o', '%P'], timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _node_states() -> dict[str, str]:
    r = _run(['sinfo', '-h', '-N', '-o', '%N %T'], timeout=10)
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def _install() -> None:
    missing = [b for b in ('slurmctld', 'slurmd', 'sinfo', 'munged') if shutil.which(b) is None
               and not Path('/usr/sbin', b).exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f'Slurm is not installed ({", ".join(missing)} missing) and installing it needs root')
    if shutil.which('apt-get') is None:
        raise ClusterUnavailable(f'Slurm is not installed ({", ".join(missing)} missing) and there is no apt-get')
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    for cmd in (['apt-get', 'update'], ['apt-get', 'install', '-y', '--no-install-recommends', *APT_PACKAGES]):
        r = _run(cmd, timeout=600, env=env)
        if r.returncode != 0:
            # A machine without network or package mirrors: outside the code under test.
            raise ClusterUnavailable(f'{" ".join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-600:]}')


def _start_munge() -> None:
    if _run(['bash', '-c', 'munge -n | unmunge'], timeout=10).returncode == 0:
        return
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    if not MUNGE_KEY.exists():
        MUNGE_KEY.write_bytes(secrets.token_bytes(1024))
    shutil.chown(MUNGE_KEY, 'munge', 'munge')
    MUNGE_KEY.chmod(0o400)
    for d in ('/run/munge', '/var/lib/munge', '/var/log/munge'):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, 'munge', 'munge')
    r = _run(['runuser', '-u', 'munge', '--', '/usr/sbin/munged', '--force'], timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f'munged did not start: {r.stderr.strip()}')
    for _ in range(50):
        if _run(['bash', '-c', 'munge -n | unmunge'], timeout=10).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError('munged started but `munge -n | unmunge` still fails')


def slurm_conf_text(node: str, cpus: int, real_memory_mb: int = REAL_MEMORY_MB) -> str:
    """The slurm.conf of the one-node test cluster."""
    return f"""{MARKER}; rewritten when the test cluster is started
ClusterName=testcluster
SlurmctldHost={node}
AuthType=auth/munge
AuthInfo=cred_expire=30
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmUser=root
SlurmdUser=root
StateSaveLocation={STATE_DIR}
SlurmdSpoolDir={SPOOL_DIR}
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile={LOG_DIR}/slurmctld.log
SlurmdLogFile={LOG_DIR}/slurmd.log
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
MinJobAge=3600
KillWait=10
DefMemPerCPU=2000
SchedulerParameters=bf_interval=5,sched_interval=5,sched_min_interval=100000
NodeName={node} CPUs={cpus} RealMemory={real_memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _write_conf(node: str, cpus: int) -> None:
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
        raise ClusterUnavailable(f'{SLURM_CONF} exists, was not written by the tests, and its slurmctld does not '
                                 'answer; not overwriting a real configuration')
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(slurm_conf_text(node, cpus))
    for d in (STATE_DIR, SPOOL_DIR, LOG_DIR):
        d.mkdir(parents=True, exist_ok=True)


def _daemon_running(name: str) -> bool:
    return _run(['pgrep', '-x', name], timeout=5).returncode == 0


def ensure_cluster(timeout_s: float = 120) -> Cluster:
    """A running one-node cluster (reused, or installed and started here); see the module docstring."""
    node = socket.gethostname().split('.')[0]
    cpus = os.cpu_count() or 1
    if _controller_answers() and SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text() \
            and SLURM_CONF.read_text() != slurm_conf_text(node, cpus):
        # Our cluster, started with older settings of this file: restart its daemons with the current ones
        # (some, like AuthInfo, are only read at start).
        _stop_daemons(('/run/slurmd.pid', '/run/slurmctld.pid'))
    if _controller_answers():
        reused = True
    else:
        reused = False
        if os.geteuid() != 0:
            raise ClusterUnavailable('no Slurm controller answers and starting one needs root')
        _install()
        _write_conf(node, cpus)
        _start_munge()
        if not _daemon_running('slurmctld'):
            r = _run(['/usr/sbin/slurmctld'], timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f'slurmctld did not start ({r.returncode}): {r.stderr.strip()}; see '
                                   f'{LOG_DIR}/slurmctld.log')
        deadline = time.time() + 30
        while not _controller_answers():
            if time.time() > deadline:
                raise RuntimeError(f'slurmctld does not answer; see {LOG_DIR}/slurmctld.log')
            time.sleep(0.5)
        if not _daemon_running('slurmd'):
            r = _run(['/usr/sbin/slurmd'], timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f'slurmd did not start ({r.returncode}): {r.stderr.strip()}; see '
                                   f'{LOG_DIR}/slurmd.log')
    deadline = time.time() + timeout_s
    states: dict[str, str] = {}
    while time.time() < deadline:
        states = _node_states()
        if any(s.rstrip('*~#') in ('idle', 'mixed', 'allocated', 'completing') for s in states.values()):
            break
        for n, s in states.items():  # a node left down/drained by an earlier session: bring it back
            if s.startswith(('down', 'drain')):
                _run(['scontrol', 'update', f'nodename={n}', 'state=resume'], timeout=10)
        time.sleep(1)
    else:
        raise RuntimeError(f'no Slurm node became idle in {timeout_s:.0f}s: {states}; see {LOG_DIR}/')
    info = _run(['sinfo', '-h', '-N', '-o', '%N %c %m %P'], timeout=10).stdout.split()
    return Cluster(node=info[0], partition=info[3].rstrip('*'), cpus=int(info[1]), real_memory_mb=int(info[2]),
                   reused=reused)


def stop_cluster() -> None:
    """Stop slurmd, slurmctld and munged when the test cluster's slurm.conf is the one in place."""
    if not SLURM_CONF.exists() or MARKER not in SLURM_CONF.read_text():
        raise RuntimeError(f'{SLURM_CONF} was not written by the tests; not stopping a real cluster')
    _stop_daemons(('/run/slurmd.pid', '/run/slurmctld.pid', '/run/munge/munged.pid'))


def _stop_daemons(pidfiles: tuple[str, ...], timeout_s: float = 30) -> None:
    pids = []
    for pidfile in pidfiles:
        p = Path(pidfile)
        if p.exists():
            try:
                pid = int(p.read_text().split()[0])
                os.kill(pid, 15)
                pids.append(pid)
            except (ProcessLookupError, ValueError):
                pass
    deadline = time.time() + timeout_s
    for pid in pids:
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)


@pytest.fixture(scope='session')
def slurm_cluster() -> Cluster:
    """The one-node cluster (see :func:`ensure_cluster`); skips only when Slurm cannot be installed here."""
    try:
        return ensure_cluster()
    except ClusterUnavailable as e:
        pytest.skip(f'no Slurm cluster: {e}')


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else 'start'
    if cmd == 'start':
        t0 = time.time()
        c = ensure_cluster()
        print(f'{"reused" if c.reused else "started"} {c} in {time.time() - t0:.1f}s')
    elif cmd == 'stop':
        stop_cluster()
    elif cmd == 'status':
        print(_run(['sinfo'], timeout=10).stdout if _controller_answers() else 'no controller answers')
    else:
        print('usage: python -m tests.slurm_cluster [start|stop|status]', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
