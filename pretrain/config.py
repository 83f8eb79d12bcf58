"""One typed config schema for a training run, YAML loading and ``key.sub=value`` overrides.

``load_config(path, overrides)`` -> :class:`TrainConfig`. Every section is a dataclass; a YAML file only sets values
the schema defines. Unknown keys, wrong types and impossible combinations raise :class:`ConfigError` naming the file
(or ``command line``) and the dotted key, before any model, data or process group is built.

Units are in the names: ``*_steps`` count optimizer steps, ``micro_batch_size`` is per rank and per micro-step,
``lr_base`` is the peak learning rate for ``lr_base_batch_size`` images (scaled linearly by the global batch).
"""
from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_pipelines.tario import RemoteOptions

__all__ = [
    'ConfigError', 'TrainConfig', 'ModelConfig', 'SourceConfig', 'DataConfig', 'LossConfig', 'OptimConfig',
    'ScheduleConfig', 'DeepSpeedConfig', 'EMAConfig', 'CheckpointConfig', 'LoggingConfig', 'RunConfig',
    'SparsityConfig', 'ObjectiveConfig', 'ContrastiveConfig', 'SupervisedConfig', 'MIMConfig', 'FCMAEConfig',
    'ZeroShotConfig',
    'load_config', 'config_from_dict', 'config_to_dict', 'parse_overrides', 'migrate', 'OBJECTIVE_PARTS',
]


OPEN_CLIP_IMAGENET = 'open_clip:imagenet1k'  # zero_shot.classnames: open_clip's ImageNet-1K class names
OBJECTIVE_PARTS = ('supervised', 'contrastive', 'mim', 'fcmae')  # the weighted parts of objective.kind=multi
# Old names still read (with a warning), and the value they now go by.
RENAMED_KEYS = {'model.checkpoint_path': 'model.init_from', 'model.checkpoint_use_ema': 'model.init_from_ema'}
VALUE_ALIASES = {'objective.kind': {'m3i': 'multi'}}  # accepted spellings of a value, without a warning


class ConfigError(ValueError):
    """A config value that cannot work; the message names the file and the dotted key."""


@dataclass
class ModelConfig:
    name: str = 'internimage_t'  # any timm-registered name (pretrain.models.create_backbone)
    num_classes: int = 1000
    drop_path_rate: float | None = None  # None: the model's own default
    grad_checkpointing: bool = False
    grad_checkpointing_every: int = 1
    init_from: str | None = None  # initial weights, a weights file (official / timm / exported layout); not a resume
    init_from_ema: bool = False  # take the EMA weights of init_from when the file has them
    head_index: str | None = None  # class-index file (one index per line): slice the checkpoint's head (22k -> 1k)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments (channels, depths, core_op ...)


@dataclass
class SourceConfig:
    name: str = 'train'
    urls: str = ''  # brace pattern, ``::``-joined patterns, local or pipe:
    weight: float | None = None  # resampled mode mixture weight; None = by size
    manifest: str | None = None


