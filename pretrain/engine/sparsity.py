"""SLaK-style dynamic sparsity (prune and grow) as a training callback, under DeepSpeed ZeRO 0-3.

What it does (SLaK ``sparse_core.Masking``, spec §D.2):

* masks every 2-D and 4-D weight (or the parameters whose names match ``include``) at ``sparsity`` (0.4 for SLaK
  and PeLK), with per-layer densities ``uniform`` or ``erk`` (Erdos-Renyi-kernel) and random positions;
* after every optimizer step, multiplies the weights by their masks: the fp32 master copy that the optimizer
  updates and the model's (bf16) copy. Masking only the module weights would be undone by the next step, which
  writes the master copy back;
* every ``update_interval_steps`` steps, prunes the ``p`` fraction of each layer's active weights with the smallest
  magnitude and regrows as many at random among the inactive positions, so each layer's density stays constant. ``p``
  decays from ``prune_rate`` to ``prune_rate_min`` by a cosine over the whole run. Regrown weights start from zero
  (masked weights are held at zero) with zero Adam moments.

Masks are identical on every rank: decisions use the full fp32 weights (``deepspeed.utils.safe_get_full_fp32_param``,
a collective, once per update) and a generator seeded from ``(seed, step)``. They are the callback's
``state_dict()`` (full shapes, CPU); the trainer registers it with the checkpointer as ``sparsity``, so the masks are
saved and restored with every checkpoint, at any world size.

Per-step masking is local (no communication). It reaches the rank's own fragment of each fp32 master: under ZeRO-1/2
and DeepSpeed's bf16 optimizer ``param._hp_mapping``, under ZeRO-3 ``safe_get/set_local_fp32_param`` and the
rank's slice of the flattened parameter, under ZeRO-0 the parameter itself (fp32) or the fp32 copy that DeepSpeed's
unfused bf16/fp16 optimizer keeps (``fp32_groups``; the fused one, ``torch_adam=false``, is refused).
``safe_set_full_fp32_param`` is not used: it only writes the fp32 copy, not the module weights, and its ZeRO-3
version reads past the end of a parameter whose size the ranks do not divide (DeepSpeed 0.19.8). Under ZeRO-1/2 the
moments are reached after re-linking them to every parameter (:func:`_link_optimizer_states`).

Equivalence with SLaK, which also masks the momentum buffers every step: Adam is element-wise, and masked weights
are reset to zero after every step. The moments of a masked position therefore change nothing until the position
is regrown. At that point we zero them, which gives the same weight trajectory.

SNIP initialisation (``init='snip'``, SLaK's ``--sparse_init snip``): one batch's cross-entropy gradients on an
fp32 copy of the model (built from the config, loaded with the full fp32 weights, every rank its own first batch,
gradients summed over the ranks), score ``|w * dL/dw|``; a global top-k at density ``1 - sparsity`` over all
masked weights gives each layer's density (:func:`snip_densities`), and each layer's mask is then drawn at random
with that density, as SLaK does. The batch is the first of a fresh loader of ``data.train`` (the trainer's own
loader is not advanced), or ``snip_batch`` when given.
"""
from __future__ import annotations

import math
import re

import torch

from pretrain.common.schedule import cosine_between
from pretrain.config import SparsityConfig

__all__ = ['SparsityConfig', 'DynamicSparsity', 'layer_densities', 'snip_densities', 'snip_scores', 'prune_and_grow',
           'prune_rate_at']

_ADAM_STATES = ('exp_avg', 'exp_avg_sq')


def layer_densities(shapes: dict[str, tuple[int, ...]], density: float, init: str = 'erk') -> dict[str, float]:
    """Per-layer densities whose weighted mean is ``density``. ``uniform``: the same everywhere. ``erk`` (RigL):
    proportional to ``sum(shape) / prod(shape)``. Layers that would exceed 1 are made dense and the rest re-scaled."""
    if init == 'uniform':
        return dict.fromkeys(shapes, density)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        scale = budget / sum(raw[n] * numel[n] for n in shapes if n not in dense)
        over = {n for n in shapes if n not in dense and raw[n] * scale > 1.0}
        if not over:
            return {n: 1.0 if n in dense else raw[n] * scale for n in shapes}
        dense |= over


