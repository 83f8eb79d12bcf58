"""fp32 exponential moving average of the weights that works under every ZeRO stage.

Each rank keeps the EMA of what it holds:
- ZeRO-3: the local partition ``p.ds_tensor`` of every parameter (1-D, ``ceil(numel / world)`` elements), so the
  EMA costs **4 bytes x params / world_size per rank**; float buffers (not partitioned) are averaged whole.
- ZeRO 0/1/2: the whole module on every rank, **4 bytes x params per rank** (the module is replicated anyway).
The average is taken of the module weights (bf16/fp16 under mixed precision, fp32 otherwise) into fp32 accumulators,
so tiny ``(1 - decay)`` updates are not rounded away (the official script keeps its EMA in fp16).

Non-persistent buffers (constants such as a text tower's causal mask) are not averaged.

``state_dict()`` is per rank; :meth:`EMA.load_state_dicts` takes the states of *all* saved ranks, so a ZeRO-3 EMA
saved at one world size reloads at another (partitions are concatenated and re-cut by :func:`merge_saved_states`,
which also gives the whole average offline).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ['EMA', 'merge_saved_states']


def _partitioned(p: torch.Tensor) -> bool:
    # ZeRO-3 persistent (small) parameters also live in ds_tensor; their whole copy is gathered lazily.
    return getattr(p, 'ds_tensor', None) is not None


def _materialized(p: torch.Tensor) -> bool:
    # A ZeRO-3 parameter whose whole value is present (persistent ones between steps).
    return p.data.numel() == getattr(p, 'ds_numel', -1) and p.data.numel() > 0


def _gather_partition(part: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Every rank's equal-size 1-D partition of ``p`` -> the whole tensor (``p.ds_shape``); collective."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return part[:p.ds_numel].view(p.ds_shape)
    parts = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(parts, part.contiguous())
    return torch.cat(parts)[:p.ds_numel].view(p.ds_shape)


def _source(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank owns for ``p``: its ZeRO-3 partition, or the whole parameter."""
    return p.ds_tensor if _partitioned(p) else p.data


class EMA:
    """EMA over ``module``'s parameters and float buffers (module as wrapped by DeepSpeed: ``engine.module``)."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = False):
        self.module, self.decay, self.warmup = module, decay, warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self.partitioned: dict[str, bool] = {}
        for name, t in self._tensors():
            self.shadow[name] = _source(t).detach().float().clone()
            self.partitioned[name] = _partitioned(t)

    def _tensors(self):
        for name, p in self.module.named_parameters():
            yield name, p
        # Persistent float buffers only (BatchNorm statistics): non-persistent ones are constants, e.g. a causal
        # attention mask full of -inf, whose average would be nan.
        transient = {f'{prefix}.{b}' if prefix else b for prefix, m in self.module.named_modules()
                     for b in getattr(m, '_non_persistent_buffers_set', ())}
        for name, b in self.module.named_buffers():
            if b.is_floating_point() and name not in transient:
                yield name, b

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        """``ema = decay * ema + (1 - decay) * weights`` (call after an optimizer step)."""
        d = self.current_decay()
        for name, t in self._tensors():
            self.shadow[name].lerp_(_source(t).float(), 1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_in(self):
        """Within the block, the module computes with the EMA weights (for evaluation); restored after.

        Collective under ZeRO-3 (every rank must enter): small "persistent" parameters are kept gathered by
        ZeRO-3 and never re-read from their partitions, so their whole EMA value is gathered and written too."""
        backup = {}
        with torch.no_grad():
            for name, t in self._tensors():
                src = _source(t)
                backup[name] = src.clone()
                src.copy_(self.shadow[name].to(src.dtype))
                if self.partitioned[name] and _materialized(t):
                    t.data.copy_(_gather_partition(self.shadow[name], t).to(t.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in self._tensors():
                    _source(t).copy_(backup[name])
                    # Also when the forward gathered it meanwhile: the whole copy must be the weights again.
                    if self.partitioned[name] and _materialized(t):
                        t.data.copy_(_gather_partition(backup[name], t).to(t.dtype))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA as a model state_dict (fp32, parameter shapes); collective under ZeRO-3 (call on every
        rank)."""
        tensors = dict(self._tensors())
        return {name: (_gather_partition(shadow, tensors[name]) if self.partitioned[name] else shadow).clone()
                for name, shadow in self.shadow.items()}

    def state_dict(self) -> dict:
        """This rank's EMA: shadows (partitions under ZeRO-3), which are partitioned, full shapes, world size."""
        tensors = dict(self._tensors())
        shapes = {n: list(getattr(tensors[n], 'ds_shape', tensors[n].shape)) for n in self.shadow}
        return {'shadow': {k: v.clone() for k, v in self.shadow.items()}, 'partitioned': dict(self.partitioned),
                'shapes': shapes, 'num_updates': self.num_updates, 'decay': self.decay,
                'world_size': dist.get_world_size() if dist.is_initialized() else 1}

    def load_state_dicts(self, states: list[dict]) -> None:
        """Restore from the states of every saved rank, in rank order (only rank 0's is needed without ZeRO-3)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        missing = set(self.shadow) - set(states[0]['shadow'])
        if missing:
            raise KeyError(f'EMA state lacks {sorted(missing)[:5]} ...')
        whole = merge_saved_states(states)
        for name in self.shadow:
            full = whole[name].reshape(-1)
            if self.partitioned[name]:
                size = self.shadow[name].numel()
                piece = full[rank * size:(rank + 1) * size]
                new = torch.zeros(size, dtype=torch.float32)
                new[:piece.numel()] = piece
                self.shadow[name] = new.to(self.shadow[name].device)
            else:
                self.shadow[name] = full.view(self.shadow[name].shape).float().to(self.shadow[name].device).clone()
        self.num_updates = int(states[0]['num_updates'])


def merge_saved_states(states: list[dict]) -> dict[str, torch.Tensor]:
    """The whole average as a state_dict (fp32, full shapes) from the :meth:`EMA.state_dict` of every
    saved rank in rank order: ZeRO-3 partitions are concatenated and cut to their shapes; entries that are not
    partitioned come from the first state (rank 0's alone suffices when nothing is partitioned). Needs no module or
    process group (offline export reads checkpoints with it)."""
    first = states[0]
    if any(first['partitioned'].values()) and len(states) != int(first['world_size']):
        raise ValueError(f'partitioned EMA state saved by {first["world_size"]} ranks, got {len(states)} states')
    out = {}
    for name, shadow in first['shadow'].items():
        if first['partitioned'].get(name):
            flat = torch.cat([s['shadow'][name].reshape(-1) for s in states])
        else:
            flat = shadow.reshape(-1)
        shape = first['shapes'][name]
        out[name] = flat[:math.prod(shape)].view(shape)
    return out