@dataclass
class RemoteConfig:
    """Reading http(s):// and pipe: shards (data_pipelines.tario.RemoteOptions; docs/DATA.md "Remote shards")."""
    timeout_s: float = RemoteOptions.timeout_s  # longest wait for a connection or the next bytes
    retries: int = RemoteOptions.retries  # http(s) reconnections in a row without a new byte, then the shard is skipped
    backoff_s: float = RemoteOptions.backoff_s  # wait before the first retry, doubled at each next one (at most 60 s)

    def options(self) -> RemoteOptions:
        return RemoteOptions(timeout_s=self.timeout_s, retries=self.retries, backoff_s=self.backoff_s)


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    val: list[SourceConfig] = field(default_factory=list)
    mode: Literal['epoch', 'resampled'] = 'epoch'
    samples_per_epoch: int | None = None  # resampled mode: delivered samples per pass over all ranks
    img_size: int = 224
    num_workers: int = 4
    interleave_shards: int = 4
    seed: int = 0
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    # train transform (timm semantics)
    scale_min: float = 0.08
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (timm's --ratio)
    hflip: float = 0.5
    color_jitter: float | None = 0.4
    auto_augment: str | None = 'rand-m9-mstd0.5-inc1'
    re_prob: float = 0.25
    interpolation: str = 'bicubic'
    # eval transform
    eval_crop_pct: float = 0.875
    eval_micro_batch_size: int | None = None  # None: the training micro batch


@dataclass
class LossConfig:
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5


@dataclass
class OptimConfig:
    lr_base: float = 5e-4  # peak lr for lr_base_batch_size images
    lr_base_batch_size: int = 512
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float = 1.0  # 1.0 = off; else lr * layer_decay ** (depth from the head) via group_matcher
    dcn_lr_mul: float = 1.0  # lr multiplier for DCN offset / attention-weight projections (official DCN_LR_MUL)
    no_weight_decay: list[str] = field(default_factory=list)  # extra parameter names without weight decay


@dataclass
class ScheduleConfig:
    epochs: float | None = None  # exactly one of epochs / total_steps
    total_steps: int | None = None
    steps_per_epoch: int | None = None  # None: from the data (epoch mode) or samples_per_epoch (resampled)
    warmup_steps: int | None = None  # exactly one of warmup_steps / warmup_epochs (or neither: no warmup)
    warmup_epochs: float | None = None
    lr_warmup_init: float = 0.0  # absolute lr at step 0 (scaled like lr_base)
    lr_min: float = 0.0  # absolute lr at the end (scaled like lr_base)
    lr_scale_by_batch: bool = True


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    precision: Literal['bf16', 'fp16', 'fp32'] = 'bf16'
    micro_batch_size: int = 32  # per rank, per micro-step
    grad_accum_steps: int = 1
    grad_clip: float = 5.0  # 0 = off
    offload_optimizer: Literal['none', 'cpu', 'nvme'] = 'none'
    offload_param: Literal['none', 'cpu', 'nvme'] = 'none'
    nvme_path: str | None = None
    fp16_initial_scale_power: int = 16
    torch_adam: bool = True  # torch.optim.AdamW inside DeepSpeed (no fused-op build); offload uses DeepSpeedCPUAdam
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    bucket_size: int = 500_000_000
    stage3_param_persistence_threshold: int = 100_000
    # ZeRO-3: one parameter fetch/release per block call instead of per submodule (pretrain/engine/zero_leaf.py)
    stage3_leaf_blocks: bool = True
    zero_init: bool = False  # ZeRO-3: build the model partitioned (deepspeed.zero.Init; pretrain/engine/zero_init.py)
    # bf16 on a CPU: linear/conv/matmul in fp32, result rounded to bf16 ('auto': when the CPU lacks AVX512-BF16/AMX;
    # pretrain/engine/cpu_bf16.py). GPUs are never affected.
    cpu_bf16_products: Literal['auto', 'fp32', 'native'] = 'auto'
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed JSON (expert escape hatch)


@dataclass
class SupervisedConfig:
    weight: float | None = None  # cross-entropy on samples with a .cls label (smoothing: loss.label_smoothing)


@dataclass
class ContrastiveConfig:
    """Image-text InfoNCE against an open_clip text tower trained jointly (M3I's text target)."""
    weight: float | None = None
    embed_dim: int = 768  # joint space; InternImage-H/G's attention-pooling head gives 768-d already
    text_width: int = 768  # the text tower: 12 x 768 (BERT-Base size, as M3I) by default
    text_layers: int = 12
    text_heads: int = 12
    context_length: int = 77
    tokenizer: str = 'ViT-B-32'  # open_clip tokenizer name (its vocabulary sets the embedding table)
    init_temperature: float = 0.07  # logit scale starts at 1 / init_temperature, learnable
    max_logit_scale: float = 100.0
    local_loss: bool = False  # each rank: its rows against all columns (less memory, same gradient)
    gather_with_grad: bool = True  # negatives from every rank, with gradient


@dataclass
class MIMConfig:
    """Masked image modelling with a teacher: an EMA of the student predicts targets for masked cells."""
    weight: float | None = None
    mask_ratio: float = 0.6  # of the cells of the mask grid
    mask_patch: int = 32  # the mask grid's cell size in pixels (the stride of the last stage)
    decoder_dim: int = 512
    decoder_depth: int = 1  # ConvNeXt V2 blocks in the prediction decoder
    teacher_decay: float = 0.996  # teacher EMA decay at step 0, cosine to teacher_decay_end (BYOL / SiameseIM)
    teacher_decay_end: float = 1.0


@dataclass
class FCMAEConfig:
    """ConvNeXt V2's masked autoencoder: a decoder predicts the (per-patch normalised) pixels of the masked patches.
    MIM and FCMAE share one mask per micro-batch: when both are on, their mask_ratio and mask_patch must be equal
    (:meth:`ObjectiveConfig.mask_settings`)."""
    weight: float | None = None
    mask_ratio: float = 0.6  # of the cells of the mask grid (FCMAE: 0.6)
    mask_patch: int = 32  # the mask grid's cell size in pixels (FCMAE: 32, the stride of the last stage)
    decoder_dim: int = 512
    decoder_depth: int = 1  # ConvNeXt V2 blocks in the pixel decoder
    norm_pix_loss: bool = True  # regress each patch's pixels normalised by its own mean and variance


@dataclass
class ZeroShotConfig:
    """Zero-shot classification of the val sources with the text tower (needs contrastive.weight > 0)."""
    enabled: bool = True
    classnames: str | None = None  # file, one class name per line in label order, or 'open_clip:imagenet1k'
    templates: Literal['simple', 'openai'] = 'simple'  # open_clip's SIMPLE_/OPENAI_IMAGENET_TEMPLATES
    classes_per_batch: int = 50


@dataclass
class ObjectiveConfig:
    """``supervised``: classification (Mixup/CutMix, label smoothing: the fine-tuning stages). ``multi`` (alias
    ``m3i``): the weighted sum of the parts below whose weight is > 0 (M3I-style pretraining, or FCMAE alone); each
    runs on the samples that carry its target. A ``multi`` stage states every part's weight (0 leaves it out)."""
    kind: Literal['supervised', 'multi'] = 'supervised'
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    mim: MIMConfig = field(default_factory=MIMConfig)
    fcmae: FCMAEConfig = field(default_factory=FCMAEConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)

    def mask_settings(self) -> tuple[float, int] | None:
        """``(mask_ratio, mask_patch)`` of the one mask per micro-batch that the masked objectives (mim, fcmae)
        share -- validated equal when both are on -- or None when neither is on."""
        for m in (self.mim, self.fcmae):
            if (m.weight or 0.0) > 0:
                return m.mask_ratio, m.mask_patch
        return None

    def weights(self) -> dict[str, float]:
        """``{part: weight}`` for the parts of a ``multi`` stage (validation makes each explicit there; a part left
        unset counts 0)."""
        return {name: getattr(self, name).weight or 0.0 for name in OBJECTIVE_PARTS}


@dataclass
class SparsityConfig:
    """The ``sparsity`` section (SLaK's hyper-parameters as defaults)."""

    enabled: bool = False
    sparsity: float = 0.4  # fraction of the masked weights held at zero
    init: str = 'erk'  # per-layer densities: 'erk' (Erdos-Renyi-kernel), 'uniform' or 'snip' (SLaK's, one batch)
    include: str = ''  # regex on parameter names to mask; '' = every 2-D and 4-D weight (SLaK's default)
    update_interval_steps: int = 100  # prune and grow every this many optimizer steps (SLaK -u; T used 2000)
    prune_rate: float = 0.3  # fraction of each layer's active weights replaced at the first update (SLaK T: 0.5)
    prune_rate_min: float = 0.005  # where the cosine decay of the prune rate ends, at the last step
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f'sparsity.sparsity must be in (0, 1), got {self.sparsity}')
        if self.init not in ('erk', 'uniform', 'snip'):
            raise ValueError(f"sparsity.init must be 'erk', 'uniform' or 'snip', got {self.init!r}")
        if self.update_interval_steps < 1:
            raise ValueError(f'sparsity.update_interval_steps must be >= 1, got {self.update_interval_steps}')
        if not 0.0 <= self.prune_rate_min <= self.prune_rate < 1.0:
            raise ValueError(f'need 0 <= prune_rate_min ({self.prune_rate_min}) <= prune_rate ({self.prune_rate}) < 1')


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False  # timm-style decay ramp min(decay, (1 + n) / (10 + n))
    every_steps: int = 1


