"""Weight import (``model.init_from``): released and in-house weight files loaded into InternImage (and any timm model)
with a clear report; not the training state (pretrain/engine/checkpoint.py) nor activation checkpointing.

Accepted layouts (detected from the file, combinable):
* top-level wrappers: ``{'model': sd}`` (official classification), ``{'state_dict': sd}`` (mmdet/mmseg),
  ``{'module': sd}`` (DeepSpeed ``mp_rank_00_model_states.pt``), ``{'model_ema': sd}`` with ``use_ema=True``,
  or the raw state_dict (``zero_to_fp32`` output, safetensors files);
* key prefixes ``module.`` (DDP / DeepSpeed), ``_orig_mod.`` (torch.compile), ``backbone.`` (detection/segmentation;
  neck and decode-head keys are dropped), ``model.`` (Hugging Face port, which also names layer scales
  ``layer_scale1/2`` instead of ``gamma1/2``);
* M3I: ``student.*`` (kept) / ``teacher.*`` / ``student_proj.*`` (dropped), and the "sim" layout whose backbone keys
  are ``dcnv3.*`` with ``clip.classifier_ln.*`` / ``clip.classifier.*`` as the classifier norm / head
  (``mm_dcnv3.*``, ``mask_token`` ... dropped);
* a 21841-class head loaded into a smaller head through an index file (one ImageNet-22K class index per line, in
  the order of the model's classes, e.g. the official ``map22kto1k.txt``);
* ``remove_center`` surgery: a 9-point DCNv3 ``offset``/``mask`` loaded into a ``remove_center=True`` model drops the
  centre point (mask rows ``g*9+4``, offset rows ``g*18+8``, ``g*18+9``).
Files are read with ``torch.load(weights_only=True)``: no code from a checkpoint is ever executed.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ['LoadReport', 'load_checkpoint', 'convert_state_dict', 'read_state_dict', 'read_class_index']

_logger = logging.getLogger(__name__)

# Prefixes that wrap a whole model; tried in this order, each stripped only when that matches more model keys.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.', 'student.', 'backbone.', 'model.')
_HEAD_KEYS = ('head.weight', 'head.bias')


@dataclass
class LoadReport:
    """What happened to every key. ``missing``/``unexpected`` are model-side/checkpoint-side names after conversion."""

    source: str = ''
    layout: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and every checkpoint key was used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def _block(title: str, names: list[str], limit: int = 20) -> str:
            if not names:
                return ''
            shown = '\n'.join(f'    {n}' for n in names[:limit])
            more = f'\n    ... and {len(names) - limit} more' if len(names) > limit else ''
            return f'\n  {title} ({len(names)}):\n{shown}{more}'

        head = f'loaded {self.loaded} tensors from {self.source or "<state_dict>"}'
        if self.layout:
            head += f' [layout: {", ".join(self.layout)}]'
        return (head + _block('converted', self.converted) + _block('missing in checkpoint', self.missing)
                + _block('unexpected (not in model)', self.unexpected)
                + _block('shape mismatch (skipped)', self.mismatched)
                + _block('dropped by layout rules', self.dropped))


def read_class_index(index: str | os.PathLike | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A class-index map as a long tensor: a file with one integer per line, or a sequence of integers."""
    if isinstance(index, torch.Tensor):
        return index.long()
    if isinstance(index, (str, os.PathLike)):
        with open(index) as f:
            values = [int(line.split()[0]) for line in f if line.strip()]
        return torch.tensor(values, dtype=torch.long)
    return torch.tensor(list(index), dtype=torch.long)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a checkpoint file (``weights_only=True``, or safetensors) and unwrap it to a flat state_dict.

    Returns ``(state_dict, layout_notes)``.
    """
    path = os.fspath(path)
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file

        return dict(load_file(path, device='cpu')), ['safetensors']
    obj = torch.load(path, map_location='cpu', weights_only=True)
    return unwrap_checkpoint(obj, use_ema=use_ema)


def unwrap_checkpoint(obj, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pick the model weights out of a loaded checkpoint object; see the module docstring for the wrappers."""
    keys = ('model_ema', 'model', 'state_dict', 'module') if use_ema else ('model', 'state_dict', 'module')
    if isinstance(obj, Mapping):
        for key in keys:
            if key in obj and _is_state_dict(obj[key]):
                return dict(obj[key]), [f"['{key}']"]
        if _is_state_dict(obj):
            return dict(obj), ['raw state_dict']
        found = ', '.join(f'{k!r}: {type(v).__name__}' for k, v in list(obj.items())[:10])
        raise ValueError(f'checkpoint holds no state_dict under {list(keys)} and is not a raw state_dict; '
                         f'top level: {{{found}}}')
    raise ValueError(f'checkpoint is a {type(obj).__name__}, expected a dict')


