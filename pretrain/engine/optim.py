"""AdamW parameter groups (layer-wise lr decay, DCN lr multiplier, no weight decay for 1-D parameters) and the
per-iteration cosine schedule with linear warmup.

The groups carry ``lr_scale``; :class:`CosineWarmupSchedule` writes ``group['lr'] = lr(step) * group['lr_scale']``
into whatever optimizer holds them (DeepSpeed's ZeRO optimizers expose the inner ``param_groups``).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from pretrain.common.schedule import cosine_between

__all__ = ['DCN_LR_MUL_KEYS', 'build_param_groups', 'CosineWarmupSchedule', 'scaled_lr', 'describe_groups']

# Official InternImage: DCN_LR_MUL applies to these name parts (not to dcn.mask, see official-internimage.md §4).
DCN_LR_MUL_KEYS = ('offset', 'attention_weights', 'center_feature_scale_proj', 'alpha_beta')


def _layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Parameter name -> layer id (forward order) from ``model.group_matcher``; every parameter in one group when
    the model has none."""
    # A wrapper (the M3I model) names the module whose layers count: its parameters are prefixed, the wrapper's own
    # (objective heads, text tower) fall in the last group.
    root, prefix = model.layer_decay_root() if hasattr(model, 'layer_decay_root') else (model, '')
    names = [n for n, p in root.named_parameters() if p.requires_grad]
    matcher = getattr(root, 'group_matcher', None)
    if matcher is None:
        return {prefix + n: 0 for n in names}, 1
    from timm.models import group_parameters

    grouped = group_parameters(root, matcher(coarse=False))
    ids = {prefix + name: i for i, (_, group) in enumerate(sorted(grouped.items())) for name in group}
    return ids, len(grouped)


def build_param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float = 1.0, dcn_lr_mul: float = 1.0,
                       no_weight_decay: Iterable[str] = ()) -> list[dict]:
    """AdamW parameter groups with ``lr_scale`` and ``weight_decay`` per group, for every trainable parameter once.

    - lr scale: ``layer_decay ** (num_layers - 1 - layer_id)`` with layer ids from ``model.group_matcher`` (stem
      first, head last at 1.0), times ``dcn_lr_mul`` for DCN offset / attention-weight projections (names containing
      one of :data:`DCN_LR_MUL_KEYS`).
    - weight decay 0 for 1-D parameters (norm weights, biases, layer scales ``gamma1/gamma2``), names ending in
      ``.bias``, ``model.no_weight_decay()`` and ``no_weight_decay``.
    Each group also holds ``group_name`` (for logs) and ``param_names``.
    """
    skip = set(no_weight_decay)
    if hasattr(model, 'no_weight_decay'):
        skip |= set(model.no_weight_decay())
    layer_of, num_layers = _layer_ids(model)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_of.get(name, num_layers - 1)
        ndim = len(getattr(p, 'ds_shape', p.shape))  # a ZeRO-3 partitioned parameter's own shape is empty
        no_wd = ndim <= 1 or name.endswith('.bias') or name in skip
        dcn = dcn_lr_mul != 1.0 and any(k in name for k in DCN_LR_MUL_KEYS)
        key = (layer, no_wd, dcn)
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - layer) * (dcn_lr_mul if dcn else 1.0)
            groups[key] = {'params': [], 'param_names': [], 'weight_decay': 0.0 if no_wd else weight_decay,
                           'lr_scale': scale,
                           'group_name': f'layer{layer}_{"no_decay" if no_wd else "decay"}{"_dcn" if dcn else ""}'}
        groups[key]['params'].append(p)
        groups[key]['param_names'].append(name)
    return [groups[k] for k in sorted(groups)]


def scaled_lr(lr: float, global_batch_size: int, base_batch_size: int, enabled: bool = True) -> float:
    """Linear scaling rule: ``lr * global_batch_size / base_batch_size`` (official InternImage: base 512)."""
    return lr * global_batch_size / base_batch_size if enabled else lr


class CosineWarmupSchedule:
    """Per-iteration schedule: linear from ``lr_warmup_init`` to ``lr_peak`` over ``warmup_steps``, then cosine to
    ``lr_min`` at ``total_steps``. ``step_to(step, param_groups)`` sets each group's lr for optimizer step ``step``
    (0-based) and returns the base lr; the state is just the last step (the curve is a pure function of it)."""

    def __init__(self, *, lr_peak: float, total_steps: int, warmup_steps: int = 0, lr_warmup_init: float = 0.0,
                 lr_min: float = 0.0):
        if total_steps < 1 or warmup_steps < 0 or (warmup_steps and warmup_steps >= total_steps):
            raise ValueError(f'need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})')
        self.lr_peak, self.total_steps, self.warmup_steps = lr_peak, total_steps, warmup_steps
        self.lr_warmup_init, self.lr_min = lr_warmup_init, lr_min
        self.last_step = -1

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr_warmup_init + (self.lr_peak - self.lr_warmup_init) * step / self.warmup_steps
        return cosine_between(step - self.warmup_steps, self.total_steps - self.warmup_steps, self.lr_peak, self.lr_min)

    def step_to(self, step: int, param_groups: list[dict]) -> float:
        lr = self.lr_at(step)
        for g in param_groups:
            g['lr'] = lr * g.get('lr_scale', 1.0)
        self.last_step = step
        return lr

    def state_dict(self) -> dict:
        return {'last_step': self.last_step, 'lr_peak': self.lr_peak, 'total_steps': self.total_steps,
                'warmup_steps': self.warmup_steps, 'lr_warmup_init': self.lr_warmup_init, 'lr_min': self.lr_min}

    def load_state_dict(self, state: dict) -> None:
        # The curve comes from the (possibly edited) config; only the position is restored.
        self.last_step = int(state['last_step'])


def describe_groups(groups: list[dict]) -> str:
    """One line per group: name, params, lr scale, weight decay (for the run log)."""
    return '\n'.join(f'{g["group_name"]:>24s} n={len(g["params"]):4d} lr_scale={g["lr_scale"]:.4g} '
                     f'wd={g["weight_decay"]:g}' for g in groups)