@dataclass
class CheckpointConfig:
    interval_steps: int = 1000
    keep_last: int = 3
    resume: str = 'auto'  # 'auto' (newest complete in <output_dir>/checkpoints), 'none', or a step folder
    on_world_size_change: Literal['universal', 'weights_only', 'error'] = 'universal'
    save_at_end: bool = True


@dataclass
class LoggingConfig:
    interval_steps: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    output_dir: str = 'runs/default'
    seed: int = 0
    max_nonfinite_in_a_row: int = 5
    eval_interval_steps: int = 0  # 0 = only at the end
    stop_after_steps: int | None = None  # leave after this many steps in this process, with a checkpoint (time limits)
    deterministic: bool = False
    collective_timeout_min: float = 10.0  # a collective (data all-reduce, save barrier) waiting longer fails the rank
    # No micro-batch / eval batch for this long: dump stacks, exit 75 (requeue); 0 = off. Below the collective
    # timeout, so that the stuck rank dumps its own stacks before the others give up (docs/ENGINE.md).
    watchdog_min: float = 8.0
    # torch.compile the model (inductor; DCNv3 stays one custom op in the graph); docs/ENGINE.md "Compile"
    compile: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def global_batch_size(self, world_size: int) -> int:
        """Images per optimizer step over all ranks."""
        return self.deepspeed.micro_batch_size * self.deepspeed.grad_accum_steps * world_size


