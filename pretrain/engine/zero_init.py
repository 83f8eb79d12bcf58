"""Build the model already partitioned for ZeRO-3 (``deepspeed.zero_init: true``).

Without it every rank builds the whole model in fp32 before DeepSpeed partitions it: InternImage-H holds 4.4 GB of
host memory on each of a node's ranks, and DeepSpeed moves the whole model to the GPU before cutting it.
With it, only rank 0 holds the whole model, once, and only while the model is built:

1. Rank 0 builds the model as a plain module: the reference (seeded weights, the initial checkpoint, the sliced
   head: everything ``build_fn`` does).
2. Every rank builds it again inside ``deepspeed.zero.Init``, with ``torch.nn.init`` switched off (as transformers'
   ``no_init_weights``). Each module's parameters are partitioned as soon as that module's own ``__init__`` returns.
   A parent that initialises its children's parameters afterwards (timm's ``named_apply``, open_clip's
   ``init_parameters``, DCNv3's ``_reset_parameters``, a checkpoint loaded into the built model) meets empty tensors
   there: shape-dependent initialisers fail and the others change nothing, silently. So nothing is initialised in
   this build, and its values come from the reference instead:
3. module by module, ``GatheredParameters(modifier_rank=0)`` gathers the parameters, rank 0 copies the reference in,
   DeepSpeed broadcasts them and partitions them again; buffers are broadcast from rank 0.

The result is the model a plain build gives after DeepSpeed's cast to the training precision, bit for bit (the
tests compare training runs). Peak host memory: rank 0 one fp32 model plus its partition; every other rank its
partition plus the largest single module, gathered for the copy.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ['build_partitioned']


def build_partitioned(build_fn: Callable[[], nn.Module], ds_config: dict, *, rank: int,
                      device: torch.device) -> nn.Module:
    """``build_fn()`` partitioned across the process group by ``deepspeed.zero.Init`` with the values of a plain
    ``build_fn()`` on rank 0. ``build_fn`` must build the same structure on every rank. The global RNG state
    afterwards is the one a plain ``build_fn()`` leaves (the partitioned build runs in a forked RNG)."""
    import deepspeed

    reference = build_fn() if rank == 0 else None
    devices = [device] if device.type == 'cuda' else []
    # The build initialises nothing, so DeepSpeed need not gather parameters around Module.apply either.
    skeleton_config = {**ds_config, 'zero_optimization': {**ds_config['zero_optimization'],
                                                          'override_module_apply': False}}
    with (torch.random.fork_rng(devices=devices), _no_weight_init(),
          deepspeed.zero.Init(config_dict_or_path=skeleton_config)):
        model = build_fn()
    _check_same_structure(model, reference, rank)
    ref_params = dict(reference.named_parameters(remove_duplicate=False)) if reference is not None else {}
    ref_buffers = dict(reference.named_buffers(remove_duplicate=False)) if reference is not None else {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f'{prefix}.' if prefix else ''
        params = [(dot + n, p) for n, p in module.named_parameters(recurse=False)]
        zero = [(n, p) for n, p in params if hasattr(p, 'ds_id')]
        if zero:
            with deepspeed.zero.GatheredParameters([p for _, p in zero], modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        for name, p in zero:
                            p.data.copy_(ref_params[name])
        for name, p in params:
            if not hasattr(p, 'ds_id'):  # DeepSpeed's engine partitions these later (from rank 0's values)
                p.data = _broadcast_from_0(p.data, ref_params.get(name), device)
        for key, buf in module.named_buffers(recurse=False):
            buf.data = _broadcast_from_0(buf.data, ref_buffers.get(dot + key), device)
    if hasattr(reference, 'load_report'):
        model.load_report = reference.load_report
    del reference
    _release_freed_host_memory()
    return model


def _release_freed_host_memory() -> None:
    """Give the heap that the reference (rank 0) and modules built whole on the CPU left behind back to the system:
    glibc keeps freed memory below its mmap threshold (measured: 0.6 GiB of 1.0 GiB returned on a 2-rank CPU build of
    InternImage-XL). No-op without glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _no_weight_init():
    """Every ``torch.nn.init`` initialiser returns its tensor untouched (the values are overwritten afterwards)."""
    names = [n for n, f in vars(nn.init).items() if inspect.isfunction(f) and not n.startswith('_')
             and n != 'calculate_gain']
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _broadcast_from_0(tensor: torch.Tensor, value: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` (DeepSpeed does not move a partitioned model's buffers) holding rank 0's ``value``."""
    out = tensor.detach().to(device).clone()
    if value is not None:
        out.copy_(value)
    dist.broadcast(out, 0)
    return out


def _check_same_structure(model: nn.Module, reference: nn.Module | None, rank: int) -> None:
    """The partitioned build must have rank 0's reference's parameter and buffer names and shapes, on every rank."""
    def layout(m: nn.Module) -> list:
        return ([(n, tuple(getattr(p, 'ds_shape', p.shape))) for n, p in m.named_parameters(remove_duplicate=False)]
                + [(n, tuple(b.shape)) for n, b in m.named_buffers(remove_duplicate=False)])

    expected = [layout(reference) if rank == 0 else None]
    dist.broadcast_object_list(expected, 0)
    mine = layout(model)
    if mine != expected[0]:
        diff = sorted(set(mine) ^ set(expected[0]))[:8]
        raise RuntimeError(f'deepspeed.zero_init: rank {rank} built a model that differs from rank 0\'s reference '
                           f'(names or shapes; first differences: {diff}). The model must build the same structure '
                           'on every rank; set deepspeed.zero_init: false to build it plainly.')