def _strip_prefixes(sd: dict, model_keys: set[str], report: LoadReport) -> dict:
    for prefix in _WRAPPER_PREFIXES:
        with_prefix = [k for k in sd if k.startswith(prefix)]
        if not with_prefix:
            continue
        stripped = {k[len(prefix):]: sd[k] for k in with_prefix}
        if prefix == 'student.':
            # M3I: the student is the model; the teacher and the student projector are training-only.
            stripped = {k: v for k, v in stripped.items() if not k.startswith('student_proj')}
        # A prefix on every key is a wrapper even when the keys are not the model's yet (e.g. FB ConvNeXt layout).
        wraps_all = len(with_prefix) == len(sd) and not any(k.startswith(prefix) for k in model_keys)
        if not wraps_all and len(model_keys & stripped.keys()) <= len(model_keys & sd.keys()):
            continue
        report.layout.append(f"prefix '{prefix}'")
        report.dropped += [k for k in sd if not k.startswith(prefix) or k[len(prefix):] not in stripped]
        sd = stripped
    return sd


def _convert_m3i_sim(sd: dict, report: LoadReport) -> dict:
    """M3I "sim" layout: backbone under ``dcnv3.``, classifier under ``clip.classifier_ln.`` / ``clip.classifier.``."""
    out = {}
    for k, v in sd.items():
        if k.startswith('dcnv3.'):
            out[k[len('dcnv3.'):]] = v
        elif k.startswith('clip_projector.'):
            out[k] = v
        elif k.startswith('clip.classifier_ln.'):
            out['fc_norm.0.' + k[len('clip.classifier_ln.'):]] = v
        elif k.startswith('clip.classifier.'):
            out['head.' + k[len('clip.classifier.'):]] = v
        else:
            report.dropped.append(k)
    report.layout.append('M3I sim')
    return out


def _family_filter(sd: dict, model: nn.Module, model_keys: set[str], report: LoadReport) -> dict:
    """Other timm families: their own ``checkpoint_filter_fn`` (e.g. the original FB ConvNeXt V1/V2 layout).

    Applied only when the keys do not already match the model (timm's filters expect unprefixed original keys).
    """
    if len(model_keys & sd.keys()) >= len(model_keys) // 2 or type(model).__name__ == 'InternImage':
        return sd
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, 'checkpoint_filter_fn', None)
    if filter_fn is None:
        return sd
    try:
        out = filter_fn(dict(sd), model)
    except (KeyError, RuntimeError, ValueError) as e:  # the layout is not the one this filter knows
        _logger.debug('%s.checkpoint_filter_fn did not apply: %s', module.__name__, e)
        return sd
    if len(model_keys & out.keys()) > len(model_keys & sd.keys()):
        report.layout.append(f'{module.__name__}.checkpoint_filter_fn')
        return out
    return sd


def _remove_center(name: str, value: torch.Tensor, rows: int) -> torch.Tensor | None:
    """9-point DCNv3 offset/mask rows -> 8 points (centre dropped), or None if not that case."""
    if name.endswith(('.dcn.mask.weight', '.dcn.mask.bias')) and value.shape[0] % 9 == 0:
        groups = value.shape[0] // 9
        if rows != groups * 8:
            return None
        keep = [g * 9 + p for g in range(groups) for p in range(9) if p != 4]
    elif name.endswith(('.dcn.offset.weight', '.dcn.offset.bias')) and value.shape[0] % 18 == 0:
        groups = value.shape[0] // 18
        if rows != groups * 16:
            return None
        keep = [g * 18 + j for g in range(groups) for j in range(18) if j not in (8, 9)]
    else:
        return None
    return value[torch.tensor(keep, dtype=torch.long)]


