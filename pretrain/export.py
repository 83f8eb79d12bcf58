"""``python -m pretrain export CHECKPOINT --format FORMAT --out PATH [--ema | --teacher]``: a trained backbone's
weights in the layouts other code loads.

Sources (:func:`consolidate`):
* a committed step folder ``<output_dir>/checkpoints/step_XXXXXXXX`` of any ZeRO stage and world size. The fp32
  weights come from DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (ZeRO 1/2/3: the fp32 master weights
  of every rank's optimizer partition, plus the buffers). ZeRO-0 has no partitions: its module weights are read from
  ``mp_rank_00_model_states.pt``, exact under fp32; under bf16/fp16 they are the 16-bit copy, and a note says so
  (DeepSpeed saves ZeRO-0's fp32 master weights without their names). ``ema`` / ``teacher`` take the weight average
  saved beside it (``ema_RRRRR.pt`` / ``teacher_RRRRR.pt``, ZeRO-3 partitions merged by
  :func:`pretrain.common.ema.merge_saved_states`); integer buffers (BatchNorm's ``num_batches_tracked``) are not
  averaged and come from the raw weights;
* a run output folder, its ``checkpoints`` folder, or a launch stage folder (``<stage>/out``): the newest committed
  step folder in it;
* a weights file: ``.pth``/``.pt`` (``{'model': ...}``, ``{'state_dict': ...}``, ``{'module': ...}`` or a raw
  state_dict; ``ema`` takes ``'model_ema'``), ``.safetensors``, or a timm folder written by this command. Files written
  here carry their metadata; for others pass ``model=`` (``--model``) and ``model_kwargs=``.

The trained module is either the bare backbone (keys ``patch_embed.*``, ``levels.*``, ``head.*``) or a wrapper with
the backbone under ``backbone`` (M3I: ``backbone.*`` beside ``text.*``, ``image_proj.*``, ``logit_scale``,
``mim_decoder.*``); the wrapper's other parts are dropped and listed in ``meta.dropped``. The result is checked key
by key and shape by shape against the model built (on the meta device) from the checkpoint's config.

Formats (:func:`write`):
* ``official``: ``{'model': state_dict, 'meta': {...}}`` ``.pth``; the keys of the official InternImage release (what
  its classification code reads from ``['model']``);
* ``timm``: a folder with ``model.safetensors`` and ``config.json`` (architecture, ``model_args``, preprocessing),
  written by ``timm.models.save_for_hf``: ``timm.create_model('local-dir:DIR', pretrained=True)``, or
  ``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file='DIR/model.safetensors',
  num_classes=N), num_classes=N, **model_kwargs)``; also the layout of a Hugging Face hub repository (``hf-hub:``);
* ``safetensors``: the state_dict with string metadata (``model``, ``model_kwargs``, ``num_classes``, ``weights``
  raw/ema/teacher, ``step``, ``samples_seen``, ``stage``, ``source``, ``config``; non-string values as JSON);
* ``backbone``: for detection/segmentation (mmdet/mmseg InternImage backbones): ``{'state_dict': ..., 'meta':
  {...}}`` ``.pth`` holding exactly the tensors of the timm ``features_only`` model, i.e. ``patch_embed.*`` and
  ``levels.*`` for InternImage; the classification head (``conv_head``, ``head``; H/G: ``dcnv3_head_x3/x4``,
  ``clip_projector``, ``fc_norm``) is dropped. No ``backbone.`` prefix: the official backbones strip it when
  present, mmengine's ``Pretrained`` init loads unprefixed keys without a ``prefix`` argument.
Every file is written to a temporary name and renamed into place (a timm folder as a whole).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from pretrain.common.safe_load import UnsafeCheckpointError, check_folder, safe_load
from pretrain.engine.checkpoint import MARKER, STEP_DIR, atomic_torch_save, find_complete_checkpoints, load_average

__all__ = ['ExportError', 'ExportMeta', 'Exported', 'FORMATS', 'WEIGHTS', 'consolidate', 'write', 'export',
           'deploy_state_dict',
           'resolve_checkpoint', 'backbone_state_dict', 'default_path', 'main']

FORMATS = ('official', 'timm', 'safetensors', 'backbone')
WEIGHTS = ('raw', 'ema', 'teacher')
# Constructor arguments that do not describe the architecture (training-time or operator choices); not exported.
_NOT_ARCHITECTURE = frozenset({'with_cp', 'core_op', 'drop_rate', 'drop_path_rate', 'drop_path_type', 'pretrained',
                               'checkpoint_path', 'head_index', 'checkpoint_use_ema', 'features_only', 'out_indices',
                               'feature_cls', 'grad_checkpointing', 'grad_checkpointing_every', 'global_pool'})


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message names the folder or file."""