# ------------------------------------------------------------------------------------------------------------------
# typed conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, '__name__', None) or str(tp).replace('typing.', '')


_YAML11_FLOAT = re.compile(r'^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$')


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """``value`` as type ``tp`` or ConfigError; ints and 1e-3 style strings pass as floats, nothing else is coerced."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f'{where}: {key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})')
    if origin is Literal:
        if value not in args:
            raise ConfigError(f'{where}: {key}: must be one of {list(args)}, got {value!r}')
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f'{where}: {key}: expected a list, got {value!r}')
        return [_convert(v, args[0], f'{key}[{i}]', where) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f'{where}: {key}: expected a list of {len(args)} values, got {value!r}')
        return tuple(_convert(v, a, f'{key}[{i}]', where) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f'{where}: {key}: expected a mapping, got {value!r}')
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'{where}: {key}: expected true/false, got {value!r}')
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{where}: {key}: expected an integer, got {value!r}')
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-3 without a dot as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{where}: {key}: expected a number, got {value!r}')
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f'{where}: {key}: expected a string, got {value!r}')
        return value
    raise TypeError(f'unsupported schema type {tp!r} at {key}')


def build_dataclass(cls: type, data: Any, prefix: str = '', where: str = '<config>', skip: tuple[str, ...] = ()):
    """``data`` (a mapping from YAML) as the dataclass ``cls``, converting and checking every field's type; fields in
    ``skip`` are refused as unknown. Raises ConfigError naming ``where`` (the file) and the dotted key. Every typed
    config of the project (this schema, launch's) is read through here."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f'{where}: {prefix or "<top>"}: expected a mapping, got {data!r}')
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    unknown = sorted(set(data) - names)
    if unknown:
        key = f'{prefix}.{unknown[0]}' if prefix else unknown[0]
        raise ConfigError(f'{where}: {key}: unknown key (known in {prefix or "<top>"}: {sorted(names)})')
    kwargs = {name: _convert(value, hints[name], f'{prefix}.{name}' if prefix else name, where)
              for name, value in data.items()}
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict:
    """The config as plain YAML/JSON-able dicts (tuples become lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


# ------------------------------------------------------------------------------------------------------------------
# overrides


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``['a.b=3', 'c=[1, 2]']`` -> ``[('a.b', 3), ('c', [1, 2])]``; values are parsed as YAML scalars/flow lists."""
    out = []
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f'command line: {item!r}: expected key.sub=value')
        key, text = item.split('=', 1)
        key = key.strip()
        if not key:
            raise ConfigError(f'command line: {item!r}: empty key')
        try:
            value = yaml.safe_load(text) if text.strip() else ''
        except yaml.YAMLError as e:
            raise ConfigError(f'command line: {key}: cannot parse value {text!r}: {e}') from e
        out.append((key, value))
    return out


