"""One entry point for every backbone family (InternImage, timm ConvNeXt V1/V2, any timm model).

``create_backbone(name, **kwargs)`` takes the same keys for every family, so configs and the engine never branch on
the model family:
* ``num_classes``, ``drop_rate``, ``drop_path_rate``, ``in_chans``, ``features_only``, ``out_indices`` (timm keys);
* ``grad_checkpointing`` (bool) and ``grad_checkpointing_every`` (checkpoint every k-th block), or the official
  InternImage ``with_cp`` (same as ``grad_checkpointing=True``);
* ``checkpoint_path`` (timm's name; the config's ``model.init_from``) + ``head_index`` for 21841 -> 1000 heads, loaded
  by :func:`~pretrain.models.weights.load_checkpoint`;
* any other key goes to the model constructor (e.g. InternImage ``core_op``, ``layer_scale``; ConvNeXt
  ``ls_init_value``, ``use_grn``).
Layer-wise lr decay is generic through ``group_matcher`` (``pretrain.engine.optim.build_param_groups``).
:func:`backbone_from_config` builds one from the ``model`` config section; :func:`output_stride` reads the stride of
``forward_features``'s map that every family publishes.

ConvNeXt V1/V2 come from timm unchanged; only their blocks' ``forward`` is wrapped (instance attribute, no key
change) for per-block, every-k-th checkpointing with the same semantics as InternImage's.
"""
from __future__ import annotations

import os
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING

import timm
import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.models import build_model_with_cfg
from timm.models._features import FeatureGetterNet

from pretrain.models.internimage import InternImage
from pretrain.models.weights import LoadReport, load_checkpoint

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

__all__ = ['create_backbone', 'backbone_from_config', 'set_grad_checkpointing', 'uses_grad_checkpointing',
           'checkpointable_blocks', 'output_stride']


def build_staged(cls: type[nn.Module], variant: str, pretrained: bool, model_args: dict, kwargs: dict) -> nn.Module:
    """A four-stage family's timm constructor: ``model_args`` (the variant's) updated by the caller's ``kwargs``, built
    by timm's ``build_model_with_cfg`` with the stage-feature getter (``features_only``; ``out_indices`` default all
    four stages)."""
    kwargs = {**model_args, **kwargs}
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    features = dict(out_indices=out_indices, feature_cls='getter')
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=features, **kwargs)


