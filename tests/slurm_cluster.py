"""A real one-node Slurm cluster on this machine, for the ``slurm`` tests, and two more nodes in network namespaces.

``ensure_cluster()`` reuses a cluster whose ``slurmctld`` answers; otherwise (as root, with apt-get) it installs
Debian's ``slurm-wlm`` and ``munge`` if missing, writes a munge key and ``/etc/slurm/slurm.conf`` (one node with this
machine's CPUs and ~20 GB, one default partition), starts ``munged``, ``slurmctld`` and ``slurmd``, and waits until
``sinfo`` shows the node idle. It returns a :class:`Cluster`, or raises :class:`ClusterUnavailable` with the reason
when installing is impossible (not root, no apt-get) -- the fixture turns that into a skip. Anything else that goes
wrong (a daemon that does not come up) is an error, not a skip.

The daemons stay up after the tests (cheap when idle) so the next session reuses them; ``python -m
tests.slurm_cluster stop`` stops the ones this module started. From the command line: ``python -m
tests.slurm_cluster [start|stop|status|two-nodes|stop-two-nodes]``.

Settings that matter for the tests, and why:
- ``MinJobAge=3600``: without accounting (no slurmdbd) ``sacct`` fails, so finished jobs are only visible to
  ``scontrol show job`` for MinJobAge seconds; an hour covers a test session.
- ``DefMemPerCPU``: with ``CR_Core_Memory`` a job without ``--mem`` would otherwise hold the whole node's memory.
- ``JobRequeue=1``: batch jobs may be requeued (``scontrol requeue``, Submitit's preemption path).
- ``AuthInfo=cred_expire=30``: a requeued job waits ``cred_expire`` seconds before it may start again (default 120;
  measured here: 143 s from requeue to restart), which would dominate the requeue tests; ``sched_interval=5``:
  the main scheduling loop every 5 s instead of 60 s.
- ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none``: no cgroups needed (containers, CI runners).
- ``SlurmdSpoolDir``, ``SlurmdPidFile`` and ``SlurmdLogFile`` end in ``%n`` (the node name): three slurmd share this
  machine's file system.

Two-node cluster (``start_two_nodes()`` / ``stop_two_nodes()``, the ``two_node_cluster`` fixture): the same
slurm.conf also defines nodes ``n1`` and ``n2`` (``NodeAddr`` 10.77.0.11 / .12) in partition ``twonode`` (not the
default, so the one-node tests never land there; its nodes are DOWN while the fixture is not up). The fixture makes a
bridge ``slurmtbr0`` (10.77.0.1/24) in the root namespace and, per node, a network namespace ``slurmtest-nX`` joined
to it by a veth pair, with its own UTS namespace (hostname ``nX``, as on a real cluster, so gloo binds the node's own
address) and its own ``/etc/hosts`` (``/etc/netns/<ns>/hosts`` bound over it in a private mount namespace: the
controller's name -> 10.77.0.1, ``n1``/``n2`` -> their addresses). Each runs ``slurmd -N nX``; slurmctld and munged
stay in the root namespace (munge's socket is a file, visible from the namespaces). Every packet between the nodes
and the controller stays on the bridge. Teardown cancels the partition's jobs, kills every process in the namespaces
(their slurmd and what it started), deletes the namespaces (and so the veth pairs), the bridge, the hosts files and
the nodes' spool and pid files, and marks ``n1``/``n2`` DOWN; slurm.conf is not changed at all, so both clusters work
in one session.
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

__all__ = ['Cluster', 'ClusterUnavailable', 'ensure_cluster', 'stop_cluster', 'slurm_cluster', 'MARKER',
           'TwoNodeCluster', 'start_two_nodes', 'stop_two_nodes', 'lose_node', 'restore_node', 'two_node_cluster']

SLURM_CONF = Path('/etc/slurm/slurm.conf')
MUNGE_KEY = Path('/etc/munge/munge.key')
MARKER = '# written by tests/slurm_cluster.py'
PARTITION = 'debug'
REAL_MEMORY_MB = 20000
STATE_DIR = Path('/var/spool/slurmctld')
SPOOL_DIR = Path('/var/spool/slurmd')
LOG_DIR = Path('/var/log/slurm')
APT_PACKAGES = ['slurm-wlm', 'munge']
OLD_SLURMD_PIDFILE = '/run/slurmd.pid'  # where slurmd wrote its pid before the %n paths (an older running cluster)

TWO_NODE_PARTITION = 'twonode'
BRIDGE = 'slurmtbr0'
BRIDGE_ADDR = '10.77.0.1'
NODE_ADDRS = {'n1': '10.77.0.11', 'n2': '10.77.0.12'}
NODE_MEMORY_MB = 8000
NETNS_PREFIX = 'slurmtest-'


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
    """The slurm.conf of the test cluster: the one node ``node`` in the default partition, and the namespace nodes."""
    two_nodes = '\n'.join(f'NodeName={n} NodeAddr={a} CPUs={cpus} RealMemory={NODE_MEMORY_MB} State=UNKNOWN'
                          for n, a in NODE_ADDRS.items())
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
SlurmdSpoolDir={SPOOL_DIR}/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile={LOG_DIR}/slurmctld.log
SlurmdLogFile={LOG_DIR}/slurmd-%n.log
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
{two_nodes}
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName={TWO_NODE_PARTITION} Nodes={",".join(NODE_ADDRS)} Default=NO MaxTime=INFINITE State=UP
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


def _slurmd_pidfile(node: str) -> Path:
    return Path(f'/run/slurmd-{node}.pid')


def _pid_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().split()[0]), 0)
        return True
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return False


def ensure_cluster(timeout_s: float = 120) -> Cluster:
    """A running one-node cluster (reused, or installed and started here); see the module docstring."""
    node = socket.gethostname().split('.')[0]
    cpus = os.cpu_count() or 1
    if _controller_answers() and SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text() \
            and SLURM_CONF.read_text() != slurm_conf_text(node, cpus):
        # Our cluster, started with older settings of this file: restart its daemons with the current ones
        # (some, like AuthInfo, are only read at start).
        _stop_daemons((OLD_SLURMD_PIDFILE, str(_slurmd_pidfile(node)), '/run/slurmctld.pid'))
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
        if not _pid_alive(_slurmd_pidfile(node)):  # by pid file: the namespace nodes run slurmd too
            r = _run(['/usr/sbin/slurmd', '-N', node], timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f'slurmd did not start ({r.returncode}): {r.stderr.strip()}; see '
                                   f'{LOG_DIR}/slurmd-{node}.log')
    deadline = time.time() + timeout_s
    states: dict[str, str] = {}
    while time.time() < deadline:
        states = {n: s for n, s in _node_states().items() if n == node}
        if any(s.rstrip('*~#') in ('idle', 'mixed', 'allocated', 'completing') for s in states.values()):
            break
        for n, s in states.items():  # the node left down/drained by an earlier session: bring it back
            if s.startswith(('down', 'drain')):
                _run(['scontrol', 'update', f'nodename={n}', 'state=resume'], timeout=10)
        time.sleep(1)
    else:
        raise RuntimeError(f'no Slurm node became idle in {timeout_s:.0f}s: {states}; see {LOG_DIR}/')
    info = _run(['sinfo', '-h', '-N', '-n', node, '-p', PARTITION, '-o', '%N %c %m %P'], timeout=10).stdout.split()
    return Cluster(node=info[0], partition=info[3].rstrip('*'), cpus=int(info[1]), real_memory_mb=int(info[2]),
                   reused=reused)


def stop_cluster() -> None:
    """Stop the namespace nodes, then slurmd, slurmctld and munged, when the test cluster's slurm.conf is the one in
    place."""
    if not SLURM_CONF.exists() or MARKER not in SLURM_CONF.read_text():
        raise RuntimeError(f'{SLURM_CONF} was not written by the tests; not stopping a real cluster')
    stop_two_nodes()
    node = socket.gethostname().split('.')[0]
    _stop_daemons((OLD_SLURMD_PIDFILE, str(_slurmd_pidfile(node)), '/run/slurmctld.pid', '/run/munge/munged.pid'))


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


@dataclass(frozen=True)
class TwoNodeCluster:
    nodes: tuple[str, ...]  # Slurm node names, each in its own network namespace
    partition: str
    node_addrs: dict[str, str]  # node name -> its address on the bridge
    netns: dict[str, str]  # node name -> its network namespace


def _netns(node: str) -> str:
    return NETNS_PREFIX + node


def _veth(node: str) -> str:
    return f'slt-{node}'  # the root-namespace end of the node's veth pair


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = _run(['ip', *args], timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f'ip {" ".join(args)} failed ({r.returncode}): {r.stderr.strip()}')
    return r


def _netns_pids(node: str) -> list[int]:
    r = _run(['ip', 'netns', 'pids', _netns(node)], timeout=10)
    return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []


def _kill_netns_processes(node: str, timeout_s: float = 10) -> None:
    """SIGKILL every process in the node's network namespace (its slurmd and all it started), and wait for them."""
    deadline = time.time() + timeout_s
    while (pids := _netns_pids(node)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    if _netns_pids(node):
        raise RuntimeError(f'processes {_netns_pids(node)} in {_netns(node)} survive SIGKILL')


def _start_slurmd_in_netns(node: str) -> None:
    (SPOOL_DIR / node).mkdir(parents=True, exist_ok=True)
    # Not `ip netns exec`: it remounts /sys, hiding the cgroup mounts slurmd needs. A private mount namespace for the
    # node's /etc/hosts, and a UTS namespace for its hostname (gloo binds the address its hostname resolves to).
    hosts = Path('/etc/netns', _netns(node), 'hosts')
    r = _run(['nsenter', f'--net=/run/netns/{_netns(node)}', '--', 'unshare', '--mount', '--uts', '--', 'sh', '-c',
              f'mount --bind {hosts} /etc/hosts && hostname {node} && exec /usr/sbin/slurmd -N {node}'], timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f'slurmd -N {node} in {_netns(node)} did not start ({r.returncode}): {r.stderr.strip()}; '
                           f'see {LOG_DIR}/slurmd-{node}.log')


def _wait_nodes_idle(nodes: list[str], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    resumed: set[str] = set()
    while True:
        states = _node_states()
        if all(states.get(n, '').rstrip('*~#') in ('idle', 'mixed', 'allocated') for n in nodes):
            return
        for n in nodes:  # DOWN from an earlier teardown or node loss; registered again now, so resumable
            if states.get(n, '').startswith(('down', 'drain')) and not states[n].endswith('*') and n not in resumed:
                _run(['scontrol', 'update', f'nodename={n}', 'state=resume'], timeout=10)
                resumed.add(n)
        if time.time() > deadline:
            raise RuntimeError(f'nodes {nodes} not idle in {timeout_s:.0f}s: {states}; see {LOG_DIR}/slurmd-n*.log')
        time.sleep(0.5)


def start_two_nodes(timeout_s: float = 90) -> TwoNodeCluster:
    """Nodes n1 and n2 in network namespaces on a bridge, each with its own slurmd, registered with the one-node
    cluster's slurmctld (started first with :func:`ensure_cluster`); waits until both are idle. Leftovers of an
    earlier session that died are removed first. Raises :class:`ClusterUnavailable` without root or ``ip``."""
    if os.geteuid() != 0 or shutil.which('ip') is None or shutil.which('unshare') is None \
            or shutil.which('nsenter') is None:
        raise ClusterUnavailable('network namespaces need root, `ip` (iproute2), `unshare` and `nsenter`')
    ensure_cluster()
    if f'NodeName={next(iter(NODE_ADDRS))} ' not in SLURM_CONF.read_text():
        raise ClusterUnavailable(f'{SLURM_CONF} does not define the namespace nodes {list(NODE_ADDRS)}')
    stop_two_nodes()
    hosts_lines = ['127.0.0.1 localhost', f'{BRIDGE_ADDR} {socket.gethostname().split(".")[0]}',
                   *[f'{a} {n}' for n, a in NODE_ADDRS.items()]]
    try:
        _ip('link', 'add', BRIDGE, 'type', 'bridge')
        _ip('addr', 'add', f'{BRIDGE_ADDR}/24', 'dev', BRIDGE)
        _ip('link', 'set', BRIDGE, 'up')
        for node, addr in NODE_ADDRS.items():
            ns = _netns(node)
            _ip('netns', 'add', ns)
            _ip('link', 'add', _veth(node), 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns)
            _ip('link', 'set', _veth(node), 'master', BRIDGE, 'up')
            _ip('-n', ns, 'addr', 'add', f'{addr}/24', 'dev', 'eth0')
            _ip('-n', ns, 'link', 'set', 'eth0', 'up')
            _ip('-n', ns, 'link', 'set', 'lo', 'up')
            hosts = Path('/etc/netns', ns, 'hosts')
            hosts.parent.mkdir(parents=True, exist_ok=True)
            hosts.write_text('\n'.join(hosts_lines) + '\n')
            _start_slurmd_in_netns(node)
        _wait_nodes_idle(list(NODE_ADDRS), timeout_s)
    except BaseException:
        stop_two_nodes()
        raise
    return TwoNodeCluster(nodes=tuple(NODE_ADDRS), partition=TWO_NODE_PARTITION, node_addrs=dict(NODE_ADDRS),
                          netns={n: _netns(n) for n in NODE_ADDRS})


def stop_two_nodes() -> None:
    """Undo :func:`start_two_nodes` (idempotent): cancel the partition's jobs, kill every process in the namespaces,
    delete the namespaces (their veth pairs go with them), the bridge, the hosts files, the nodes' spool and pid
    files, and mark the nodes DOWN so that nothing is scheduled on them. Without iproute2 no namespace can have
    been made: nothing to undo."""
    if shutil.which('ip') is None:
        return
    if _controller_answers():
        _run(['scancel', '-p', TWO_NODE_PARTITION], timeout=30)
    for node in NODE_ADDRS:
        ns = _netns(node)
        if Path('/run/netns', ns).exists():
            _kill_netns_processes(node)
            _ip('netns', 'del', ns, check=False)
        _ip('link', 'del', _veth(node), check=False)
        shutil.rmtree(Path('/etc/netns', ns), ignore_errors=True)
        shutil.rmtree(SPOOL_DIR / node, ignore_errors=True)
        _slurmd_pidfile(node).unlink(missing_ok=True)
    _ip('link', 'del', BRIDGE, check=False)
    if Path('/etc/netns').is_dir() and not any(Path('/etc/netns').iterdir()):
        Path('/etc/netns').rmdir()  # made by start_two_nodes (ip netns' own folder; empty unless others use it)
    if _controller_answers() and any(not s.startswith('down') for n, s in _node_states().items() if n in NODE_ADDRS):
        _run(['scontrol', 'update', f'nodename={",".join(NODE_ADDRS)}', 'state=down',
              'reason=two-node test cluster stopped'], timeout=10)


def lose_node(node: str) -> None:
    """Node ``node`` fails hard: its link goes down first (no FIN or RST reaches the other nodes), then every process
    in its namespace (slurmd, slurmstepd, the ranks) is killed."""
    _ip('link', 'set', _veth(node), 'down')
    _kill_netns_processes(node)


def restore_node(node: str, timeout_s: float = 90) -> None:
    """Bring a lost node back: link up, a fresh slurmd, registered and idle (resumed when Slurm marked it DOWN)."""
    _ip('link', 'set', _veth(node), 'up')
    _start_slurmd_in_netns(node)
    _wait_nodes_idle([node], timeout_s)


@pytest.fixture(scope='session')
def two_node_cluster(slurm_cluster) -> TwoNodeCluster:  # noqa: F811 - the session fixture above
    """Nodes n1 and n2 (see :func:`start_two_nodes`), torn down at the end of the session leaving nothing behind;
    skips only when namespaces or Slurm cannot be had here."""
    try:
        cluster = start_two_nodes()
    except ClusterUnavailable as e:
        pytest.skip(f'no two-node cluster: {e}')
    yield cluster
    stop_two_nodes()


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
    elif cmd == 'two-nodes':  # start n1/n2 and leave them up (for trying things by hand; `stop` removes them)
        t0 = time.time()
        print(f'{start_two_nodes()} in {time.time() - t0:.1f}s')
    elif cmd == 'stop-two-nodes':
        stop_two_nodes()
    else:
        print('usage: python -m tests.slurm_cluster [start|stop|status|two-nodes|stop-two-nodes]', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