def _apply_override(raw: dict, key: str, value: Any) -> None:
    # Walk the schema alongside the raw dict so an unknown key fails here with its full name.
    cls: Any = TrainConfig
    node = raw
    parts = key.split('.')
    for i, part in enumerate(parts):
        here = '.'.join(parts[:i + 1])
        if cls is dict:  # free-form mapping (model.kwargs, deepspeed.extra): any sub-key
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f'command line: {key}: {".".join(parts[:i])} is not a section')
        fields_ = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields_:
            raise ConfigError(f'command line: {here}: unknown key (known: {sorted(fields_)})')
        if i == len(parts) - 1:
            node[part] = value
            return
        tp = typing.get_type_hints(cls)[part]
        cls = dict if typing.get_origin(tp) is dict else tp
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f'command line: {here}: not a mapping in the file')
        node = nxt


# ------------------------------------------------------------------------------------------------------------------
# loading and cross-field checks


def _renamed(key: str, value: Any, where: str) -> tuple[str, Any]:
    """``(key, value)`` under their current names (:data:`RENAMED_KEYS` with a warning, :data:`VALUE_ALIASES`)."""
    if key in RENAMED_KEYS:
        warnings.warn(f'{where}: {key} is deprecated, use {RENAMED_KEYS[key]}', FutureWarning, stacklevel=3)
        key = RENAMED_KEYS[key]
    aliases = VALUE_ALIASES.get(key, {})
    if isinstance(value, str) and value in aliases:
        value = aliases[value]
    return key, value


def migrate(raw: dict, where: str = '<dict>') -> dict:
    """A copy of the nested ``raw`` config with old key names and value aliases under their current names; a key
    given under both names is a ConfigError naming the file."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for dotted in {*RENAMED_KEYS, *VALUE_ALIASES}:
        section, name = dotted.split('.')
        node = out.get(section)
        if not isinstance(node, dict) or name not in node:
            continue
        key, value = _renamed(dotted, node.pop(name), where)
        new_name = key.split('.')[1]
        if new_name in node:
            raise ConfigError(f'{where}: {dotted}: given together with {key}, its new name; keep one')
        node[new_name] = value
    return out


def config_from_dict(raw: dict, where: str = '<dict>') -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from nested dicts (``where`` names the source in errors)."""
    cfg = build_dataclass(TrainConfig, migrate(raw, where), '', where)
    validate(cfg, where)
    return cfg