def checkpointable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks activation checkpointing wraps, in forward order: the children of every ``.blocks`` container.

    InternImage: ``levels[i].blocks[j]``; timm stage models (ConvNeXt V1/V2 ...): ``stages[i].blocks[j]``; also
    inside timm ``features_only`` wrappers.
    """
    blocks = [blk for m in model.modules() if isinstance(getattr(m, 'blocks', None), (nn.ModuleList, nn.Sequential))
              for blk in m.blocks]
    if not blocks:
        raise TypeError(f'{type(model).__name__} has no .blocks containers; cannot find its blocks')
    return blocks


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # Bound per instance by set_grad_checkpointing; runs the class forward under non-reentrant checkpointing.
    # A block's ``checkpoint_context_fn`` (torch's context_fn: forward and recompute context managers), when set,
    # lets state that lives only during the forward (dense masking's GRN masks) hold in the recompute too.
    if torch.is_grad_enabled() and not torch.jit.is_scripting():
        context_fn = self.__dict__.get('checkpoint_context_fn') or torch.utils.checkpoint.noop_context_fn
        return torch.utils.checkpoint.checkpoint(type(self).forward, self, *args, use_reentrant=False,
                                                 context_fn=context_fn, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def set_grad_checkpointing(model: nn.Module, enable: bool = True, every: int = 1) -> None:
    """Per-block non-reentrant activation checkpointing of every ``every``-th block (block index ``% every == 0``).

    Works for InternImage (its own flag) and timm stage models such as ConvNeXt V1/V2 (a per-instance ``forward``
    wrapper; the timm stage-level flag is switched off so blocks are never checkpointed twice).
    """
    if every < 1:
        raise ValueError(f'every must be >= 1, got {every}')
    inner = getattr(model, 'model', model)  # timm features_only getter wraps the model as .model
    if isinstance(inner, InternImage):
        inner.set_grad_checkpointing(enable, every=every)
        return
    for m in model.modules():
        if hasattr(m, 'grad_checkpointing') and isinstance(getattr(m, 'blocks', None), nn.Module):
            m.grad_checkpointing = False  # timm's own stage-level flag: never checkpoint twice
    for i, blk in enumerate(checkpointable_blocks(model)):
        if enable and i % every == 0:
            blk.forward = types.MethodType(_checkpointed_forward, blk)
        else:
            blk.__dict__.pop('forward', None)


def uses_grad_checkpointing(model: nn.Module) -> bool:
    """Whether any part of ``model`` runs under activation checkpointing: InternImage's block and stem flags, timm's
    own ``grad_checkpointing``, or a block wrapped by :func:`set_grad_checkpointing`."""
    for m in model.modules():
        if getattr(m, 'grad_checkpointing', False) is True or getattr(m, 'stem_checkpointing', False) is True:
            return True
        if getattr(m.__dict__.get('forward'), '__func__', None) is _checkpointed_forward:
            return True
    return False


def create_backbone(
        name: str,
        pretrained: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
        head_index: str | os.PathLike | Sequence[int] | None = None,
        checkpoint_use_ema: bool = False,
        grad_checkpointing: bool = False,
        grad_checkpointing_every: int = 1,
        **kwargs,
) -> nn.Module:
    """Build a registered model by timm name (``internimage_t`` ... ``internimage_g``, ``convnext_tiny``,
    ``convnextv2_base`` ...) with the shared config keys described in the module docstring.

    The returned model has ``.load_report`` (a :class:`LoadReport`) when ``checkpoint_path`` was given.
    """
    if kwargs.pop('with_cp', False):
        grad_checkpointing = True
    if not timm.is_model(name):
        raise ValueError(f'unknown model {name!r}; InternImage names: {timm.list_models("internimage*")}')
    if kwargs.get('features_only'):
        # One wrapper for every family: forward_intermediates outputs, the model kept intact as .model.
        kwargs.setdefault('feature_cls', 'getter')
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    report: LoadReport | None = None
    if checkpoint_path is not None:
        target = model.model if isinstance(model, FeatureGetterNet) else model
        report = load_checkpoint(target, checkpoint_path, head_index=head_index, use_ema=checkpoint_use_ema)
    set_grad_checkpointing(model, grad_checkpointing, every=grad_checkpointing_every)
    if report is not None:
        model.load_report = report
    return model


def backbone_from_config(model: ModelConfig, num_classes: int) -> nn.Module:
    """The backbone a ``model`` config section describes, with ``num_classes`` classes (0: no classifier), its
    initial weights (``init_from``) loaded and activation checkpointing set."""
    kwargs = dict(model.kwargs)
    if model.drop_path_rate is not None:
        kwargs['drop_path_rate'] = model.drop_path_rate
    return create_backbone(model.name, num_classes=num_classes, checkpoint_path=model.init_from,
                           head_index=model.head_index, checkpoint_use_ema=model.init_from_ema,
                           grad_checkpointing=model.grad_checkpointing,
                           grad_checkpointing_every=model.grad_checkpointing_every, **kwargs)


def output_stride(model: nn.Module) -> int:
    """Pixels per cell of ``model.forward_features``'s map: the model's ``output_stride`` when it publishes one
    (InternImage: 16 for H/G, whose head fuses stage 3 with the upsampled stage 4), else the reduction of the last
    stage in timm's ``feature_info`` (ConvNeXt V1/V2, PeLK: 32)."""
    stride = getattr(model, 'output_stride', None)
    return int(stride if stride is not None else model.feature_info[-1]['reduction'])
