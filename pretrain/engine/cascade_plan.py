"""``python -m pretrain plan --cascade CASCADE.yaml --gpus N``: a whole cascade planned at full scale, before renting.

Per stage: samples, optimizer steps and wall time; GPU-hours; checkpoint size and the time to save it; data-loader
cores per GPU; the expected loss to preemption at the configured checkpoint interval; and the stage's memory fit
(:func:`pretrain.engine.plan.plan`). Every number is either measured, read from a config, or a named assumption,
and the output says which.

Throughput. One stage (the first, or ``--calibrate-stage``) gets its images/s per GPU from a measurement:

- ``--calibration gpu-report.json`` (``make gpu-check``): the best ``images_per_s`` of ``parts.h1gpu.rows`` for the
  stage's model, preferring rows of its objective and image size (rows with an ``error`` key are failures);
- ``--img-per-s X`` overrides it;
- with neither, an assumption: InternImage-B's 407 images/s on one H100 (``benchmarks/gpu_train.py``,
  docs/PERFORMANCE.md, 2026-11-26), i.e. the same model FLOP utilisation at the stage's counted FLOPs.

Every other stage derives its images/s from that figure by counted training FLOPs per image (the same FLOP
utilisation in every stage, an assumption: larger images usually use a GPU better). Training FLOPs per image are
counted by ``torch.utils.flop_counter`` on the meta device (convolutions and matrix products, plus the DCNv3 core at
5 multiply-adds per channel and sampling point, as the official ``get_flops.py`` counts it), forward only: training
is 3x the trained modules' forward (backward = 2x forward), plus the forward of the checkpointed blocks again under
activation checkpointing, plus the M3I teacher's forward. (``FlopCounterMode`` counts the weight gradient of grouped
and depthwise convolutions as if they were dense, so its backward is not used.)

A step is ``micro_batch x grad_accum / images_per_s`` of compute plus the data-parallel traffic it exposes:
ZeRO-3 moves ``(gathers + 1) x W`` bytes per rank and micro-step (``W``: the parameters in the compute dtype; three
all-gathers with activation checkpointing -- forward, recompute, backward -- two without, and one reduce-scatter),
ZeRO-2 ``W`` per micro-step plus ``W`` per step (the updated parameters' all-gather), ZeRO 0/1 ``2 W`` per step (a
ring all-reduce), each times ``(N - 1) / N``, at ``--net-gb-per-s`` per GPU; ``--comm-overlap`` is the fraction
hidden behind compute (default 0: the wall time is an upper bound).

Checkpoints (docs/ENGINE.md, "Checkpoints"): DeepSpeed's save is 2 bytes per trained parameter in bf16/fp16 (4 in
fp32) plus 12 for the fp32 master copy and Adam's two moments; the EMA adds 4 per parameter of the trained module,
the M3I teacher 4 per backbone parameter. Saves are synchronous: every ``checkpoint.interval_steps`` and at the end.

Preemption. Unexpected interruptions arrive at one per ``--gpu-hours-per-failure`` GPU-hours; each loses half a
checkpoint interval of steps on average, plus a restart. Time limits (``resources.timeout_min``) requeue the stage
with a save at the signal, so each costs a save and a restart. The plan warns when the expected requeues exceed
``resources.max_requeues``, and gives the checkpoint interval of Young's rule (``sqrt(2 x save x MTBF)``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

__all__ = ['PlanError', 'Reference', 'train_flops_per_image', 'read_calibration', 'stage_samples_per_epoch',
           'plan_cascade', 'format_plan', 'main']

GiB = 2 ** 30
# Source names whose training-set size is public, for epoch-mode stages whose shards are not readable here.
KNOWN_TRAIN_SAMPLES = {'imagenet1k': (1_281_167, 'ImageNet-1K (ILSVRC-2012) train')}
# docs/PERFORMANCE.md "Data decoding": our decode + RandomResizedCrop(224) path on the real CC12M photos, per core.
LOADER_IMG_PER_CORE = 429.9
LOADER_SOURCE = 'benchmarks/data.py, real CC12M photos, 224 px crops, 2026-11-22 (docs/PERFORMANCE.md)'
# Llama 3 405B (Dubey et al. 2024, section 3.3.4): 419 unexpected interruptions in 54 days on up to 16,384 H100s.
GPU_HOURS_PER_FAILURE = 54 * 24 * 16384 / 419
FAILURE_SOURCE = 'Llama 3 405B: 419 unexpected interruptions in 54 days on up to 16,384 H100s (Dubey et al. 2024)'
NET_GB_PER_S = 50.0  # 400 Gb/s per GPU, as on Llama 3's and most H100 clusters (one NIC per GPU)
FS_GB_PER_S = 10.0
RESTART_MIN = 10.0
# docs/PERFORMANCE.md "Training throughput on one GPU": the default reference when nothing was measured for the stage.
DEFAULT_REFERENCE = dict(model='internimage_b', objective='supervised', img_size=224, batch=64, images_per_s=407.0,
                         grad_checkpointing=False, gpu='NVIDIA H100 80GB HBM3',
                         source='benchmarks/gpu_train.py on one H100, bf16, plain PyTorch (no ZeRO), 2026-11-26 '
                                '(docs/PERFORMANCE.md)')


class PlanError(ValueError):
    """Input that the plan cannot use; the message names the file, key or option."""


@dataclasses.dataclass
class Reference:
    """A measured (or given) throughput and what it was measured on."""
    images_per_s: float
    model: str
    objective: str  # 'supervised' or 'multi'
    img_size: int
    grad_checkpointing: bool
    batch: int | None
    source: str
    kind: str  # 'measured' (a gpu-report row), 'given' (--img-per-s), 'assumed' (nothing measured)
    peak_mem_gib: float | None = None
    gpu: str | None = None


# ------------------------------------------------------------------------------------------------------------------
# FLOPs


def _dcnv3_forward_flops(input_shape, offset_shape, mask_shape, kernel_h, kernel_w, *rest, out_shape=None, **_):
    remove_center = bool(rest[-1]) if rest else False
    n, ho, wo, c = out_shape
    points = kernel_h * kernel_w - int(remove_center)
    return 2 * 5 * n * ho * wo * points * c  # 4 bilinear weights + the mask: 5 multiply-adds


def _register_dcnv3_flops() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    import pretrain.ops.function  # noqa: F401  (defines torch.ops.pretrain.dcnv3_forward)

    op = torch.ops.pretrain.dcnv3_forward
    if op not in flop_registry:
        register_flop_formula(op)(_dcnv3_forward_flops)


def _op_backend(backend, device):
    # On the meta device dcnv3_core would take the PyTorch reference (grid_sample, which no formula counts); its
    # operator has a fake kernel that runs on meta, and the formula above counts it.
    return 'cpu'


def _logits_only(image, text, valid, logit_scale, **_):
    # contrastive_loss branches on the data (no valid pair); on the meta device only its logits product is counted.
    return (logit_scale * image.float() @ text.float().T).sum()


def train_flops_per_image(cfg, model: torch.nn.Module | None = None) -> dict:
    """Counted FLOPs of one training image of ``cfg`` (a TrainConfig): ``{'forward', 'recompute', 'teacher',
    'train'}``, with ``train = 3 x forward + recompute + teacher`` (see the module docstring). ``model``: the module
    ``build_model(cfg)`` gives, on the meta device (built here when None: no weights, seconds even for H)."""
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    import pretrain.objectives.m3i as m3i
    import pretrain.ops.function as dcn
    from pretrain.models import checkpointable_blocks
    from pretrain.objectives import build_model

    _register_dcnv3_flops()
    if model is None:
        with torch.device('meta'):
            model = build_model(cfg)
    model.train()
    n, size = 2, cfg.data.img_size  # 2: BatchNorm refuses one value per channel
    x = torch.empty(n, 3, size, size, device='meta')
    recompute = [0]
    counter = FlopCounterMode(display=False)
    handles = []
    if cfg.model.grad_checkpointing:
        root = model.backbone if hasattr(model, 'backbone') else model
        start: list[int] = [0]

        def pre(_m, _a):
            start[0] = counter.get_total_flops()

        def post(_m, _a, _o):
            recompute[0] += counter.get_total_flops() - start[0]

        for blk in checkpointable_blocks(root):
            handles += [blk.register_forward_pre_hook(pre), blk.register_forward_hook(post)]
    teacher, kwargs = 0, {}
    try:
        with mock.patch.object(dcn, 'resolved_backend', _op_backend), \
                mock.patch.object(m3i, 'contrastive_loss', _logits_only):
            if cfg.objective.kind != 'supervised':
                ob = cfg.objective
                w = ob.weights()
                kwargs['counts'] = torch.tensor([float(n), 0.0])
                settings = ob.mask_settings()
                if settings is not None:
                    kwargs['mask'] = torch.zeros(n, size // settings[1], size // settings[1], device='meta')
                if w['mim'] > 0:
                    with torch.no_grad(), FlopCounterMode(display=False) as tc:
                        kwargs['teacher_features'] = model.backbone.forward_features(x)
                    teacher = tc.get_total_flops()
                if w['contrastive'] > 0:
                    kwargs['text'] = torch.zeros(n, ob.contrastive.context_length, dtype=torch.long, device='meta')
                    kwargs['text_valid'] = torch.ones(n, dtype=torch.bool, device='meta')
            with counter:  # one block: entering a FlopCounterMode again clears it
                model(x, **kwargs)
                if kwargs and ob.weights()['supervised'] > 0 and model.has_classifier:
                    # the supervised part's cross-entropy branches on the data: its classifier is counted alone
                    head = model.backbone.get_classifier()
                    head(torch.empty(n, head.in_features, device='meta'))
    finally:
        for h in handles:
            h.remove()
    forward = counter.get_total_flops()
    return {'forward': forward / n, 'recompute': recompute[0] / n, 'teacher': teacher / n,
            'train': (3 * forward + recompute[0] + teacher) / n}


def _count(cfg) -> tuple[dict, int, int]:
    """(:func:`train_flops_per_image`, trained parameters of the module DeepSpeed trains, backbone parameters), from
    one build on the meta device."""
    from pretrain.objectives import build_model

    with torch.device('meta'):
        model = build_model(cfg)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone = sum(p.numel() for p in getattr(model, 'backbone', model).parameters())
    return train_flops_per_image(cfg, model), trained, backbone


# ------------------------------------------------------------------------------------------------------------------
# inputs


def _objective_name(kind: str) -> str:
    return {'m3i': 'multi'}.get(kind, kind)


def read_calibration(path: str | Path, *, model: str, objective: str, img_size: int,
                     grad_checkpointing: bool = True) -> Reference:
    """The best ``images_per_s`` row of ``parts.h1gpu.rows`` in the gpu-report ``path`` for ``model``, preferring rows
    of ``objective`` ('supervised' / 'multi', alias 'm3i') and ``img_size`` (a row without a key is taken to match,
    ``grad_checkpointing`` included). PlanError naming the file and key when there is no such row."""
    path, objective = Path(path), _objective_name(objective)  # rows and callers may spell it 'm3i'
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f'--calibration {path}: no such file (a gpu-report.json from `make gpu-check`)') from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f'--calibration {path}: cannot read: {e}') from None
    except json.JSONDecodeError as e:
        raise PlanError(f'--calibration {path}: not JSON: {e}') from None
    parts = report.get('parts') if isinstance(report, dict) else None
    if not isinstance(parts, dict):
        raise PlanError(f'{path}: parts: missing (not a gpu-report.json of benchmarks/gpu_check.py)')
    rows = (parts.get('h1gpu') or {}).get('rows') if isinstance(parts.get('h1gpu'), dict) else None
    if not isinstance(rows, list) or not rows:
        raise PlanError(f'{path}: parts.h1gpu.rows: missing or empty (the report has parts {sorted(parts)}; '
                        f'the h1gpu part of `make gpu-check` measures {model}), or give --img-per-s')
    ours = [r for r in rows if isinstance(r, dict) and r.get('model') == model]
    if not ours:
        found = sorted({str(r.get('model')) for r in rows if isinstance(r, dict)})
        raise PlanError(f'{path}: parts.h1gpu.rows: no row of {model} (rows of {found})')
    ok = [r for r in ours if 'error' not in r and isinstance(r.get('images_per_s'), (int, float))
          and r['images_per_s'] > 0]
    if not ok:
        why = '; '.join(f"batch {r.get('batch')}: {str(r.get('error', 'no images_per_s'))[:80]}" for r in ours[:3])
        raise PlanError(f'{path}: parts.h1gpu.rows: no row of {model} measured images_per_s ({why})')

    def fits(r, key, want):
        return key not in r or r[key] == want

    same = [r for r in ok if fits(r, 'img_size', img_size)
            and _objective_name(str(r.get('objective', objective))) == objective] or ok
    best = max(same, key=lambda r: r['images_per_s'])
    return Reference(images_per_s=float(best['images_per_s']), model=model,
                     objective=_objective_name(str(best.get('objective', objective))),
                     img_size=int(best.get('img_size', img_size)),
                     grad_checkpointing=bool(best.get('grad_checkpointing', grad_checkpointing)),
                     batch=best.get('batch'),
                     source=f'{path}: parts.h1gpu.rows, best of {len(same)} row(s)', kind='measured',
                     peak_mem_gib=best.get('peak_mem_gib'), gpu=best.get('gpu'))


def stage_samples_per_epoch(cfg, name: str, given: dict[str, int]) -> tuple[int, str, bool]:
    """Training samples per epoch of a stage: ``(samples, where from, assumed?)``. Resampled mode: the config's
    ``data.samples_per_epoch``; epoch mode: ``--train-samples``, else the shards' counts when readable here, else the
    public size of a known source (assumed)."""
    d = cfg.data
    if d.mode == 'resampled':
        if d.samples_per_epoch is None:
            raise PlanError(f'stage {name}: data.samples_per_epoch: resampled mode without it has no epochs '
                            '(set it, or schedule.total_steps)')
        return d.samples_per_epoch, 'data.samples_per_epoch', False
    if name in given:
        return given[name], '--train-samples', False
    from data_pipelines.loader import resolve_shards
    from pretrain.engine.data import _specs
    try:
        total = sum(s.samples for s in resolve_shards(_specs(d.train, d.remote), need_counts=True))
        return total, 'the shards (manifest / counts)', False
    except Exception as e:  # noqa: BLE001 -- any unreadable data: fall back, and say why below
        reason = f'{type(e).__name__}: {str(e).splitlines()[0][:120]}' if str(e) else type(e).__name__
    known = [KNOWN_TRAIN_SAMPLES.get(s.name) for s in d.train]
    if d.train and all(known):
        return (sum(k[0] for k in known), ' + '.join(f'{k[1]}: {k[0]:,}' for k in known)
                + ' (the shards are not readable here)', True)
    raise PlanError(f'stage {name}: epoch mode, and the training shards cannot be counted here ({reason}); give '
                    f'--train-samples {name}=N')


def _parse_train_samples(items: list[str], names: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        stage, sep, value = item.partition('=')
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise PlanError(f'--train-samples {item!r}: expected STAGE=N with N >= 1')
        if stage not in names:
            raise PlanError(f'--train-samples {item!r}: no stage {stage!r} (stages: {names})')
        out[stage] = int(value)
    return out


# ------------------------------------------------------------------------------------------------------------------
# the plan


def comm_bytes_per_step(num_params: int, *, zero_stage: int, precision: str, world_size: int,
                        grad_accum: int, grad_checkpointing: bool) -> float:
    """Bytes each rank sends per optimizer step for data parallelism (the module docstring's model)."""
    if world_size <= 1:
        return 0.0
    w = num_params * (4 if precision == 'fp32' else 2) * (world_size - 1) / world_size
    if zero_stage >= 3:
        return grad_accum * ((3 if grad_checkpointing else 2) + 1) * w
    if zero_stage == 2:
        return grad_accum * w + w
    return 2 * w


def plan_cascade(path: str | Path, *, gpus: int | None = None, reference: Reference | None = None,
                 calibration: str | Path | None = None, img_per_s: float | None = None,
                 calibrate_stage: str | None = None, train_samples: list[str] | None = None,
                 gpu_mem_gib: float = 80.0, reserve_gib: float = 2.0, memory: bool = True, measure_size: int = 64,
                 net_gb_per_s: float = NET_GB_PER_S, comm_overlap: float = 0.0, fs_gb_per_s: float = FS_GB_PER_S,
                 restart_min: float = RESTART_MIN, gpu_hours_per_failure: float = GPU_HOURS_PER_FAILURE,
                 loader_img_per_core: float = LOADER_IMG_PER_CORE) -> dict:
    """The plan of the cascade (or single stage) file ``path`` as a dict; see the module docstring. ``reference``
    (else ``img_per_s``, else ``calibration``, else the default assumption) sets the calibrated stage's images/s."""
    from launch.config import load_any
    from pretrain.config import ConfigError, load_config
    from pretrain.engine.trainer import total_steps_of

    for key, value in (('--gpu-mem', gpu_mem_gib), ('--net-gb-per-s', net_gb_per_s), ('--fs-gb-per-s', fs_gb_per_s),
                       ('--gpu-hours-per-failure', gpu_hours_per_failure),
                       ('--loader-img-per-core', loader_img_per_core)):
        if not value > 0:
            raise PlanError(f'{key} must be > 0, got {value}')
    if not 0.0 <= comm_overlap <= 1.0:
        raise PlanError(f'--comm-overlap must be in [0, 1], got {comm_overlap}')
    if restart_min < 0:
        raise PlanError(f'--restart-min must be >= 0, got {restart_min}')
    if img_per_s is not None and not img_per_s > 0:
        raise PlanError(f'--img-per-s must be > 0, got {img_per_s}')
    try:
        cascade = load_any(path)
        cfgs = [load_config(st.train_config, st.overrides) for st in cascade.stages]
    except ConfigError as e:
        raise PlanError(str(e)) from None
    names = [st.name for st in cascade.stages]
    given_samples = _parse_train_samples(train_samples or [], names)
    sizes = [st.resources.world_size for st in cascade.stages]
    gpus = gpus if gpus is not None else max(sizes)
    if gpus < 1:
        raise PlanError(f'--gpus must be >= 1, got {gpus}')
    for st, ws in zip(cascade.stages, sizes):
        if ws > gpus:
            raise PlanError(f'{path}: stage {st.name} asks for {ws} GPUs (resources: {st.resources.nodes} nodes x '
                            f'{st.resources.tasks_per_node} tasks), more than --gpus {gpus}')
    cal_name = calibrate_stage or names[0]
    if cal_name not in names:
        raise PlanError(f'--calibrate-stage {cal_name!r}: no such stage (stages: {names})')
    cal_cfg = cfgs[names.index(cal_name)]
    notes: list[str] = []
    if reference is None:
        if img_per_s is not None:
            reference = Reference(img_per_s, cal_cfg.model.name, cal_cfg.objective.kind, cal_cfg.data.img_size,
                                  cal_cfg.model.grad_checkpointing, cal_cfg.deepspeed.micro_batch_size,
                                  '--img-per-s', 'given')
            if calibration is not None:
                notes.append(f'--img-per-s {img_per_s:g} overrides --calibration {calibration}')
        elif calibration is not None:
            reference = read_calibration(calibration, model=cal_cfg.model.name, objective=cal_cfg.objective.kind,
                                         img_size=cal_cfg.data.img_size,
                                         grad_checkpointing=cal_cfg.model.grad_checkpointing)
        else:
            d = DEFAULT_REFERENCE
            reference = Reference(d['images_per_s'], d['model'], d['objective'], d['img_size'],
                                  d['grad_checkpointing'], d['batch'], d['source'], 'assumed', gpu=d['gpu'])
    # The reference's own FLOPs: the calibrated stage's config, changed to what the reference ran.
    ref_cfg = cal_cfg
    if (reference.model, reference.objective, reference.img_size, reference.grad_checkpointing) != (
            cal_cfg.model.name, cal_cfg.objective.kind, cal_cfg.data.img_size, cal_cfg.model.grad_checkpointing):
        from pretrain.config import ObjectiveConfig
        model = dataclasses.replace(cal_cfg.model, name=reference.model,
                                    grad_checkpointing=reference.grad_checkpointing)
        if reference.model != cal_cfg.model.name:
            model = dataclasses.replace(model, kwargs={}, num_classes=1000)
        objective = cal_cfg.objective if reference.objective == cal_cfg.objective.kind else ObjectiveConfig()
        if reference.objective not in ('supervised', cal_cfg.objective.kind):
            raise PlanError(f'the reference measured objective {reference.objective!r} on {reference.model}; only '
                            f"the calibrated stage's own objective or 'supervised' can be counted")
        ref_cfg = dataclasses.replace(cal_cfg, model=model, objective=objective,
                                      data=dataclasses.replace(cal_cfg.data, img_size=reference.img_size))
    counts = [_count(cfg) for cfg in cfgs]
    ref_flops = (counts[names.index(cal_name)][0] if ref_cfg is cal_cfg else train_flops_per_image(ref_cfg))['train']
    stages = []
    for st, cfg, ws, (flops, trained, backbone) in zip(cascade.stages, cfgs, sizes, counts):
        ds = cfg.deepspeed
        ips = reference.images_per_s * ref_flops / flops['train']
        if st.name == cal_name and ref_cfg is cal_cfg:
            basis = f'{reference.kind}: {reference.source}'
        else:
            basis = (f'derived: {reference.images_per_s:g} images/s of {reference.model} ({reference.objective}, '
                     f'{reference.img_size} px, {reference.kind}) x its {ref_flops / 1e9:,.0f} / this stage\'s '
                     f'{flops["train"] / 1e9:,.0f} GFLOPs per training image (same FLOP utilisation: assumed)')
        spe, spe_from, spe_assumed = (None, None, False)
        sch = cfg.schedule
        if sch.epochs is not None or sch.warmup_epochs is not None:
            if sch.steps_per_epoch is None:
                spe, spe_from, spe_assumed = stage_samples_per_epoch(cfg, st.name, given_samples)
                per_step = cfg.global_batch_size(ws)
                if spe < per_step:
                    raise PlanError(f'stage {st.name}: {spe} samples per epoch are fewer than one global batch '
                                    f'({per_step})')
                cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(sch, steps_per_epoch=spe // per_step))
        try:
            steps, steps_per_epoch, warmup = total_steps_of(cfg, ws)
        except ValueError as e:
            raise PlanError(f'stage {st.name}: {e}') from None
        global_batch = cfg.global_batch_size(ws)
        compute_s = ds.micro_batch_size * ds.grad_accum_steps / ips
        comm = comm_bytes_per_step(trained, zero_stage=ds.zero_stage, precision=ds.precision, world_size=ws,
                                   grad_accum=ds.grad_accum_steps, grad_checkpointing=cfg.model.grad_checkpointing)
        comm_s = comm / (net_gb_per_s * 1e9)
        step_s = compute_s + (1.0 - comm_overlap) * comm_s
        ck = cfg.checkpoint
        ckpt_bytes = trained * ((4 if ds.precision == 'fp32' else 2) + 12) \
            + (4 * trained if cfg.ema.enabled else 0) \
            + (4 * backbone if cfg.objective.kind == 'multi' and cfg.objective.weights()['mim'] > 0 else 0)
        save_s = ckpt_bytes / (fs_gb_per_s * 1e9)
        interval = ck.interval_steps or 0
        saves = (steps // interval if interval else 0) + int(ck.save_at_end and (not interval or steps % interval != 0))
        train_s = steps * step_s
        restart_s = restart_min * 60
        run_s = train_s + saves * save_s + restart_s  # one start
        r = st.resources
        job_useful_s = r.timeout_min * 60 - r.signal_delay_s - restart_s
        if job_useful_s <= 0:
            raise PlanError(f'stage {st.name}: resources.timeout_min {r.timeout_min} leaves no time after the '
                            f'signal delay ({r.signal_delay_s} s) and a restart ({restart_min:g} min)')
        time_limit_requeues = max(math.ceil(run_s / job_useful_s) - 1, 0)
        failures = run_s / 3600 * ws / gpu_hours_per_failure
        lost_steps_s = (interval * step_s if interval else min(job_useful_s, train_s)) / 2
        loss_s = failures * (lost_steps_s + restart_s) + time_limit_requeues * (save_s + restart_s)
        wall_s = run_s + loss_s
        mtbf_s = gpu_hours_per_failure / ws * 3600
        young = math.sqrt(2 * save_s * mtbf_s) / step_s
        requeues = time_limit_requeues + failures
        cores = ips / loader_img_per_core
        stage = {
            'name': st.name, 'config': st.train_config, 'overrides': list(st.overrides), 'gpus': ws,
            'model': cfg.model.name, 'objective': cfg.objective.kind, 'img_size': cfg.data.img_size,
            'micro_batch': ds.micro_batch_size, 'grad_accum': ds.grad_accum_steps, 'global_batch': global_batch,
            'zero_stage': ds.zero_stage, 'precision': ds.precision,
            'grad_checkpointing': cfg.model.grad_checkpointing, 'trained_params': trained,
            'backbone_params': backbone,
            'epochs': sch.epochs, 'samples_per_epoch': spe, 'samples_per_epoch_from': spe_from,
            'samples_per_epoch_assumed': spe_assumed, 'steps_per_epoch': steps_per_epoch,
            'steps': steps, 'warmup_steps': warmup, 'samples': steps * global_batch,
            'train_gflops_per_image': flops['train'] / 1e9, 'flops': {k: v / 1e9 for k, v in flops.items()},
            'images_per_s_per_gpu': ips, 'images_per_s_basis': basis, 'calibrated': st.name == cal_name,
            'compute_s_per_step': compute_s, 'comm_gb_per_step': comm / 1e9, 'comm_s_per_step': comm_s,
            'step_s': step_s, 'train_h': train_s / 3600,
            'checkpoint_gib': ckpt_bytes / GiB, 'save_s': save_s, 'saves': saves,
            'saves_h': saves * save_s / 3600, 'checkpoint_interval_steps': interval,
            'checkpoint_interval_min': interval * step_s / 60,
            'young_interval_steps': young,
            'time_limit_requeues': time_limit_requeues, 'expected_failures': failures,
            'lost_per_failure_min': (lost_steps_s + restart_s) / 60,
            'preemption_loss_h': loss_s / 3600, 'preemption_loss_gpu_h': loss_s / 3600 * ws,
            'max_requeues': r.max_requeues, 'requeues_expected': requeues,
            'requeues_exceed_max': requeues > r.max_requeues,
            'wall_h': wall_s / 3600, 'gpu_hours': wall_s / 3600 * ws,
            'loader_cores_per_gpu': cores, 'cpus_per_task': r.cpus_per_task,
            'loader_cores_short': cores > max(r.cpus_per_task - 1, 0),
        }
        if st.name == cal_name and reference.peak_mem_gib is not None:
            stage['measured_peak_mem_gib'] = reference.peak_mem_gib
            stage['measured_batch'] = reference.batch
        if memory:
            from pretrain.engine.plan import plan as memory_plan
            mem = memory_plan(cfg, world_size=ws, gpu_mem_gib=gpu_mem_gib, reserve_gib=reserve_gib,
                              measure_size=measure_size)
            key = 'checkpointing' if cfg.model.grad_checkpointing else 'no_checkpointing'
            stage['memory'] = {'model_states_gib': mem['model_states_gib']['total'],
                               'activations_gib_per_image': mem['activations_gib_per_sample'][key],
                               'total_gib': mem['configured_total_gib'][key],
                               'largest_micro_batch': mem['largest_micro_batch'][key],
                               'fits': mem['configured_total_gib'][key] <= gpu_mem_gib}
        stages.append(stage)
    total_wall = sum(s['wall_h'] for s in stages)
    assumptions = _assumptions(reference, stages, cal_name, gpus=gpus, gpu_mem_gib=gpu_mem_gib,
                               net_gb_per_s=net_gb_per_s, comm_overlap=comm_overlap, fs_gb_per_s=fs_gb_per_s,
                               restart_min=restart_min, gpu_hours_per_failure=gpu_hours_per_failure,
                               loader_img_per_core=loader_img_per_core, memory=memory)
    return {'cascade': cascade.name, 'file': str(path), 'gpus': gpus, 'gpu_mem_gib': gpu_mem_gib,
            'reference': dataclasses.asdict(reference), 'reference_train_gflops_per_image': ref_flops / 1e9,
            'calibrated_stage': cal_name, 'measured': reference.kind == 'measured', 'stages': stages,
            'total': {'wall_h': total_wall, 'gpu_hours': sum(s['gpu_hours'] for s in stages),
                      'cluster_gpu_hours': total_wall * gpus,
                      'preemption_loss_gpu_h': sum(s['preemption_loss_gpu_h'] for s in stages)},
            'notes': notes, 'assumptions': assumptions}


def _assumptions(ref: Reference, stages: list[dict], cal_name: str, *, gpus, gpu_mem_gib, net_gb_per_s, comm_overlap,
                 fs_gb_per_s, restart_min, gpu_hours_per_failure, loader_img_per_core, memory) -> list[dict]:
    """Every number the plan did not read from a config, as ``{'what', 'value', 'status'}`` (measured / given /
    from docs / assumed)."""
    out = []

    def add(what, value, status):
        out.append({'what': what, 'value': value, 'status': status})

    batch = f', batch {ref.batch}' if ref.batch is not None else ''
    gpu = f' on {ref.gpu}' if ref.gpu else ''
    add(f'throughput reference for {cal_name}', f'{ref.images_per_s:g} images/s per GPU ({ref.model}, '
        f'{ref.objective}, {ref.img_size} px{batch}{gpu}; {ref.source})',
        ref.kind if ref.kind in ('measured', 'given') else 'assumed')
    cal = next(s for s in stages if s['name'] == cal_name)
    if ref.kind == 'assumed':
        add(f'{cal_name} runs at the FLOP utilisation of the reference', 'no measurement of this stage exists: '
            'run `make gpu-check` (part h1gpu) and pass --calibration gpu-report.json', 'assumed')
    if ref.batch is not None and ref.batch != cal['micro_batch']:
        add('images/s per GPU do not depend on the micro-batch',
            f"reference batch {ref.batch}, {cal_name} runs micro-batch {cal['micro_batch']}", 'assumed')
    if len(stages) > 1 or ref.kind == 'assumed':
        add('every other stage runs at the same FLOP utilisation (images/s scaled by counted training FLOPs per '
            'image)', ', '.join(f"{s['name']} {s['train_gflops_per_image']:,.0f} GFLOPs" for s in stages), 'assumed')
    add('training FLOPs per image = 3 x forward (+ recompute of checkpointed blocks, + the M3I teacher forward)',
        'torch.utils.flop_counter on the meta device; DCNv3 core at 5 MACs per channel and point', 'assumed')
    add('1 GPU -> N GPUs: only the data-parallel traffic is added', f'{net_gb_per_s:g} GB/s per GPU, '
        f'{comm_overlap:.0%} of it hidden behind compute', 'assumed')
    add('checkpoint write bandwidth of the file system (all ranks together)', f'{fs_gb_per_s:g} GB/s', 'assumed')
    add('restart after a requeue (process start, model build, NCCL, checkpoint load); queue wait not counted',
        f'{restart_min:g} min', 'assumed')
    add('unexpected interruptions', f'one per {gpu_hours_per_failure:,.0f} GPU-hours ({FAILURE_SOURCE})',
        'from docs' if gpu_hours_per_failure == GPU_HOURS_PER_FAILURE else 'given')
    add('data-loader images/s per core', f'{loader_img_per_core:g} ({LOADER_SOURCE}); the same at 384 and 640 px '
        'and on LAION/ImageNet sizes (not measured)', 'from docs' if loader_img_per_core == LOADER_IMG_PER_CORE
        else 'given')
    for s in stages:
        if s['samples_per_epoch_assumed']:
            add(f"training samples per epoch of {s['name']}",
                f"{s['samples_per_epoch']:,} ({s['samples_per_epoch_from']})", 'assumed')
    if memory:
        add('GPU memory', f'{gpu_mem_gib:g} GiB per GPU (--gpu-mem); activations measured on the CPU at 64 px and '
            'scaled, as `python -m pretrain plan` does (for an M3I stage: the backbone forward only, without the '
            'text tower, decoder and teacher)', 'given')
    add('cluster', f'{gpus} GPUs; each stage uses the GPUs its resources ask for', 'given')
    return out


# ------------------------------------------------------------------------------------------------------------------
# output


def _dur(hours: float) -> str:
    return f'{hours:,.1f} h' if hours < 48 else f'{hours / 24:,.1f} d'


def format_plan(p: dict) -> str:
    ref = p['reference']
    lines = [f"Cascade {p['cascade']} ({p['file']}) on a cluster of {p['gpus']} GPUs"]
    if not p['measured']:
        if ref['kind'] == 'given':
            what = f"given on the command line: {ref['images_per_s']:g} images/s per GPU of {p['calibrated_stage']}"
        else:
            what = (f"derived from an assumption: {ref['model']}'s {ref['images_per_s']:g} images/s ({ref['source']}) "
                    f"at the same FLOP utilisation as {p['calibrated_stage']}")
        lines += ['', f'*** ASSUMED THROUGHPUT: no GPU measurement of this cascade was given; its images/s are {what}. '
                  'Every time and GPU-hour figure below scales with it. ***']
    for note in p['notes']:
        lines.append(f'note: {note}')
    for s in p['stages']:
        spe = (f"; {s['samples_per_epoch']:,} samples per epoch ({s['samples_per_epoch_from']}"
               f"{', ASSUMED' if s['samples_per_epoch_assumed'] else ''})" if s['samples_per_epoch'] else '')
        epochs = f"{s['epochs']:g} epochs, " if s['epochs'] is not None else ''
        lines += ['', f"[{s['name']}] {s['model']} {s['objective']} at {s['img_size']} px on {s['gpus']} GPUs, "
                  f"ZeRO-{s['zero_stage']} {s['precision']}, checkpointing {'on' if s['grad_checkpointing'] else 'off'}"
                  f"; {s['trained_params'] / 1e6:,.1f}M trained parameters",
                  f"  samples {s['samples']:,} = {epochs}{s['steps']:,} steps x global batch {s['global_batch']:,} "
                  f"({s['micro_batch']} x {s['grad_accum']} x {s['gpus']}){spe}",
                  f"  throughput {s['images_per_s_per_gpu']:,.1f} images/s per GPU "
                  f"({s['train_gflops_per_image']:,.0f} GFLOPs per training image) -- {s['images_per_s_basis']}",
                  f"  step {s['step_s'] * 1e3:,.0f} ms = compute {s['compute_s_per_step'] * 1e3:,.0f} ms + "
                  f"data-parallel traffic {s['comm_gb_per_step']:,.1f} GB per GPU "
                  f"({s['comm_s_per_step'] * 1e3:,.0f} ms if not hidden)",
                  f"  wall {_dur(s['wall_h'])} (training {_dur(s['train_h'])}, {s['saves']:,} saves "
                  f"{s['saves_h'] * 60:,.1f} min, preemption {_dur(s['preemption_loss_h'])}); "
                  f"{s['gpu_hours']:,.0f} GPU-hours",
                  f"  checkpoint {s['checkpoint_gib']:,.1f} GiB, {s['save_s']:,.1f} s to save; every "
                  f"{s['checkpoint_interval_steps']:,} steps = {s['checkpoint_interval_min']:,.1f} min "
                  f"(Young's optimum: {s['young_interval_steps']:,.0f} steps)",
                  f"  preemption: {s['expected_failures']:.1f} unexpected interruptions expected, each losing "
                  f"{s['lost_per_failure_min']:,.1f} min; {s['time_limit_requeues']} time-limit requeues; "
                  f"{s['preemption_loss_gpu_h']:,.0f} GPU-hours lost",
                  f"  loader {s['loader_cores_per_gpu']:.2f} cores per GPU (cpus_per_task {s['cpus_per_task']})"]
        if s['requeues_exceed_max']:
            lines.append(f"  WARNING: {s['requeues_expected']:.0f} requeues expected, resources.max_requeues is "
                         f"{s['max_requeues']}: the stage would be abandoned")
        if s['loader_cores_short']:
            lines.append(f"  WARNING: the loader needs {s['loader_cores_per_gpu']:.1f} cores per GPU, more than "
                         f"cpus_per_task - 1 = {s['cpus_per_task'] - 1}")
        if 'memory' in s:
            m = s['memory']
            lines.append(f"  memory {m['total_gib']:,.1f} GiB of {p['gpu_mem_gib']:g} per GPU at micro-batch "
                         f"{s['micro_batch']} ({'fits' if m['fits'] else 'DOES NOT FIT'}; model states "
                         f"{m['model_states_gib']:,.2f} GiB, activations {m['activations_gib_per_image'] * 1024:,.0f}"
                         f" MiB per image; largest micro-batch {m['largest_micro_batch']})")
        if 'measured_peak_mem_gib' in s:
            lines.append(f"  measured peak {s['measured_peak_mem_gib']:,.1f} GiB at batch {s['measured_batch']} on one "
                         'GPU (calibration row)')
    t = p['total']
    lines += ['', f"total: wall {_dur(t['wall_h'])}, {t['gpu_hours']:,.0f} GPU-hours on the stages' GPUs "
              f"({t['cluster_gpu_hours']:,.0f} holding all {p['gpus']} for the whole cascade), of which "
              f"{t['preemption_loss_gpu_h']:,.0f} lost to preemption", '', 'assumptions:']
    for a in p['assumptions']:
        lines.append(f"  [{a['status']}] {a['what']}: {a['value']}")
    return '\n'.join(_wrap(line) for line in lines)


def _wrap(line: str, width: int = 118) -> str:
    import textwrap

    indent = ' ' * (len(line) - len(line.lstrip(' ')) + 4)
    return textwrap.fill(line, width, subsequent_indent=indent, break_on_hyphens=False) if line else line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m pretrain plan --cascade', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cascade', required=True, help='a cascade (configs/cascade/*.yaml) or launch stage file')
    parser.add_argument('--gpus', type=int, default=None,
                        help="GPUs of the cluster (default: the largest stage's); each stage uses what its resources "
                             'ask for, and a stage asking for more is refused')
    which = parser.add_argument_group('throughput of the calibrated stage')
    which.add_argument('--calibration', help='gpu-report.json of `make gpu-check` (parts.h1gpu.rows)')
    which.add_argument('--img-per-s', type=float, help='images/s per GPU (overrides --calibration)')
    which.add_argument('--calibrate-stage', help='the stage the figure belongs to (default: the first)')
    parser.add_argument('--train-samples', action='append', default=[], metavar='STAGE=N',
                        help='training samples per epoch of an epoch-mode stage whose shards are not here')
    parser.add_argument('--gpu-mem', type=float, default=80.0, help='GiB per GPU (memory fit)')
    parser.add_argument('--reserve', type=float, default=2.0, help='GiB kept for the CUDA context, NCCL, fragments')
    parser.add_argument('--no-memory', action='store_true', help='skip the memory fit (it builds each model)')
    parser.add_argument('--net-gb-per-s', type=float, default=NET_GB_PER_S, help='network GB/s per GPU')
    parser.add_argument('--comm-overlap', type=float, default=0.0, help='fraction of the traffic hidden (0-1)')
    parser.add_argument('--fs-gb-per-s', type=float, default=FS_GB_PER_S, help='checkpoint write GB/s, all ranks')
    parser.add_argument('--restart-min', type=float, default=RESTART_MIN, help='minutes to restart after a requeue')
    parser.add_argument('--gpu-hours-per-failure', type=float, default=GPU_HOURS_PER_FAILURE,
                        help='GPU-hours between unexpected interruptions')
    parser.add_argument('--loader-img-per-core', type=float, default=LOADER_IMG_PER_CORE,
                        help='data-loader images/s per core')
    parser.add_argument('--json', action='store_true')
    args = parser.parse_args(argv)
    try:
        result = plan_cascade(args.cascade, gpus=args.gpus, calibration=args.calibration, img_per_s=args.img_per_s,
                              calibrate_stage=args.calibrate_stage, train_samples=args.train_samples,
                              gpu_mem_gib=args.gpu_mem, reserve_gib=args.reserve, memory=not args.no_memory,
                              net_gb_per_s=args.net_gb_per_s, comm_overlap=args.comm_overlap,
                              fs_gb_per_s=args.fs_gb_per_s, restart_min=args.restart_min,
                              gpu_hours_per_failure=args.gpu_hours_per_failure,
                              loader_img_per_core=args.loader_img_per_core)
    except PlanError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