@dataclass
class ExportMeta:
    """What the exported weights are; stored in every file (``meta``, safetensors metadata, timm ``config.json``)."""

    model: str | None = None  # timm name (internimage_t ...)
    model_kwargs: dict = field(default_factory=dict)  # architecture arguments beside the name (not num_classes)
    num_classes: int | None = None  # of the exported classifier (0: none)
    weights: str = 'raw'  # raw / ema / teacher
    step: int | None = None
    samples_seen: int | None = None
    stage: str | None = None  # the launch stage that trained it, when the path says so
    source: str = ''  # the step folder or file it came from
    zero_stage: int | None = None
    world_size: int | None = None
    config: dict | None = None  # the resolved training config
    dropped: list[str] = field(default_factory=list)  # trained-module parts that are not the backbone
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExportMeta:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_safetensors(self) -> dict[str, str]:
        out = {'format': 'pt'}  # what Hugging Face / timm readers expect
        for k, v in self.to_dict().items():
            if v is not None:
                out[k] = v if isinstance(v, str) else json.dumps(v)
        return out

    @classmethod
    def from_safetensors(cls, md: dict[str, str]) -> ExportMeta | None:
        if 'weights' not in md or 'model' not in md:
            return None  # not written here
        strings = {'model', 'weights', 'stage', 'source'}
        return cls.from_dict({k: (v if k in strings else json.loads(v)) for k, v in md.items() if k != 'format'})


# ----------------------------------------------------------------------------------------------------------------
# sources


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The step folder or weights file that ``path`` names (see the module docstring); raises :class:`ExportError`
    for a step folder without its commit marker or a folder with no committed checkpoint."""

    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ExportError(f'{p}: no such file or folder')
    if (p / 'config.json').is_file() and (p / 'model.safetensors').is_file():
        return p / 'model.safetensors'  # a timm folder
    if STEP_DIR.match(p.name) or (p / MARKER).is_file():
        if not (p / MARKER).is_file():
            raise ExportError(f'{p} is not a complete checkpoint (no {MARKER} marker: the save did not finish)')
        return p
    for root in (p / 'out' / 'checkpoints', p / 'checkpoints', p):
        found = find_complete_checkpoints(str(root))
        if found:
            return Path(found[-1][1])
        if root.is_dir() and any(STEP_DIR.match(n) for n in os.listdir(root)):
            raise ExportError(f'{root}: no complete checkpoint (step folders without the {MARKER} marker only)')
    raise ExportError(f'{p}: neither a checkpoint step folder, a run output folder nor a weights file')


def _stage_of(step_dir: Path) -> str | None:
    # launch layout: <run>/stages/<stage>/out/checkpoints/step_XXXXXXXX
    parts = step_dir.resolve().parts
    if len(parts) >= 5 and parts[-2] == 'checkpoints' and parts[-3] == 'out' and parts[-5] == 'stages':
        return parts[-4]
    return None


def _fp32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float tensors as fp32, each owning its storage (DeepSpeed's come as views into flat buffers)."""
    out = {}
    for k, v in sd.items():
        v = v.detach().float() if v.is_floating_point() else v.detach()
        if v.untyped_storage().nbytes() != v.numel() * v.element_size() or not v.is_contiguous():
            v = v.clone(memory_format=torch.contiguous_format)
        out[k] = v
    return out