def snip_densities(scores: dict[str, torch.Tensor], density: float) -> dict[str, float]:
    """SLaK's SNIP layer densities: the ``round(density * total)`` largest scores over all layers together are kept;
    a layer's density is the fraction of its own entries among them. ``scores``: name -> tensor of the weight's
    shape (``|w * grad|``). Ties at the threshold go to the lower flat index."""
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    k = int(round(density * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = float(keep[start:start + s.numel()].float().mean())
        start += s.numel()
    return out


def snip_scores(model: torch.nn.Module, names: list[str], batch: dict) -> dict[str, torch.Tensor]:
    """``|w * dL/dw|`` of the parameters ``names`` for the cross-entropy of ``model(batch['image'])`` against
    ``batch['label']`` (class indices), in float32 on the model's device; the model's gradients are left cleared.
    Under torch.distributed the gradients are summed over the ranks first (SNIP over the global batch)."""
    if 'label' not in batch:
        raise ValueError(f"sparsity.init=snip needs labelled batches (a 'label' field), got fields {sorted(batch)}")
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f'sparsity.init=snip: the model has no parameters {missing[:3]}')
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    logits = model(batch['image'].to(device, torch.float32))
    torch.nn.functional.cross_entropy(logits.float(), batch['label'].to(device)).backward()
    scores = {}
    for n in names:
        grad = params[n].grad
        if grad is None:
            raise ValueError(f'sparsity.init=snip: {n} received no gradient')
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(grad)
        scores[n] = (params[n].detach() * grad).abs()
    model.zero_grad(set_to_none=True)
    return scores


def prune_rate_at(cfg: SparsityConfig, step: int, total_steps: int) -> float:
    """Cosine decay from ``prune_rate`` at step 0 to ``prune_rate_min`` at ``total_steps``."""
    return cosine_between(step, total_steps, cfg.prune_rate, cfg.prune_rate_min)


def prune_and_grow(mask: torch.Tensor, weight: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """One SLaK update of one layer (CPU tensors of one shape): drop the ``round(rate * active)`` active weights of
    smallest magnitude, then activate as many positions drawn uniformly from the inactive ones (just-dropped
    included). Returns the new mask; the number of active weights is unchanged. Ties go to the lower index."""
    flat = mask.reshape(-1)
    active = flat.nonzero().squeeze(1)
    k = int(round(rate * active.numel()))
    if k == 0:
        return mask.clone()
    magnitude = weight.reshape(-1).abs().float()[active]
    drop = active[torch.sort(magnitude, stable=True).indices[:k]]
    new = flat.clone()
    new[drop] = False
    inactive = (~new).nonzero().squeeze(1)
    grow = inactive[torch.randperm(inactive.numel(), generator=generator)[:k]]
    new[grow] = True
    return new.view_as(mask)


class DynamicSparsity:
    """The callback. ``DynamicSparsity(cfg, trainer)`` draws masks and applies them at once. A resume passes
    ``draw=False`` and restores them through :meth:`load_state_dict` (the checkpointer calls it), so SNIP's
    forward+backward is not run for masks that are replaced at once; the trainer calls :meth:`draw` if the checkpoint
    had none. ``after_step(trainer)`` masks the weights and, every ``update_interval_steps`` steps, prunes and
    grows."""

    def __init__(self, cfg: SparsityConfig, trainer, snip_batch: dict | None = None, *, draw: bool = True):
        cfg.validate()
        self.cfg = cfg
        self.module = trainer.engine.module
        self.optimizer = trainer.engine.optimizer
        pattern = re.compile(cfg.include) if cfg.include else None
        self.params = {n: p for n, p in self.module.named_parameters()
                       if p.requires_grad and (pattern.search(n) if pattern else len(_shape(p)) in (2, 4))}
        if not self.params:
            raise ValueError(f'sparsity: no parameter to mask (include={cfg.include!r})')
        self.masks: dict[str, torch.Tensor] = {}
        self.updates = 0
        self._device_masks: dict[str, torch.Tensor] = {}
        if draw:
            self.draw(trainer, snip_batch)

    def draw(self, trainer, snip_batch: dict | None = None) -> None:
        """Draw the initial masks (``cfg.init``: SNIP, ERK or uniform) and apply them. Collective under SNIP."""
        self.masks = self._initial_masks(trainer, snip_batch)
        self._device_masks.clear()
        self.apply()

    def state_dict(self) -> dict:
        """``{'masks': {name: bool tensor of the parameter's full shape (CPU)}, 'updates': prune-and-grow count}``."""
        return {'masks': dict(self.masks), 'updates': self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Take the saved masks (the same on every rank, at any world size) and apply them to the weights."""
        if set(state['masks']) != set(self.params):
            saved_only = sorted(set(state['masks']) - set(self.params))
            selected_only = sorted(set(self.params) - set(state['masks']))
            raise ValueError(f'sparsity: the checkpoint masks other parameters than this config selects (only saved: '
                             f'{saved_only[:3]}, only selected: {selected_only[:3]})')
        self.masks = {n: m.bool() for n, m in state['masks'].items()}
        self.updates = int(state['updates'])
        self._device_masks.clear()
        self.apply()

    # ----------------------------------------------------------------------------------------------------------
    def _initial_masks(self, trainer, snip_batch: dict | None) -> dict[str, torch.Tensor]:
        shapes = {n: _shape(p) for n, p in self.params.items()}
        if self.cfg.init == 'snip':
            scores = snip_scores(self._fp32_copy(trainer), list(self.params), snip_batch or _first_batch(trainer))
            densities = snip_densities(scores, 1.0 - self.cfg.sparsity)
        else:
            densities = layer_densities(shapes, 1.0 - self.cfg.sparsity, self.cfg.init)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        masks = {}
        for n, shape in shapes.items():
            numel = math.prod(shape)
            flat = torch.zeros(numel, dtype=torch.bool)
            flat[torch.randperm(numel, generator=gen)[:int(round(densities[n] * numel))]] = True
            masks[n] = flat.view(shape)
        return masks

    def _fp32_copy(self, trainer) -> torch.nn.Module:
        """A plain fp32 copy of the trained module on the trainer's device, holding the full fp32 weights (read
        through DeepSpeed under ZeRO: a collective, every rank calls it)."""
        from deepspeed.utils import safe_get_full_fp32_param

        from pretrain.objectives import build_model

        copy = build_model(trainer.cfg).to(trainer.device, torch.float32).train()
        weights = {}
        for n, p in self.module.named_parameters():
            managed = hasattr(p, 'ds_id') or hasattr(p, '_hp_mapping')
            w = safe_get_full_fp32_param(p) if managed else _zero0_master(self.optimizer, p, None)
            weights[n] = w.detach().reshape(_shape(p))
        missing, unexpected = copy.load_state_dict(weights, strict=False)
        if unexpected or any(n in dict(copy.named_parameters()) for n in missing):
            raise ValueError(f'sparsity.init=snip: the rebuilt model does not match the trained one '
                             f'(missing {missing[:3]}, unexpected {unexpected[:3]})')
        return copy

    def density(self) -> float:
        """Active fraction over all masked weights."""
        return sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> None:
        """Multiply every masked weight, its fp32 master and the model's copy, by its mask (local, no communication)."""
        for n, p in self.params.items():
            flat = self._device_masks.get(n)
            if flat is None:
                flat = self._device_masks[n] = self.masks[n].reshape(-1).to(_device(p))
            _scale_local(p, flat, self.optimizer, state_key=None)

    @torch.no_grad()
    def update(self, step: int, total_steps: int) -> dict:
        """Prune and grow every layer (collective: every rank calls it). Returns a summary for the log."""
        from deepspeed.utils import safe_get_full_fp32_param

        rate = prune_rate_at(self.cfg, step, total_steps)
        _link_optimizer_states(self.optimizer)
        changed = 0
        for i, (n, p) in enumerate(self.params.items()):
            managed = hasattr(p, 'ds_id') or hasattr(p, '_hp_mapping')
            weight = safe_get_full_fp32_param(p) if managed else _zero0_master(self.optimizer, p, None)
            gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step) * 10_007 + i)
            old = self.masks[n]
            new = prune_and_grow(old, weight.detach().cpu().view(old.shape), rate, gen)
            changed += int((new & ~old).sum())
            # Regrown weights restart with zero Adam moments: zero the moments of every position inactive so far.
            keep = old.reshape(-1).to(_device(p))
            for key in _ADAM_STATES:
                _scale_local(p, keep, self.optimizer, state_key=key)
            self.masks[n] = new
            self._device_masks.pop(n, None)
        self.updates += 1
        self.apply()
        return {'prune_rate': rate, 'regrown': changed, 'density': self.density(), 'updates': self.updates}

    def after_step(self, trainer) -> None:
        step = trainer.state.step
        if step % self.cfg.update_interval_steps == 0 and step < trainer.total_steps:
            summary = self.update(step, trainer.total_steps)
            trainer.log(f'sparsity: step {step}: prune rate {summary["prune_rate"]:.4f}, {summary["regrown"]} weights '
                        f'regrown, density {summary["density"]:.4f}')
        else:
            self.apply()


