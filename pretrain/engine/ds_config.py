"""The DeepSpeed JSON config, built from ours (the only place that knows DeepSpeed's key names)."""
from __future__ import annotations

import copy

from pretrain.config import TrainConfig

__all__ = ['build_deepspeed_config']


def _offload(device: str, nvme_path: str | None) -> dict:
    out = {'device': device}
    if device == 'nvme':
        out['nvme_path'] = nvme_path
    if device == 'cpu':
        out['pin_memory'] = False  # pinned host memory does not exist without CUDA and costs RAM for small runs
    return out


def build_deepspeed_config(cfg: TrainConfig, *, world_size: int, lr_peak: float, load_universal: bool = False) -> dict:
    """DeepSpeed config for ``cfg`` at ``world_size`` ranks.

    The optimizer is DeepSpeed-built AdamW (``torch_adam`` = torch.optim.AdamW; DeepSpeedCPUAdam when the optimizer
    is offloaded); our schedule sets each group's lr every step, so there is no DeepSpeed scheduler.
    """
    ds = cfg.deepspeed
    offloaded = ds.offload_optimizer != 'none'
    zero: dict = {'stage': ds.zero_stage}
    if ds.zero_stage > 0:
        zero.update(contiguous_gradients=ds.contiguous_gradients, overlap_comm=ds.overlap_comm,
                    reduce_bucket_size=ds.bucket_size, allgather_bucket_size=ds.bucket_size,
                    reduce_scatter=True)
    if ds.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
                    stage3_prefetch_bucket_size=ds.bucket_size, stage3_gather_16bit_weights_on_model_save=False)
    if offloaded:
        zero['offload_optimizer'] = _offload(ds.offload_optimizer, ds.nvme_path)
    if ds.offload_param != 'none':
        zero['offload_param'] = _offload(ds.offload_param, ds.nvme_path)
    config = {
        'train_batch_size': cfg.global_batch_size(world_size),
        'train_micro_batch_size_per_gpu': ds.micro_batch_size,
        'gradient_accumulation_steps': ds.grad_accum_steps,
        'gradient_clipping': ds.grad_clip,
        'optimizer': {'type': 'AdamW', 'params': {
            'lr': lr_peak, 'betas': list(cfg.optim.betas), 'eps': cfg.optim.eps,
            'weight_decay': cfg.optim.weight_decay, 'torch_adam': ds.torch_adam and not offloaded}},
        # check_grad_overflow: ZeRO 1/2 skip a bf16 step with a non-finite gradient norm only with it (its default)
        'bf16': {'enabled': ds.precision == 'bf16', 'check_grad_overflow': True},
        'fp16': {'enabled': ds.precision == 'fp16', 'loss_scale': 0,
                 'initial_scale_power': ds.fp16_initial_scale_power},
        'zero_optimization': zero,
        # BatchNorm on CPU needs its running stats in the input dtype (DeepSpeed casts only parameters by default).
        **({'data_types': {'buffer_dtype': ds.precision}} if ds.precision != 'fp32' else {}),
        'checkpoint': {'load_universal': load_universal, 'tag_validation': 'Fail'},
        'steps_per_print': 10 ** 12,
        'wall_clock_breakdown': False,
        'zero_allow_untested_optimizer': True,
    }
    for key, value in ds.extra.items():  # the escape hatch goes last, merged one level deep
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **copy.deepcopy(value)}
        else:
            config[key] = copy.deepcopy(value)
    return config