def _read_deepspeed(step_dir: Path, step: int, notes: list[str], trust_pickle: bool) -> dict[str, torch.Tensor]:
    tag_dir = step_dir / f'global_step{step}'
    if not tag_dir.is_dir():
        raise ExportError(f'{step_dir}: no DeepSpeed save {tag_dir.name}/')
    check_folder(tag_dir, trust_pickle=trust_pickle)  # zero_to_fp32 unpickles unrestricted
    if any(tag_dir.glob('*optim_states.pt')):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=tag_dir.name)
    # ZeRO-0: the whole module is in the model states file
    states = safe_load(tag_dir / 'mp_rank_00_model_states.pt', trust_pickle=trust_pickle)
    sd = states['module']
    low = sorted({str(v.dtype) for v in sd.values() if v.is_floating_point() and v.dtype != torch.float32})
    if low:
        notes.append(f'ZeRO-0 saves its fp32 master weights without names: exported the module weights, which are '
                     f'{"/".join(low)}')
    return sd


def _read_average(step_dir: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        average = load_average(step_dir, name)
    except FileNotFoundError as e:  # some ranks' files of a partitioned average
        raise ExportError(str(e)) from e
    if average is None:
        have = sorted({f.name.rsplit('_', 1)[0] for f in step_dir.glob('*_00000.pt')} - {'rank'})
        raise ExportError(f'{step_dir}: no {name} weights ({name}_00000.pt missing; weight averages saved here: '
                          f'{have or "none"})')
    return average


def _read_step_dir(step_dir: Path, weights: str, trust_pickle: bool) -> tuple[dict, dict | None, ExportMeta]:
    import yaml


    with open(step_dir / MARKER) as f:
        marker = json.load(f)
    step = int(marker['step'])
    config = None
    if (step_dir / 'config.yaml').is_file():
        with open(step_dir / 'config.yaml') as f:
            config = yaml.safe_load(f)
    meta = ExportMeta(weights=weights, step=step, samples_seen=marker.get('samples_seen'), stage=_stage_of(step_dir),
                      source=str(step_dir), world_size=marker.get('world_size'), config=config)
    if config:
        meta.model = config['model']['name']
        meta.model_kwargs = dict(config['model'].get('kwargs') or {})
        meta.zero_stage = config.get('deepspeed', {}).get('zero_stage')
    average = _read_average(step_dir, weights) if weights != 'raw' else None  # fail on a missing EMA before reading
    raw = _read_deepspeed(step_dir, step, meta.notes, trust_pickle)
    return raw, average, meta


def _read_file(path: Path, weights: str, trust_pickle: bool) -> tuple[dict, dict | None, ExportMeta]:
    from pretrain.models.weights import unwrap_checkpoint

    meta = None
    if path.suffix == '.safetensors':
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), 'pt') as f:
            meta = ExportMeta.from_safetensors(f.metadata() or {})
        obj = load_file(str(path), device='cpu')
        if meta is None and (path.parent / 'export_meta.json').is_file():  # a timm folder written here
            meta = ExportMeta.from_dict(json.loads((path.parent / 'export_meta.json').read_text()))
        elif meta is None and (path.parent / 'config.json').is_file():  # another timm folder
            cfg = json.loads((path.parent / 'config.json').read_text())
            meta = ExportMeta(model=cfg.get('architecture'), model_kwargs=dict(cfg.get('model_args') or {}))
    else:
        obj = safe_load(path, trust_pickle=trust_pickle)
        if isinstance(obj, dict) and isinstance(obj.get('meta'), dict):
            meta = ExportMeta.from_dict(obj['meta'])
    meta = meta or ExportMeta()
    raw, _ = unwrap_checkpoint(obj)
    average = None
    if weights != 'raw' and meta.weights != weights:  # a file holding those weights already needs nothing more
        if weights != 'ema' or not (isinstance(obj, dict) and 'model_ema' in obj):
            raise ExportError(f'{path}: no {weights} weights in this file (it holds {meta.weights} weights)')
        average = unwrap_checkpoint(obj, use_ema=True)[0]
        meta.weights = weights
    meta.source = str(path)
    return raw, average, meta


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _split_backbone(sd: dict) -> tuple[dict, list[str]]:
    """The backbone's keys of a trained module, and a summary of what else it had (``text.* (196 tensors)``)."""
    for wrapper in ('module.', '_orig_mod.'):
        if sd and all(k.startswith(wrapper) for k in sd):
            sd = _strip(sd, wrapper)
    if not any(k.startswith('backbone.') for k in sd):
        return sd, []
    return _strip(sd, 'backbone.'), _summarize([k for k in sd if not k.startswith('backbone.')])