def read_yaml(path: str | Path) -> dict:
    """The mapping at the top of a YAML file; ConfigError naming the file when it cannot be read or is no mapping."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f'{path}: cannot read: {e}') from e
    except yaml.YAMLError as e:
        raise ConfigError(f'{path}: not valid YAML: {e}') from e
    if not isinstance(raw, dict):
        raise ConfigError(f'{path}: the top level must be a mapping')
    return raw


def load_config_or_report(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig | None:
    """For command lines: the config, or None after printing the error (the caller exits with status 2)."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        print(f'config error: {e}', file=sys.stderr)
        return None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML file (or start from defaults when ``path`` is None), apply ``key.sub=value`` overrides, validate."""
    where = str(path) if path is not None else 'defaults'
    raw: dict = migrate(read_yaml(path), where) if path is not None else {}
    # Type errors in the file are reported against the file before overrides can mask them.
    build_dataclass(TrainConfig, raw, '', where)
    pairs = [_renamed(key, value, 'command line') for key, value in parse_overrides(list(overrides or []))]
    for key, value in pairs:
        _apply_override(raw, key, value)
    if pairs:
        where = f'{where} + command line'
        cfg = build_dataclass(TrainConfig, raw, '', 'command line')
    else:
        cfg = build_dataclass(TrainConfig, raw, '', where)
    validate(cfg, where)
    return cfg


def validate(cfg: TrainConfig, where: str = '<config>') -> None:
    """Cross-field checks; raises ConfigError naming ``where`` and the key."""
    def fail(key: str, msg: str):
        raise ConfigError(f'{where}: {key}: {msg}')

    ds, sch, opt, data, loss, ck = cfg.deepspeed, cfg.schedule, cfg.optim, cfg.data, cfg.loss, cfg.checkpoint
    if ds.zero_stage not in (0, 1, 2, 3):
        fail('deepspeed.zero_stage', f'must be 0, 1, 2 or 3, got {ds.zero_stage}')
    if ds.micro_batch_size < 1:
        fail('deepspeed.micro_batch_size', f'must be >= 1, got {ds.micro_batch_size}')
    if ds.grad_accum_steps < 1:
        fail('deepspeed.grad_accum_steps', f'must be >= 1, got {ds.grad_accum_steps}')
    if ds.grad_clip < 0:
        fail('deepspeed.grad_clip', f'must be >= 0 (0 = off), got {ds.grad_clip}')
    if ds.zero_init and ds.zero_stage != 3:
        fail('deepspeed.zero_init', f'building the model partitioned needs zero_stage 3, got stage {ds.zero_stage}')
    if ds.offload_param != 'none' and ds.zero_stage != 3:
        fail('deepspeed.offload_param', f'parameter offload needs zero_stage 3, got stage {ds.zero_stage}')
    if ds.offload_optimizer != 'none' and ds.zero_stage == 0:
        fail('deepspeed.offload_optimizer', 'optimizer offload needs zero_stage >= 1')
    if 'nvme' in (ds.offload_param, ds.offload_optimizer) and not ds.nvme_path:
        fail('deepspeed.nvme_path', 'NVMe offload needs nvme_path')
    for key in ('train_batch_size', 'train_micro_batch_size_per_gpu', 'gradient_accumulation_steps', 'optimizer',
                'scheduler', 'bf16', 'fp16'):
        if key in ds.extra:
            fail(f'deepspeed.extra.{key}', 'set through the typed deepspeed.* keys, not extra')
    if cfg.model.grad_checkpointing_every < 1:
        fail('model.grad_checkpointing_every', 'must be >= 1')
    if cfg.model.drop_path_rate is not None and not 0 <= cfg.model.drop_path_rate < 1:
        fail('model.drop_path_rate', f'must be in [0, 1), got {cfg.model.drop_path_rate}')
    if cfg.model.num_classes < 1:
        fail('model.num_classes', 'must be >= 1')

    if not data.train:
        fail('data.train', 'needs at least one source')
    for part in ('train', 'val'):
        for i, src in enumerate(getattr(data, part)):
            if not src.urls:
                fail(f'data.{part}[{i}].urls', 'is empty')
    if data.mode == 'resampled' and data.samples_per_epoch is None and sch.total_steps is None \
            and sch.steps_per_epoch is None:
        fail('data.samples_per_epoch', 'resampled mode is infinite: set it, or schedule.total_steps / steps_per_epoch')
    if data.img_size < 16 or data.img_size % 16:
        fail('data.img_size', f'must be a positive multiple of 16 (the stages downsample), got {data.img_size}')
    if data.num_workers < 0:
        fail('data.num_workers', 'must be >= 0')
    if data.remote.timeout_s <= 0:
        fail('data.remote.timeout_s', f'must be > 0 (a read with no timeout can hang), got {data.remote.timeout_s}')
    if data.remote.retries < 0 or data.remote.backoff_s < 0:
        fail('data.remote', f'retries and backoff_s must be >= 0, got {data.remote.retries}, {data.remote.backoff_s}')
    if not 0 < data.scale_min <= 1:
        fail('data.scale_min', f'must be in (0, 1], got {data.scale_min}')
    if not 0 < data.ratio[0] <= data.ratio[1] < float('inf'):
        fail('data.ratio', f'must be (low, high) with 0 < low <= high, both finite, got {list(data.ratio)}')

    _validate_objective(cfg, fail)

    if not 0 <= loss.label_smoothing < 1:
        fail('loss.label_smoothing', f'must be in [0, 1), got {loss.label_smoothing}')
    if loss.mixup_alpha < 0 or loss.cutmix_alpha < 0:
        fail('loss.mixup_alpha', 'mixup_alpha and cutmix_alpha must be >= 0')
    if (loss.mixup_alpha > 0 or loss.cutmix_alpha > 0) and ds.micro_batch_size % 2:
        fail('deepspeed.micro_batch_size', f'Mixup/CutMix (batch mode) needs an even micro batch, got '
             f'{ds.micro_batch_size}')

    if opt.lr_base <= 0:
        fail('optim.lr_base', f'must be > 0, got {opt.lr_base}')
    if opt.lr_base_batch_size < 1:
        fail('optim.lr_base_batch_size', 'must be >= 1')
    if not 0 < opt.layer_decay <= 1:
        fail('optim.layer_decay', f'must be in (0, 1] (1 = off), got {opt.layer_decay}')
    if opt.dcn_lr_mul <= 0:
        fail('optim.dcn_lr_mul', f'must be > 0, got {opt.dcn_lr_mul}')
    if opt.weight_decay < 0:
        fail('optim.weight_decay', 'must be >= 0')
    if not all(0 <= b < 1 for b in opt.betas):
        fail('optim.betas', f'each must be in [0, 1), got {list(opt.betas)}')

    if (sch.epochs is None) == (sch.total_steps is None):
        fail('schedule.epochs', 'set exactly one of schedule.epochs and schedule.total_steps')
    if sch.total_steps is not None and sch.total_steps < 1:
        fail('schedule.total_steps', 'must be >= 1')
    if sch.epochs is not None and sch.epochs <= 0:
        fail('schedule.epochs', 'must be > 0')
    if sch.warmup_steps is not None and sch.warmup_epochs is not None:
        fail('schedule.warmup_steps', 'set at most one of warmup_steps and warmup_epochs')
    if sch.warmup_steps is not None and sch.warmup_steps < 0:
        fail('schedule.warmup_steps', 'must be >= 0')
    if sch.total_steps is not None and sch.warmup_steps is not None and sch.warmup_steps >= sch.total_steps:
        fail('schedule.warmup_steps', f'{sch.warmup_steps} warmup steps leave nothing of {sch.total_steps} total steps')
    if sch.epochs is not None and sch.warmup_epochs is not None and sch.warmup_epochs >= sch.epochs:
        fail('schedule.warmup_epochs', f'{sch.warmup_epochs} warmup epochs leave nothing of {sch.epochs} epochs')
    if sch.lr_min < 0 or sch.lr_warmup_init < 0:
        fail('schedule.lr_min', 'lr_min and lr_warmup_init must be >= 0')
    if sch.lr_min > opt.lr_base:
        fail('schedule.lr_min', f'{sch.lr_min} is above optim.lr_base {opt.lr_base}')

    if cfg.ema.enabled and not 0 < cfg.ema.decay < 1:
        fail('ema.decay', f'must be in (0, 1), got {cfg.ema.decay}')
    if cfg.sparsity.enabled:
        try:
            cfg.sparsity.validate()
        except ValueError as e:
            raise ConfigError(f'{where}: {e}') from None
        if cfg.sparsity.init == 'snip' and cfg.objective.kind != 'supervised':
            fail('sparsity.init', "'snip' scores weights by the classification loss of one batch; it needs "
                 f'objective.kind=supervised, got {cfg.objective.kind!r} (use erk or uniform)')
    if cfg.ema.every_steps < 1:
        fail('ema.every_steps', 'must be >= 1')
    if ck.interval_steps < 1:
        fail('checkpoint.interval_steps', 'must be >= 1')
    if ck.keep_last < 1:
        fail('checkpoint.keep_last', 'must be >= 1 (older complete checkpoints are removed only after a newer one '
             'is committed)')
    if cfg.logging.interval_steps < 1:
        fail('logging.interval_steps', 'must be >= 1')
    if cfg.run.max_nonfinite_in_a_row < 1:
        fail('run.max_nonfinite_in_a_row', 'must be >= 1')
    if cfg.run.stop_after_steps is not None and cfg.run.stop_after_steps < 1:
        fail('run.stop_after_steps', 'must be >= 1')
    if cfg.run.eval_interval_steps < 0:
        fail('run.eval_interval_steps', 'must be >= 0')
    if cfg.run.collective_timeout_min <= 0:
        fail('run.collective_timeout_min', 'must be > 0 (minutes)')
    if cfg.run.watchdog_min < 0:
        fail('run.watchdog_min', 'must be >= 0 (minutes; 0 turns the watchdog off)')
    if 0 < cfg.run.collective_timeout_min <= cfg.run.watchdog_min:
        fail('run.watchdog_min', f'must be below run.collective_timeout_min ({cfg.run.collective_timeout_min:g}): '
             'the stuck rank dumps its stacks before the others time out (or 0 to turn the watchdog off)')


def _validate_objective(cfg: TrainConfig, fail) -> None:
    ob = cfg.objective
    given = {name: getattr(ob, name).weight for name in OBJECTIVE_PARTS}
    if ob.kind == 'supervised':
        for name, w in given.items():
            if name != 'supervised' and w:
                fail(f'objective.{name}.weight', f'{w} under objective.kind=supervised, which trains the classifier '
                     'alone; the weighted parts belong to objective.kind=multi')
        return
    for name, w in given.items():
        if w is None:
            fail(f'objective.{name}.weight', 'objective.kind=multi needs every part\'s weight stated (0 leaves the '
                 f'part out): {", ".join(OBJECTIVE_PARTS)}')
        if w < 0:
            fail(f'objective.{name}.weight', f'must be >= 0, got {w}')
    weights = ob.weights()
    if not any(w > 0 for w in weights.values()):
        fail('objective', f'multi needs at least one part with weight > 0 ({", ".join(OBJECTIVE_PARTS)})')
    if cfg.loss.mixup_alpha > 0 or cfg.loss.cutmix_alpha > 0:
        fail('loss.mixup_alpha', 'Mixup/CutMix belong to objective.kind=supervised; set them to 0 for multi')
    c = ob.contrastive
    if c.weight > 0:
        if c.embed_dim < 1 or c.text_layers < 1 or c.text_heads < 1 or c.context_length < 2:
            fail('objective.contrastive', 'embed_dim, text_layers, text_heads must be >= 1, context_length >= 2')
        if c.text_width % c.text_heads:
            fail('objective.contrastive.text_width', f'{c.text_width} is not divisible by text_heads {c.text_heads}')
        if not 0 < c.init_temperature < 1 or c.max_logit_scale <= 1:
            fail('objective.contrastive.init_temperature', 'must be in (0, 1), and max_logit_scale > 1')
    for name in ('mim', 'fcmae'):  # the masked objectives
        m = getattr(ob, name)
        if m.weight <= 0:
            continue
        if not 0 < m.mask_ratio < 1:
            fail(f'objective.{name}.mask_ratio', f'must be in (0, 1), got {m.mask_ratio}')
        if m.mask_patch < 16 or m.mask_patch & (m.mask_patch - 1):
            fail(f'objective.{name}.mask_patch', f'must be a power of two >= 16, got {m.mask_patch}')
        if cfg.data.img_size % m.mask_patch:
            fail(f'objective.{name}.mask_patch',
                 f'data.img_size {cfg.data.img_size} is not a multiple of {m.mask_patch}')
        if m.decoder_dim < 1 or m.decoder_depth < 0:
            fail(f'objective.{name}.decoder_dim', 'decoder_dim must be >= 1 and decoder_depth >= 0')
    if ob.mim.weight > 0 and not 0 < ob.mim.teacher_decay <= ob.mim.teacher_decay_end <= 1:
        fail('objective.mim.teacher_decay', 'need 0 < teacher_decay <= teacher_decay_end <= 1')
    if ob.mim.weight > 0 and ob.fcmae.weight > 0:  # one mask per micro-batch for both
        for key in ('mask_ratio', 'mask_patch'):
            if getattr(ob.mim, key) != getattr(ob.fcmae, key):
                fail(f'objective.fcmae.{key}', f'{getattr(ob.fcmae, key)} differs from objective.mim.{key} '
                     f'{getattr(ob.mim, key)}: MIM and FCMAE share one mask per micro-batch')
    z = ob.zero_shot
    if z.enabled and z.classnames is not None:
        if c.weight <= 0:
            fail('objective.zero_shot.classnames', 'zero-shot evaluation needs the text tower (contrastive.weight > 0)')
        if z.classnames != OPEN_CLIP_IMAGENET and not Path(z.classnames).is_file():
            fail('objective.zero_shot.classnames', f'{z.classnames} does not exist (a file with one class name per '
                 f'line, or {OPEN_CLIP_IMAGENET!r} for open_clip\'s ImageNet-1K names)')
    if z.classes_per_batch < 1:
        fail('objective.zero_shot.classes_per_batch', 'must be >= 1')
