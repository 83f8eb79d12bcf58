"""``python -m pretrain plan CONFIG --world-size N --gpu-mem GB``: per-GPU memory of a config, before renting GPUs.
(``python -m pretrain plan --cascade CASCADE.yaml --gpus N``: a whole cascade's steps, time, GPU-hours, checkpoints,
loader cores, preemption loss and memory fit, :mod:`pretrain.engine.cascade_plan`.)

Model states per rank follow the ZeRO paper's accounting (Rajbhandari et al. 2020, §5) for Adam, with P parameters
and N data-parallel ranks:

| precision | parameters | gradients | optimizer (fp32 master + exp_avg + exp_avg_sq) |
|---|---|---|---|
| bf16/fp16 | 2P | 2P | 12P (master 4P: a separate fp32 copy) |
| fp32 | 4P | 4P | 12P (DeepSpeed's ZeRO keeps a separate fp32 partition even in fp32) |

ZeRO-1 divides the optimizer term by N, ZeRO-2 also the gradients, ZeRO-3 also the parameters (plus the gathered
working set of the largest blocks). Optimizer offload moves the optimizer term (and ZeRO-3 parameter offload the
parameters) to host memory. The EMA adds 4P (ZeRO 0-2) or 4P/N (ZeRO-3); so does the M3I MIM teacher, with the
backbone's P.

Activations are measured, not guessed: one forward at batch 1 on the CPU at a reduced resolution with a
saved-tensor hook that counts the bytes autograd keeps (deduplicated by storage), attributed to the block that saved
them; scaled by pixels and by the compute dtype. With per-block checkpointing only each block's input is kept, plus
one block's activations while it is recomputed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch

__all__ = ['ModelStates', 'model_state_bytes', 'activation_bytes_per_sample', 'plan', 'main']

GiB = 2 ** 30


@dataclass
class ModelStates:
    params: float
    grads: float
    optimizer: float
    ema: float
    zero3_working_set: float
    host_offloaded: float
    teacher: float = 0.0  # the M3I MIM teacher: an fp32 EMA of the backbone, partitioned like the EMA

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema + self.teacher + self.zero3_working_set


def model_state_bytes(num_params: int, *, stage: int, world_size: int, precision: str = 'bf16',
                      ema: bool = False, offload_optimizer: bool = False, offload_param: bool = False,
                      teacher_params: int = 0,
                      largest_block_params: int = 0) -> ModelStates:
    """Bytes per rank of parameters, gradients, optimizer states, EMA (and the ZeRO-3 gathered working set)."""
    p, n = float(num_params), float(world_size)
    low = 4.0 if precision == 'fp32' else 2.0
    params, grads, optim = low * p, low * p, 12.0 * p
    if stage >= 1:
        optim /= n
    if stage >= 2:
        grads /= n
    working = 0.0
    if stage >= 3:
        params /= n
        working = 2 * low * largest_block_params  # the block being computed and the prefetched next one
    ema_bytes = (4.0 * p / (n if stage >= 3 else 1)) if ema else 0.0
    teacher_bytes = 4.0 * teacher_params / (n if stage >= 3 else 1)
    host = 0.0
    if offload_optimizer:
        host += optim
        optim = 0.0
    if offload_param and stage >= 3:
        host += params
        params = 0.0
    return ModelStates(params, grads, optim, ema_bytes, working, host, teacher_bytes)


def activation_bytes_per_sample(model: torch.nn.Module, img_size: int, *, measure_size: int = 64) -> dict:
    """Saved-for-backward bytes per image (fp32) at ``img_size``, without and with per-block checkpointing.

    Measured at ``measure_size`` px (batch 1, CPU) and scaled by ``(img_size / measure_size) ** 2``.
    """
    from pretrain.models import checkpointable_blocks

    blocks = checkpointable_blocks(model)
    current: list[int | None] = [None]
    per_block = [0] * len(blocks)
    block_inputs = [0] * len(blocks)
    other = [0]
    seen: set = set()

    def pre(i):
        def hook(_module, args):
            current[0] = i
            x = args[0] if args else None
            if torch.is_tensor(x):
                block_inputs[i] = x.numel() * x.element_size()
        return hook

    def post(_module, _args, _out):
        current[0] = None

    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in param_storages:  # weights saved by linear/conv are not activations
            seen.add(key)
            nbytes = storage.nbytes()
            if current[0] is None:
                other[0] += nbytes
            else:
                per_block[current[0]] += nbytes
        return t

    handles = [b.register_forward_pre_hook(pre(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post) for b in blocks]
    model.train()
    x = torch.randn(1, 3, measure_size, measure_size)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        del out
    finally:
        for h in handles:
            h.remove()
    scale = (img_size / measure_size) ** 2
    full = (other[0] + sum(per_block)) * scale
    checkpointed = (other[0] + sum(block_inputs) + max(per_block)) * scale
    return {'no_checkpointing': full, 'checkpointing': checkpointed}


def plan(cfg, *, world_size: int, gpu_mem_gib: float, reserve_gib: float = 2.0, measure_size: int = 64) -> dict:
    """The memory plan of ``cfg`` at ``world_size`` ranks on GPUs with ``gpu_mem_gib``: a dict (bytes and GiB)."""
    import dataclasses

    from pretrain.models import checkpointable_blocks
    from pretrain.objectives import build_model

    torch.manual_seed(0)
    # Measured without checkpointing (the hooks see every saved tensor); the checkpointed figure is derived.
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, grad_checkpointing=False)))
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest_block = max(sum(p.numel() for p in b.parameters()) for b in checkpointable_blocks(model))
    ob = cfg.objective
    teacher = (sum(p.numel() for p in model.backbone.parameters())
               if ob.kind == 'multi' and ob.weights()['mim'] > 0 else 0)
    ds = cfg.deepspeed
    states = model_state_bytes(num_params, stage=ds.zero_stage, world_size=world_size, precision=ds.precision,
                               ema=cfg.ema.enabled, offload_optimizer=ds.offload_optimizer != 'none',
                               offload_param=ds.offload_param != 'none', largest_block_params=largest_block,
                               teacher_params=teacher)
    act = activation_bytes_per_sample(model, cfg.data.img_size, measure_size=measure_size)
    dtype_scale = 1.0 if ds.precision == 'fp32' else 0.5
    act = {k: v * dtype_scale for k, v in act.items()}
    free = gpu_mem_gib * GiB - reserve_gib * GiB - states.total
    fits = {k: max(int(free // v), 0) if v > 0 else None for k, v in act.items()}
    mb = ds.micro_batch_size
    return {
        'model': cfg.model.name, 'params': num_params, 'world_size': world_size, 'zero_stage': ds.zero_stage,
        'precision': ds.precision, 'gpu_mem_gib': gpu_mem_gib, 'reserve_gib': reserve_gib,
        'model_states_gib': {k: v / GiB for k, v in asdict(states).items()} | {'total': states.total / GiB},
        'activations_gib_per_sample': {k: v / GiB for k, v in act.items()},
        'configured_micro_batch': mb,
        'configured_total_gib': {k: (states.total + mb * v) / GiB + reserve_gib for k, v in act.items()},
        'largest_micro_batch': fits,
        'grad_checkpointing_configured': cfg.model.grad_checkpointing,
        # The model as built, before DeepSpeed takes it: whole in fp32 on every rank, or (deepspeed.zero_init) whole
        # on rank 0 only, as the reference; the partitions are on the GPU then, or on the host with parameter offload.
        'build_host_gib': {'rank0': 4 * num_params / GiB, 'other_ranks': (
            4 * num_params / GiB if not ds.zero_init else 0.0 if ds.offload_param == 'none'
            else model_state_bytes(num_params, stage=3, world_size=world_size, precision=ds.precision).params / GiB)},
        'zero_init': ds.zero_init,
    }


def main(argv: list[str] | None = None) -> int:
    from pretrain.config import load_config_or_report

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == '--cascade' or a.startswith('--cascade=') for a in argv):
        from pretrain.engine import cascade_plan
        return cascade_plan.main(argv)
    parser = argparse.ArgumentParser(prog='python -m pretrain plan', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('overrides', nargs='*', help='key.sub=value')
    parser.add_argument('--world-size', type=int, required=True)
    parser.add_argument('--gpu-mem', type=float, required=True, help='GiB per GPU')
    parser.add_argument('--reserve', type=float, default=2.0, help='GiB kept for the CUDA context, NCCL, fragments')
    parser.add_argument('--measure-size', type=int, default=64, help='px of the activation measurement (CPU)')
    parser.add_argument('--json', action='store_true')
    args = parser.parse_intermixed_args(argv)
    cfg = load_config_or_report(args.config, args.overrides)
    if cfg is None:
        return 2
    result = plan(cfg, world_size=args.world_size, gpu_mem_gib=args.gpu_mem, reserve_gib=args.reserve,
                  measure_size=args.measure_size)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    s = result['model_states_gib']
    print(f"{result['model']}: {result['params'] / 1e6:.1f}M parameters, ZeRO-{result['zero_stage']} "
          f"{result['precision']}, {result['world_size']} ranks, {result['gpu_mem_gib']:g} GiB per GPU "
          f"({result['reserve_gib']:g} reserved)")
    teacher = f"MIM teacher {s['teacher']:.2f}, " if s['teacher'] else ''
    host = f"; offloaded to host {s['host_offloaded']:.2f} GiB" if s['host_offloaded'] else ''
    print(f"  per GPU: parameters {s['params']:.2f} GiB, gradients {s['grads']:.2f}, optimizer {s['optimizer']:.2f}, "
          f"EMA {s['ema']:.2f}, {teacher}ZeRO-3 working set {s['zero3_working_set']:.2f} -> model states "
          f"{s['total']:.2f} GiB{host}")
    b = result['build_host_gib']
    print(f"  building the model: {b['rank0']:.2f} GiB of host memory on rank 0 and {b['other_ranks']:.2f} GiB on "
          f"each other rank" + ('' if result['zero_init'] else ' (deepspeed.zero_init: true leaves it on rank 0 only)'))
    for key in ('no_checkpointing', 'checkpointing'):
        per = result['activations_gib_per_sample'][key]
        fit = result['largest_micro_batch'][key]
        print(f"  activations ({key.replace('_', ' ')}): {per * 1024:.1f} MiB per image; largest micro-batch "
              f"that fits: {fit}; configured micro-batch {result['configured_micro_batch']} needs "
              f"{result['configured_total_gib'][key]:.1f} GiB")
    if not math.isfinite(s['total']):
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