def _summarize(keys: list[str]) -> list[str]:
    """``['text.* (196)', 'logit_scale']``: keys grouped by their first name."""
    groups: dict[str, int] = {}
    for k in keys:
        top = k.split('.')[0]
        groups[top] = groups.get(top, 0) + 1
    whole = set(keys)
    return [top if top in whole else f'{top}.* ({n})' for top, n in groups.items()]


def _build_meta_model(meta: ExportMeta, features_only: bool = False):
    from pretrain.models import create_backbone

    with torch.device('meta'):
        if features_only:
            return create_backbone(meta.model, features_only=True, **meta.model_kwargs).model
        return create_backbone(meta.model, num_classes=meta.num_classes, **meta.model_kwargs)


def _check_keys(sd: dict, model, what: str) -> None:
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f'{k}: {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}' for k in want
              if k in sd and sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        lines = [f'{title} ({len(ks)}): {ks[:8]}' for title, ks in
                 (('missing', missing), ('unexpected', unexpected), ('shape mismatch', shapes)) if ks]
        raise ExportError(f'{what} do not match the model they should be:\n  ' + '\n  '.join(lines))


def consolidate(path: str | os.PathLike, weights: str = 'raw', *, model: str | None = None,
                model_kwargs: dict | None = None, trust_pickle: bool = False
                ) -> tuple[dict[str, torch.Tensor], ExportMeta]:
    """The backbone's fp32 state_dict (official InternImage keys, classifier included when it has one) and its
    :class:`ExportMeta`, from a checkpoint, run folder or weights file (module docstring).

    ``weights``: 'raw', 'ema' or 'teacher' (the saved weight averages). ``model`` / ``model_kwargs`` override the
    architecture named by the source (needed for files written elsewhere). Every file is read under
    :mod:`pretrain.common.safe_load`'s allow-list unless ``trust_pickle``. Raises :class:`ExportError` (also for a
    file refused as unsafe).
    """
    if weights not in WEIGHTS:
        raise ExportError(f'weights must be one of {WEIGHTS}, got {weights!r}')
    src = resolve_checkpoint(path)
    try:
        read = _read_step_dir if src.is_dir() else _read_file
        raw, average, meta = read(src, weights, trust_pickle)
    except UnsafeCheckpointError as e:
        raise ExportError(str(e)) from e
    if model is not None:
        meta.model = model
    if model_kwargs is not None:
        meta.model_kwargs = dict(model_kwargs)
    if meta.model is None:
        raise ExportError(f'{src}: the file does not say which model it holds; pass --model NAME (and '
                          '--model-kwargs JSON)')
    meta.model_kwargs = {k: v for k, v in meta.model_kwargs.items() if k not in _NOT_ARCHITECTURE | {'num_classes'}}
    sd, meta.dropped = _split_backbone(raw)
    if average is not None:
        avg, _ = _split_backbone(average)
        avg = {k: v for k, v in avg.items() if k in sd}  # an EMA of the wrapper also covers its other parts
        uncovered = [k for k, v in sd.items() if v.is_floating_point() and k not in avg]
        if uncovered:
            raise ExportError(f'{src}: the {weights} weights lack {len(uncovered)} backbone tensors, e.g. '
                              f'{uncovered[:5]}')
        sd = {k: avg.get(k, v) for k, v in sd.items()}  # integer buffers are not averaged: the raw ones
    sd = _fp32(sd)
    from timm.models import get_pretrained_cfg_value

    import pretrain.models  # noqa: F401 - registers InternImage with timm

    classifier = get_pretrained_cfg_value(meta.model, 'classifier') or 'head'
    head = sd.get(f'{classifier}.weight')
    meta.num_classes = int(head.shape[0]) if head is not None else 0
    _check_keys(sd, _build_meta_model(meta), f'{src}: the {weights} weights of {meta.model} {meta.model_kwargs}')
    return sd, meta