def _first_batch(trainer) -> dict:
    """The first micro-batch of a fresh loader of ``data.train`` for this rank (the trainer's loader is untouched)."""
    from pretrain.engine.data import build_train_loader

    if trainer.train_loader is None:
        raise ValueError('sparsity.init=snip needs one training batch: build the trainer with its data or pass '
                         'snip_batch')
    loader = build_train_loader(trainer.cfg, trainer.rank, trainer.world_size)
    try:
        return next(iter(loader))
    finally:
        del loader


def _link_optimizer_states(optimizer) -> None:
    """Point every ZeRO-1/2 parameter's ``_hp_mapping`` at its fragment of the current optimizer states.

    DeepSpeed 0.19.8's ZeRO-1/2 optimizer links them once, right after stepping its first parameter group, so the
    parameters of the other groups (layer-decay groups here) have no reachable moments. Re-linking before use also
    follows state tensors replaced by a checkpoint load."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    for lp_name, hp_name in (('bit16_groups', 'single_partition_of_fp32_groups'),
                             ('bf16_groups', 'fp32_groups_flat_partition')):
        if hasattr(optimizer, lp_name) and hasattr(optimizer, hp_name):
            state = optimizer.optimizer.state
            for lp_group, flat in zip(getattr(optimizer, lp_name), getattr(optimizer, hp_name)):
                if flat in state:
                    lazy_init_hp_params_optimizer_state(lp_group, flat, state)
            return


def _shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, 'ds_shape') else tuple(p.shape)


def _device(p: torch.nn.Parameter) -> torch.device:
    return p.ds_tensor.device if hasattr(p, 'ds_tensor') else p.device


def _scale_local(p: torch.nn.Parameter, flat: torch.Tensor, optimizer, state_key: str | None) -> None:
    """Multiply this rank's copies of ``p`` (``state_key=None``: fp32 master and module weight; else that optimizer
    state) by the matching slice of ``flat`` (the full parameter's length)."""
    if hasattr(p, 'ds_id'):  # ZeRO-3: this rank holds [rank * n, rank * n + n) of the flattened parameter
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_get_local_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        n = p.ds_tensor.numel()
        start = p._z3_optimizer._get_param_partition_rank(p) * n
        part = torch.zeros(n, dtype=flat.dtype, device=flat.device)
        valid = max(min(n, flat.numel() - start), 0)
        part[:valid] = flat[start:start + valid]
        if state_key is None:
            p.ds_tensor.data.mul_(part.to(p.ds_tensor.dtype))
            hp = safe_get_local_fp32_param(p)
            safe_set_local_fp32_param(p, hp * part.to(hp.dtype))
        else:
            state = safe_get_local_optimizer_state(p, state_key)
            if state is not None:
                safe_set_local_optimizer_state(p, state * part.to(state.dtype), state_key)
        return
    if state_key is None:  # the module's own (ZeRO-0/1/2: full) weight
        p.data.mul_(flat.view_as(p).to(p.dtype))
    if hasattr(p, '_hp_mapping'):  # ZeRO-1/2 and the bf16 optimizer: a fragment of the fp32 flat partition
        mapping = p._hp_mapping
        if mapping is None:  # no fp32 fragment of this parameter on this rank
            return
        if state_key is not None and not mapping.optim_fragment:
            return  # no optimizer state yet (before the first step)
        addr = mapping.lp_fragment_address
        target = mapping.get_hp_fragment(state_key)
        target.mul_(flat.narrow(0, addr.start, addr.numel).view_as(target).to(target.dtype))
        return
    # ZeRO-0: a torch optimizer over the parameters, or DeepSpeed's unfused fp16/bf16 wrapper with fp32 copies.
    target = _zero0_master(optimizer, p, state_key)
    if target is not None and target.data_ptr() != p.data_ptr():
        target.mul_(flat.view_as(target).to(target.dtype))


def _zero0_master(optimizer, p: torch.nn.Parameter, state_key: str | None) -> torch.Tensor | None:
    """Without ZeRO: the fp32 master of ``p`` (``state_key=None``) or its optimizer state (None before the first
    step). For a torch optimizer the parameter is its own master; DeepSpeed's ``FP16_UnfusedOptimizer`` (bf16/fp16
    with torch AdamW) keeps an fp32 copy per parameter in ``fp32_groups``."""
    lp_groups = getattr(optimizer, 'fp16_groups', None)
    if lp_groups is None:
        return p.data if state_key is None else optimizer.state.get(p, {}).get(state_key)
    if hasattr(optimizer, 'fp32_groups_flat'):
        raise NotImplementedError('dynamic sparsity under ZeRO-0 with DeepSpeed\'s fused fp16/bf16 optimizer '
                                  '(deepspeed.torch_adam=false) is not supported; use ZeRO-1 or higher or torch_adam')
    for lp_group, hp_group in zip(lp_groups, optimizer.fp32_groups):
        for lp, hp in zip(lp_group, hp_group):
            if lp is p:
                return hp.data if state_key is None else optimizer.optimizer.state.get(hp, {}).get(state_key)
    raise ValueError('sparsity: a masked parameter is not in the optimizer')
