"""The distributed environment from torchrun or Slurm variables, and process-group setup.

torchrun sets ``RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT``; under ``srun`` (one task per GPU)
Slurm sets ``SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_(STEP|JOB)_NODELIST``, and MASTER_ADDR is the first
host of the step's node list (:func:`rendezvous`). torchrun's variables win when both are present (torchrun inside an
sbatch script).
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ['DistEnv', 'detect_env', 'rendezvous', 'slurm_port', 'expand_nodelist', 'free_port', 'init_distributed',
           'barrier', 'all_reduce_max', 'all_reduce_sum', 'print_line', 'DEFAULT_COLLECTIVE_TIMEOUT_MIN']

DEFAULT_COLLECTIVE_TIMEOUT_MIN = 10.0  # run.collective_timeout_min's default: a stuck rank fails the others in minutes


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # 'torchrun', 'slurm' or 'single'

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device('cuda', self.local_rank)
        return torch.device('cpu')

    @property
    def backend(self) -> str:
        """nccl on GPU, gloo on CPU."""
        return 'nccl' if torch.cuda.is_available() else 'gloo'


def print_line(msg: str, stream=None) -> None:
    """Write ``msg`` and its newline with one ``write`` call, so lines from several ranks sharing a pipe or a Slurm
    output file do not interleave. ``print`` to stderr writes the text and the newline with two system calls (strace,
    with and without PYTHONUNBUFFERED), and two ranks' error lines came out glued as one line followed by an empty
    one. One write to a pipe is atomic up to PIPE_BUF (4 KiB on Linux); to a file opened for appending, whole."""
    stream = sys.stderr if stream is None else stream
    data = (msg + '\n').encode(getattr(stream, 'encoding', None) or 'utf-8', errors='backslashreplace')
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # no file descriptor (pytest's capture, a StringIO)
        stream.write(msg + '\n')
        stream.flush()
        return
    stream.flush()  # anything already buffered goes first
    while data:
        data = data[os.write(fd, data):]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list -> host names: ``'gpu[01-03,07],cpu5'`` -> ``['gpu01', 'gpu02', 'gpu03', 'gpu07',
    'cpu5']`` (zero padding kept)."""
    hosts: list[str] = []
    for m in re.finditer(r'([^,\[]+)(?:\[([^\]]+)\])?', nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(','):
            if '-' in part:
                lo, hi = part.split('-')
                hosts.extend(f'{prefix}{i:0{len(lo)}d}' for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


def slurm_port(job_id: int | str) -> int:
    """The rendezvous port of Slurm job ``job_id``: ``10000 + job_id % 20000``, so that two jobs sharing a node do
    not collide (and a requeued job, same id, gets the same port)."""
    return 10000 + int(job_id) % 20000


def rendezvous(environ: Mapping[str, str]) -> tuple[str, int]:
    """``(MASTER_ADDR, MASTER_PORT)`` of a Slurm job step: the variables when set, else the first host of
    ``SLURM_STEP_NODELIST`` (the nodes this ``srun`` step runs on, which is where the ranks are; a step may use
    fewer nodes than the job) or, outside a step, ``SLURM_JOB_NODELIST``, and :func:`slurm_port` of the job id."""
    addr = environ.get('MASTER_ADDR')
    if not addr:
        nodelist = environ.get('SLURM_STEP_NODELIST') or environ.get('SLURM_JOB_NODELIST')
        if not nodelist:
            raise ValueError('rendezvous: neither MASTER_ADDR nor SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is set')
        addr = expand_nodelist(nodelist)[0]
    if 'MASTER_PORT' in environ:
        return addr, int(environ['MASTER_PORT'])
    if 'SLURM_JOB_ID' not in environ:
        raise ValueError('rendezvous: neither MASTER_PORT nor SLURM_JOB_ID is set')
    return addr, slurm_port(environ['SLURM_JOB_ID'])


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, world size, local rank and rendezvous address from torchrun or Slurm variables (else one process)."""
    env = os.environ if environ is None else environ
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return DistEnv(int(env['RANK']), int(env['WORLD_SIZE']), int(env.get('LOCAL_RANK', 0)),
                       env.get('MASTER_ADDR', '127.0.0.1'), int(env.get('MASTER_PORT', 29500)), 'torchrun')
    if 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', 1)) > 1:
        addr, port = rendezvous(env)
        return DistEnv(int(env['SLURM_PROCID']), int(env['SLURM_NTASKS']), int(env.get('SLURM_LOCALID', 0)),
                       addr, port, 'slurm')
    # One process: a free port unless one was given, so that several single-process runs can share a machine.
    port = int(env['MASTER_PORT']) if 'MASTER_PORT' in env else free_port()
    return DistEnv(0, 1, 0, env.get('MASTER_ADDR', '127.0.0.1'), port, 'single')


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def init_distributed(env: DistEnv | None = None, timeout_min: float = DEFAULT_COLLECTIVE_TIMEOUT_MIN) -> DistEnv:
    """Export the variables DeepSpeed and torch read, then start the process group (gloo on CPU, nccl on GPU) whose
    collectives give up after ``timeout_min`` minutes (gloo raises; nccl's watchdog aborts the process). A no-op
    when a group exists. Returns ``env`` (detected when None).

    Also for one process: DeepSpeed's engine needs a process group in every case.
    """
    import datetime

    import deepspeed

    env = env or detect_env()
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(minutes=timeout_min), rank=env.rank,
                                   world_size=env.world_size)
    return env


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    # nccl reduces only CUDA tensors; gloo takes CPU ones. Returns a CPU copy.
    t = t.detach().clone()
    if dist.is_initialized():
        device = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else t.device
        moved = t.to(device)
        dist.all_reduce(moved, op=op)
        t = moved.cpu()
    return t


def all_reduce_max(value: float) -> float:
    """The maximum of a Python number over all ranks."""
    return float(_all_reduce(torch.tensor([float(value)], dtype=torch.float64), dist.ReduceOp.MAX).item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a CPU tensor over all ranks (a CPU copy)."""
    return _all_reduce(t, dist.ReduceOp.SUM)