def backbone_state_dict(sd: dict[str, torch.Tensor], meta: ExportMeta) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of the ``features_only`` model (the backbone of detection/segmentation), and the dropped keys."""
    keep = set(_build_meta_model(meta, features_only=True).state_dict())
    missing = sorted(keep - set(sd))
    if missing:
        raise ExportError(f'the weights lack backbone tensors {missing[:5]}')
    return {k: v for k, v in sd.items() if k in keep}, [k for k in sd if k not in keep]


# ----------------------------------------------------------------------------------------------------------------
# formats


def default_path(fmt: str, meta: ExportMeta, folder: str | os.PathLike = '.') -> Path:
    """``<model>_step<N>[_ema|_teacher]`` + ``.pth`` / ``_timm/`` / ``.safetensors`` / ``_backbone.pth``."""
    stem = meta.model + (f'_step{meta.step}' if meta.step is not None else '') + \
        (f'_{meta.weights}' if meta.weights != 'raw' else '')
    name = {'official': f'{stem}.pth', 'timm': f'{stem}_timm', 'safetensors': f'{stem}.safetensors',
            'backbone': f'{stem}_backbone.pth'}[fmt]
    return Path(folder) / name


def _tmp(path: Path) -> Path:
    return path.with_name(f'.{path.name}.tmp{os.getpid()}')


def _commit(tmp: Path, path: Path) -> None:
    if tmp.is_dir() and path.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside
        old = path.with_name(f'.{path.name}.old{os.getpid()}_{time.time_ns()}')
        os.replace(path, old)
        os.replace(tmp, path)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(tmp, path)


def _write_official(sd, meta, path: Path) -> str:
    atomic_torch_save({'model': sd, 'meta': meta.to_dict()}, path)
    return f'{len(sd)} tensors'


def _write_backbone(sd, meta, path: Path) -> str:
    bb, dropped = backbone_state_dict(sd, meta)
    detail = f'kept {", ".join(_summarize(list(bb)))}; dropped {", ".join(_summarize(dropped)) or "nothing"}'
    m = meta.to_dict()
    m['notes'] = m['notes'] + [f'backbone file: {detail}']
    atomic_torch_save({'state_dict': bb, 'meta': m}, path)
    return detail


def _write_safetensors(sd, meta, path: Path) -> str:
    from safetensors.torch import save_file

    tmp = _tmp(path)
    try:
        save_file(sd, str(tmp), metadata=meta.to_safetensors())
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return f'{len(sd)} tensors, metadata {sorted(meta.to_safetensors())}'


def _write_timm(sd, meta, path: Path) -> str:
    from timm.models import save_for_hf

    model = _build_meta_model(meta)
    model.load_state_dict(sd, strict=True, assign=True)
    data = (meta.config or {}).get('data') or {}
    data_config = {'input_size': (3, data['img_size'], data['img_size']) if data.get('img_size') else None,
                   'crop_pct': data.get('eval_crop_pct'), 'interpolation': data.get('interpolation')}
    data_config = {k: v for k, v in data_config.items() if v is not None}
    tmp = _tmp(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_for_hf(model.eval(), str(tmp), model_args={**meta.model_kwargs, 'num_classes': meta.num_classes},
                    safe_serialization=True, data_config=data_config or None)
        (tmp / 'export_meta.json').write_text(json.dumps(meta.to_dict(), indent=1))  # timm ignores other files
        _commit(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 'model.safetensors, config.json, export_meta.json'


_WRITERS = {'official': _write_official, 'timm': _write_timm, 'safetensors': _write_safetensors,
            'backbone': _write_backbone}


def write(sd: dict[str, torch.Tensor], meta: ExportMeta, fmt: str, path: str | os.PathLike) -> str:
    """Write one format (``FORMATS``) of :func:`consolidate`'s output to ``path`` atomically; returns a one-line
    description of what the file holds."""
    if fmt not in _WRITERS:
        raise ExportError(f'format must be one of {FORMATS}, got {fmt!r}')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _WRITERS[fmt](sd, meta, path)


@dataclass
class Exported:
    meta: ExportMeta
    files: dict[str, Path]  # format -> path
    details: dict[str, str]  # format -> what it holds


def deploy_state_dict(sd: dict[str, torch.Tensor], meta: ExportMeta) -> dict[str, torch.Tensor]:
    """The structurally re-parameterised (inference) form of ``sd``: the model is built, loaded and passed through
    ``timm.utils.reparameterize_model`` (RepLKNet: BN folded, 5x5 merged into one K x K conv with bias);
    ``meta.model_kwargs`` gains the model's ``deploy_kwargs`` so the result loads back. Raises :class:`ExportError`
    for a model without a deploy form."""
    from timm.utils import reparameterize_model

    from pretrain.models import create_backbone

    model = create_backbone(meta.model, num_classes=meta.num_classes, **meta.model_kwargs)
    if getattr(model, 'deploy_kwargs', None) is None:
        raise ExportError(f'{meta.model} has no re-parameterised (deploy) form; export it without --deploy')
    model.load_state_dict(sd, strict=True)
    reparameterize_model(model.eval(), inplace=True)
    meta.model_kwargs = {**meta.model_kwargs, **model.deploy_kwargs}
    meta.notes.append(f'deploy: re-parameterised by timm.utils.reparameterize_model ({len(sd)} -> '
                      f'{len(model.state_dict())} tensors)')
    return {k: v.detach() for k, v in model.state_dict().items()}


def export(checkpoint: str | os.PathLike, formats: str | list[str], out: str | os.PathLike, weights: str = 'raw',
           *, model: str | None = None, model_kwargs: dict | None = None, trust_pickle: bool = False,
           deploy: bool = False) -> Exported:
    """Consolidate ``checkpoint`` once and write each of ``formats`` ('all': every one). ``out`` is the path of a
    single format, or a folder (for several formats, or one that exists) where files get :func:`default_path`
    names. ``deploy``: write the re-parameterised form (:func:`deploy_state_dict`)."""
    formats = list(FORMATS) if formats == 'all' else [formats] if isinstance(formats, str) else list(formats)
    sd, meta = consolidate(checkpoint, weights, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle)
    if deploy:
        sd = deploy_state_dict(sd, meta)
    out = Path(out)
    result = Exported(meta, {}, {})
    for fmt in formats:
        replaces_timm_folder = fmt == 'timm' and (out / 'config.json').is_file()
        in_folder = len(formats) > 1 or (out.is_dir() and not replaces_timm_folder)
        path = default_path(fmt, meta, out) if in_folder else out
        result.details[fmt] = write(sd, meta, fmt, path)
        result.files[fmt] = path
    return result


# ----------------------------------------------------------------------------------------------------------------
# command line

_HOW_TO_LOAD = {
    'official': "torch.load('{path}')['model'] (official code); here: create_backbone('{model}', num_classes="
                "{num_classes}, **model_kwargs, checkpoint_path='{path}')",
    'timm': "timm.create_model('local-dir:{path}', pretrained=True)",
    'onnx': "onnxruntime.InferenceSession('{path}').run(['logits'], {{'images': images}})",
    'safetensors': "safetensors.torch.load_file('{path}'); metadata: safetensors.safe_open('{path}', 'pt').metadata()",
    'backbone': "mmdet/mmseg: backbone=dict(type='InternImage', core_op='DCNv3', {backbone_args}, "
                "out_indices=(0, 1, 2, 3), init_cfg=dict(type='Pretrained', checkpoint='{path}'))",
}


def _backbone_args(meta: ExportMeta) -> str:
    """The architecture as detection/segmentation configs spell it: the size's defaults and the checkpoint's
    arguments, without the classification-head ones."""
    from pretrain.models.internimage import MODEL_ARGS

    args = {**MODEL_ARGS.get(meta.model, {}), **meta.model_kwargs}
    skip = _NOT_ARCHITECTURE | {'use_clip_projector', 'cls_scale'}
    return ', '.join(f'{k}={list(v) if isinstance(v, tuple) else v!r}' for k, v in args.items() if k not in skip)


def export_onnx_file(checkpoint: str | os.PathLike, out: str | os.PathLike, weights: str = 'raw', *,
                     model: str | None = None, model_kwargs: dict | None = None, trust_pickle: bool = False,
                     img_size: int = 224, custom_op: bool = False) -> Exported:
    """Consolidate ``checkpoint`` and write the classifier to ``out`` as ONNX (:mod:`pretrain.export_onnx`: portable
    or with DCNv3 as a custom node), then check it; ``details['onnx']`` says what the check ran."""
    from pretrain.export_onnx import check_onnx, export_onnx
    from pretrain.models import create_backbone

    sd, meta = consolidate(checkpoint, weights, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle)
    net = create_backbone(meta.model, num_classes=meta.num_classes, **meta.model_kwargs)
    net.load_state_dict(sd, strict=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f'.{out.name}.tmp')
    try:
        export_onnx(net, tmp, img_size, custom_op=custom_op)
        check = check_onnx(net, tmp, img_size, custom_op=custom_op)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    kind = 'DCNv3 as custom nodes' if custom_op else 'portable, standard ops'
    return Exported(meta, {'onnx': out}, {'onnx': f'{kind}, input images (B, 3, {img_size}, {img_size}), dynamic '
                                                  f'batch; check: {check}'})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m pretrain export', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='a step folder, a run output folder (newest complete checkpoint) or a file')
    p.add_argument('--format', required=True, choices=[*FORMATS, 'all', 'onnx'],
                   help="'onnx': the classifier as an ONNX graph, checked in onnxruntime (not part of 'all')")
    p.add_argument('--out', required=True, help="the file (timm: folder) to write; with --format all, a folder")
    which = p.add_mutually_exclusive_group()
    which.add_argument('--ema', action='store_true', help='the EMA weights instead of the raw ones')
    which.add_argument('--teacher', action='store_true', help="the MIM teacher's weights (an EMA of the backbone)")
    p.add_argument('--model', default=None, help='timm model name, for files that do not say')
    p.add_argument('--model-kwargs', default=None, type=json.loads, help='architecture arguments as JSON')
    p.add_argument('--trust-pickle', action='store_true',
                   help='load checkpoint files without the allow-list of types (only for files you vouch for: '
                        'a crafted file runs code when loaded this way)')
    p.add_argument('--deploy', action='store_true',
                   help='write the structurally re-parameterised inference form (RepLKNet: merged large kernels)')
    p.add_argument('--img-size', type=int, default=224, help='onnx: the input side in pixels')
    p.add_argument('--onnx-custom-op', action='store_true',
                   help='onnx: keep each DCNv3 as one custom-domain node (docs/EXPORT.md) instead of standard ops')
    args = p.parse_args(argv)
    weights = 'ema' if args.ema else 'teacher' if args.teacher else 'raw'
    t0 = time.time()
    try:
        if args.format == 'onnx':
            result = export_onnx_file(args.checkpoint, args.out, weights, model=args.model,
                                      model_kwargs=args.model_kwargs, trust_pickle=args.trust_pickle,
                                      img_size=args.img_size, custom_op=args.onnx_custom_op)
        else:
            result = export(args.checkpoint, args.format, args.out, weights, model=args.model,
                            model_kwargs=args.model_kwargs, trust_pickle=args.trust_pickle, deploy=args.deploy)
    except ExportError as e:
        print(f'export error: {e}', file=sys.stderr)
        return 2
    meta = result.meta
    where = ', '.join(f'{k} {v}' for k, v in (('step', meta.step), ('samples seen', meta.samples_seen),
                                                ('ZeRO', meta.zero_stage), ('ranks', meta.world_size),
                                                ('stage', meta.stage)) if v is not None)
    print(f'source: {meta.source}' + (f' ({where})' if where else ''))
    print(f'weights: {meta.weights}; model: {meta.model} num_classes={meta.num_classes} {meta.model_kwargs}')
    if meta.dropped:
        print(f'dropped (not the backbone): {", ".join(meta.dropped)}')
    for note in meta.notes:
        print(f'note: {note}')
    for fmt, path in result.files.items():
        how = _HOW_TO_LOAD[fmt].format(path=path, model=meta.model, num_classes=meta.num_classes,
                                       backbone_args=_backbone_args(meta) if fmt == 'backbone' else '')
        print(f'wrote {fmt} {path}: {result.details[fmt]}\n  load: {how}')
    print(f'done in {time.time() - t0:.1f}s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
