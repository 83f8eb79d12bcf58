"""``python -m pretrain scale (--phi F | --params N)``: InternImage's stacking and compound-scaling rules as a tool.

Stacking rules (InternImage paper §3.3): ``C_i = 2^(i-1) C1``, ``G_i = C_i / C'``, ``L1 = L2 = L4``, ``L1 <= L3``, so
a model is ``(C1, C', L1, L3)``; InternImage-T is (64, 16, 4, 18). Compound scaling: depth ``D = 3 L1 + L3`` becomes
``alpha^phi D`` and ``C1`` becomes ``beta^phi C1`` with alpha = 1.09, beta = 1.36 (alpha beta^1.99 ~ 2).

Rounding (:func:`scaled_arch`): ``C1`` to the nearest multiple of ``C'`` (so every ``G_i`` is a whole number), at
least ``C'``; ``D`` to the nearest integer, split as T splits it: ``L1 = max(1, round(D * 4 / 30))``,
``L3 = D - 3 L1`` (and ``L3 >= L1``). phi = 0 gives T exactly. ``--params N`` finds the phi (bisection) whose rounded
model has the parameter count nearest N. It prints the model kwargs (``model.kwargs`` of any stage config with
``model.name: internimage_t``), parameters, multiply-accumulates at 224 px and the ``plan`` model-state memory per
rank (ZeRO-3, bf16, EMA; activations: ``python -m pretrain plan``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

__all__ = ['ALPHA', 'BETA', 'BASE', 'scaled_arch', 'arch_kwargs', 'fit_phi', 'describe', 'main']

ALPHA, BETA = 1.09, 1.36
BASE = dict(C1=64, C_prime=16, L1=4, L3=18)  # InternImage-T


def scaled_arch(phi: float, c_prime: int = BASE['C_prime']) -> dict:
    """``{'C1', 'C_prime', 'L1', 'L3'}`` of the rule at ``phi`` (rounded as the module docstring says)."""
    depth = round((3 * BASE['L1'] + BASE['L3']) * ALPHA ** phi)
    l1 = max(1, round(depth * BASE['L1'] / (3 * BASE['L1'] + BASE['L3'])))
    l3 = max(depth - 3 * l1, l1)
    c1 = max(c_prime, c_prime * round(BASE['C1'] * BETA ** phi / c_prime))
    return dict(C1=c1, C_prime=c_prime, L1=l1, L3=l3)


def arch_kwargs(arch: dict) -> dict:
    """InternImage constructor kwargs of ``(C1, C', L1, L3)``: channels, depths, groups."""
    c1, cp, l1, l3 = arch['C1'], arch['C_prime'], arch['L1'], arch['L3']
    return dict(channels=c1, depths=[l1, l1, l3, l1], groups=[c1 * 2 ** i // cp for i in range(4)])


def _count(kwargs: dict, img_size: int = 224, macs: bool = True) -> tuple[int, int]:
    """(params, MACs at img_size) of internimage_t with ``kwargs`` (1000 classes), built on the meta device. MACs:
    convolutions and linear layers from their shapes, plus the DCNv3 core as the official mmdet ``get_flops.py``
    counts it: ``5 * H * W * 9 * C`` per block."""
    import timm

    import pretrain.models  # noqa: F401  (registers InternImage)

    with torch.device('meta'):
        model = timm.create_model('internimage_t', core_op='DCNv3_pytorch', **kwargs).eval()
    params = sum(p.numel() for p in model.parameters())
    if not macs:
        return params, 0
    macs = []
    hooks = [m.register_forward_hook(lambda m, i, o: macs.append(o.numel() * m.in_features))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    hooks += [m.register_forward_hook(lambda m, i, o: macs.append(o.numel() * m.weight[0].numel()))
              for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.empty(1, 3, img_size, img_size, device='meta'))
    for h in hooks:
        h.remove()
    size, core = img_size // 4, 0
    for i, depth in enumerate(kwargs['depths']):
        core += depth * (size // 2 ** i) ** 2 * kwargs['channels'] * 2 ** i * 9 * 5
    return params, sum(macs) + core


def fit_phi(target_params: float, c_prime: int = BASE['C_prime'], lo: float = -3.0, hi: float = 8.0) -> float:
    """The phi in [lo, hi] whose rounded model's parameter count is nearest ``target_params`` (bisection on the
    continuous phi, then the better of the two neighbouring rounded models)."""
    def params(phi):
        return _count(arch_kwargs(scaled_arch(phi, c_prime)), macs=False)[0]

    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(mid) < target_params else (lo, mid)
    return min((lo, hi), key=lambda p: abs(params(p) - target_params))


def describe(phi: float, c_prime: int = BASE['C_prime'], world_size: int = 8) -> dict:
    """Everything the command prints for ``phi``: the rule's arch, kwargs, params, GMACs, model-state GiB per rank."""
    from pretrain.engine.plan import GiB, model_state_bytes

    arch = scaled_arch(phi, c_prime)
    kwargs = arch_kwargs(arch)
    params, macs = _count(kwargs)
    states = model_state_bytes(params, stage=3, world_size=world_size, precision='bf16', ema=True)
    return dict(phi=phi, arch=arch, kwargs=kwargs, params=params, gmacs_224=macs / 1e9,
                model_states_gib_per_rank=states.total / GiB, world_size=world_size)


def official_position(channels: int, depths: list[int]) -> dict:
    """Where an official size sits against the rule: the phi of its depth and of its width alone, their
    least-squares phi (log space), and its depth and C1 relative to the rule at that phi."""
    depth = 3 * depths[0] + depths[2]
    ld, lw = math.log(depth / 30), math.log(channels / 64)
    phi = (math.log(ALPHA) * ld + math.log(BETA) * lw) / (math.log(ALPHA) ** 2 + math.log(BETA) ** 2)
    return dict(phi_depth=ld / math.log(ALPHA), phi_width=lw / math.log(BETA), phi=phi,
                depth_vs_rule=depth / (30 * ALPHA ** phi) - 1, width_vs_rule=channels / (64 * BETA ** phi) - 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m pretrain scale', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument('--phi', type=float, help='compound-scaling exponent (0: InternImage-T)')
    which.add_argument('--params', type=float, help='target parameter count, e.g. 1e8')
    p.add_argument('--c-prime', type=int, default=BASE['C_prime'], help="channels per group C' (H uses 32)")
    p.add_argument('--world-size', type=int, default=8, help='ranks for the model-state memory per rank')
    p.add_argument('--json', action='store_true')
    args = p.parse_args(argv)
    if args.c_prime < 1:
        p.error(f'--c-prime must be >= 1, got {args.c_prime}')
    phi = args.phi if args.phi is not None else fit_phi(args.params, args.c_prime)
    info = describe(phi, args.c_prime, args.world_size)
    if args.json:
        print(json.dumps(info))
        return 0
    a = info['arch']
    print(f"phi {phi:.3f}: C1 {a['C1']}, C' {a['C_prime']}, L1 {a['L1']}, L3 {a['L3']} "
          f"(D = {3 * a['L1'] + a['L3']})")
    print(f"model: {{name: internimage_t, kwargs: {json.dumps(info['kwargs'])}}}")
    print(f"params {info['params']:,}; {info['gmacs_224']:.2f} GMACs at 224 px; model states "
          f"{info['model_states_gib_per_rank']:.2f} GiB per rank (ZeRO-3, bf16, EMA, {args.world_size} ranks; "
          'activations: python -m pretrain plan CONFIG)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