def convert_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        head_index: str | os.PathLike | Sequence[int] | torch.Tensor | None = None,
        report: LoadReport | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename / reshape a state_dict of any supported layout to ``model``'s keys.

    Keys whose shape still differs from the model's are removed and listed in ``report.mismatched``.
    Returns ``(state_dict, report)``; nothing is loaded.
    """
    report = report if report is not None else LoadReport()
    if not _is_state_dict(state_dict):
        state_dict, notes = unwrap_checkpoint(state_dict)
        report.layout += notes
    target = model.state_dict()
    model_keys = set(target)
    sd = dict(state_dict)
    if next(iter(sd)) == 'mask_token' or (any(k.startswith('dcnv3.') for k in sd) and not model_keys & sd.keys()):
        sd = _convert_m3i_sim(sd, report)
    sd = _strip_prefixes(sd, model_keys, report)
    sd = _family_filter(sd, model, model_keys, report)

    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new_k = re.sub(r'\.layer_scale([12])$', r'.gamma\1', k)  # Hugging Face port names
        if new_k != k and new_k in model_keys:
            report.converted.append(f'{k} -> {new_k}')
            if 'HF layer_scale' not in report.layout:
                report.layout.append('HF layer_scale')
        else:
            new_k = k
        out[new_k] = v

    for k in list(out):
        if k not in target:
            continue
        v, want = out[k], target[k]
        if v.shape == want.shape:
            continue
        new_v = None
        if k in _HEAD_KEYS and head_index is not None:
            index = read_class_index(head_index)
            if len(index) != want.shape[0]:
                raise ValueError(f'class index has {len(index)} entries but the model head has {want.shape[0]}')
            if int(index.max()) >= v.shape[0] or int(index.min()) < 0:
                raise ValueError(f'class index out of range for a {v.shape[0]}-class checkpoint head')
            new_v = v[index]
            report.converted.append(f'{k}: {v.shape[0]} -> {want.shape[0]} classes by index')
        elif want.ndim >= 1 and v.ndim == want.ndim and v.shape[1:] == want.shape[1:]:
            new_v = _remove_center(k, v, want.shape[0])
            if new_v is not None:
                report.converted.append(f'{k}: remove_center {v.shape[0]} -> {want.shape[0]} rows')
        if new_v is None:
            report.mismatched.append(f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(want.shape)}')
            del out[k]
        else:
            out[k] = new_v
    return out, report


def load_checkpoint(
        model: nn.Module,
        path: str | os.PathLike,
        head_index: str | os.PathLike | Sequence[int] | torch.Tensor | None = None,
        strict: bool = False,
        use_ema: bool = False,
        assign: bool = False,
) -> LoadReport:
    """Load a checkpoint file of any supported layout into ``model`` (in place) and report what happened.

    Args:
        model: the target model (any ``nn.Module``; InternImage layouts get the renames described above).
        path: ``.pth`` / ``.pt`` (read with ``weights_only=True``) or ``.safetensors``.
        head_index: class-index file (or sequence) mapping a larger checkpoint head (21841) to the model's classes.
        strict: raise ``RuntimeError`` (with the report) if anything is missing, unexpected or mismatched.
        use_ema: prefer ``model_ema`` weights when the file has them.
        assign: assign the checkpoint tensors instead of copying into the parameters; with a model built on the
            meta device (``with torch.device('meta'):``) this materialises H/G without a second full copy in memory.
    Returns:
        the :class:`LoadReport`, also logged at INFO (WARNING when not everything matched).
    """
    sd, notes = read_state_dict(path, use_ema=use_ema)
    report = LoadReport(source=os.fspath(path), layout=notes)
    sd, report = convert_state_dict(sd, model, head_index=head_index, report=report)
    result = model.load_state_dict(sd, strict=False, assign=assign)
    report.missing = list(result.missing_keys)
    report.unexpected = list(result.unexpected_keys)
    report.loaded = len(sd) - len(report.unexpected)
    if strict and not report.ok:
        raise RuntimeError(f'checkpoint does not match the model strictly:\n{report}')
    _logger.log(logging.INFO if report.ok else logging.WARNING, '%s', report)
    return report
