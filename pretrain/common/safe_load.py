"""Reading checkpoint files that may come from elsewhere without running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary objects, so a crafted file runs code on load. Every file
the pipeline reads (DeepSpeed's model and optimizer states, our trainer, per-rank and weight-average files) is read
with ``weights_only=True`` and an allow-list of the few non-tensor types those files hold (below, each with the file
that needs it). A file that needs anything else is refused with :class:`UnsafeCheckpointError`, naming the file
and the types, before any of its objects is built. ``trust_pickle=True`` is the explicit way out for a file the
user vouches for.

DeepSpeed's own loaders (``engine.load_checkpoint``, ``zero_to_fp32``, ``ds_to_universal``) call
``torch.load(weights_only=False)`` themselves; :func:`check_folder` runs the restricted load over every ``.pt``
file of a folder first (memory-mapped: the tensors are not read), so they only ever see files that passed it.
"""
from __future__ import annotations

import importlib
import os
import pickle

import torch

__all__ = ['ALLOWED_GLOBALS', 'UnsafeCheckpointError', 'check_folder', 'safe_load']

#: The non-tensor globals that the pipeline's checkpoint files pickle, as ``module.name`` (found with
#: ``torch.serialization.get_unsafe_globals_in_checkpoint`` on real saves of ZeRO 0-3, fp32 and bf16).
ALLOWED_GLOBALS = frozenset({
    # DeepSpeed 0.19 ZeRO 1-3 optimizer states (*optim_states.pt)
    'deepspeed.runtime.fp16.loss_scaler.LossScaler',
    'deepspeed.runtime.zero.config.ZeroStageEnum',
    'deepspeed.utils.tensor_fragment.fragment_address',
    # our rank_*.pt: numpy's RNG state (numpy 2 and numpy 1 module paths)
    'numpy._core.multiarray._reconstruct', 'numpy.core.multiarray._reconstruct', 'numpy.ndarray', 'numpy.dtype',
    # DeepSpeed's model states keep the client's argparse Namespace when one was given to initialize()
    'argparse.Namespace',
})


# numpy dtypes are rebuilt from their class, which the pickle builds on the stack (no global to scan): the RNG
# states' dtypes (uint32 keys, int64/float64 scalars), allowed whenever a file needs numpy.dtype.
_NUMPY_DTYPE_CLASSES = ('uint32', 'int64', 'float64')


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file needs types outside :data:`ALLOWED_GLOBALS` (it could run code when loaded)."""


def _resolve(name: str):
    module, _, attr = name.rpartition('.')
    return getattr(importlib.import_module(module), attr)


def _refusal(path: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f'{path}: refused to load: it needs {what}, which is not on the allow-list of checkpoint types '
        f'(pretrain.common.safe_load.ALLOWED_GLOBALS); loading it could run code from the file. If you trust '
        f'where it came from, pass --trust-pickle (export) or trust_pickle=True')


def safe_load(path: str | os.PathLike, *, map_location='cpu', mmap: bool = False, trust_pickle: bool = False):
    """``torch.load(path)`` restricted to tensors, containers and :data:`ALLOWED_GLOBALS`; returns the object.

    Raises :class:`UnsafeCheckpointError` naming the file and the types when it needs anything else, or when
    its pickle is not one ``torch.save`` writes. ``trust_pickle=True`` loads it unrestricted."""
    path = os.fspath(path)
    if trust_pickle:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=False)
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # reads the pickle only, runs nothing
    except (ValueError, pickle.UnpicklingError, RuntimeError) as e:  # legacy/non-zip files, opcodes torch refuses
        raise _refusal(path, f'a pickle that cannot be checked ({e})') from e
    refused = sorted(set(needed) - ALLOWED_GLOBALS)
    if refused:
        raise _refusal(path, ', '.join(refused))
    allowed = [_resolve(n) for n in needed]
    if 'numpy.dtype' in needed:
        import numpy as np

        allowed += [type(np.dtype(d)) for d in _NUMPY_DTYPE_CLASSES]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:  # what the static scan cannot see (objects built on the stack)
        why = [ln.strip() for ln in str(e).splitlines() if 'but got' in ln or 'Unsupported' in ln]
        raise _refusal(path, f'something the restricted unpickler refused ({why[0] if why else e})') from e


def check_folder(folder: str | os.PathLike, *, trust_pickle: bool = False) -> None:
    """Run :func:`safe_load` (memory-mapped) over every ``.pt`` file under ``folder``, before a loader that
    unpickles without restriction (DeepSpeed's) reads them. Raises :class:`UnsafeCheckpointError` on the first
    file refused; returns None."""
    if trust_pickle:
        return
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith('.pt'):
                safe_load(os.path.join(dirpath, name), mmap=True)
