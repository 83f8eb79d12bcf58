"""PeLK: large-kernel ConvNets with peripheral convolution (Chen et al., CVPR 2024, arXiv 2403.07589).

No official code exists; this follows the paper as summarised in ``shared/spec/objectives-and-models.md`` §C, and
docs/MODELS.md lists every detail the paper leaves open and what we chose. In short:

* **Peripheral convolution** (:func:`sharing_grid`, :class:`PartialPeripheralConv`): a depth-wise k x k kernel is
  built from a k' x k' parameter tensor by a separable sharing grid: cells of width 1 within the central
  ``center_size`` (5, the paper's default), then 2, 4, 8, ... outwards; the outermost cell takes the remainder
  (51 -> 13 parameters per axis, 6.5% of the dense count). Expanding is an ``index_select`` per axis, so autograd
  sums the gradients of the taps that share a parameter.
* **Kernel-wise positional embedding** (KPE): ``h (C', k, k)`` shared by the blocks of a stage, added to the input
  under each tap (Eq. 3). ``kpe='valid'`` (default) adds it only under taps that fall inside the image, which
  makes it a position-dependent bias; ``'all'`` is Eq. 3 read literally with zero-padded taps receiving ``h`` too,
  a per-channel constant. Both cost O(k^2) per channel (prefix sums), not a convolution.
* **Partial peripheral convolution**: the first ``int(3/8 * C)`` channels go through it, the rest pass unchanged.
* **Architecture**: ConvNeXt/SLaK macro design: 4x4 stride-4 stem + LayerNorm, per stage LayerNorm + 2x2 stride-2
  downsampling, blocks ``x + drop_path(gamma * MLP(LN(partial_peripheral_conv(x))))`` (layer scale 1e-6, MLP 4x),
  average pool + LayerNorm + Linear head. Widths are SLaK's 1.3x ConvNeXt widths.
* The large depth-wise convolution runs through :func:`pretrain.ops.dwconv.dwconv2d` (FFT or native, chosen by the
  rule measured in ``benchmarks/large_kernel.py``; ``conv_impl`` forces one).

Layouts: images NCHW ``(B, 3, H, W)``; blocks work channels-last ``(B, H', W', C)``; ``forward_features`` and
``forward_intermediates`` return NCHW (views, no copy). Dynamic sparsity (SLaK prune and grow) is a training
callback, ``pretrain.engine.sparsity``, not part of the model.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, NormMlpClassifierHead, trunc_normal_
from timm.models import generate_default_cfgs, register_model, register_notrace_module
from timm.models._features import feature_take_indices

from pretrain.models.factory import build_staged, set_grad_checkpointing
from pretrain.ops.dwconv import IMPLS, dwconv2d

__all__ = ['PeLK', 'PartialPeripheralConv', 'sharing_grid', 'kpe_bias', 'KPE_MODES', 'MODEL_ARGS']

KPE_MODES = ('valid', 'all', 'none')


def sharing_grid(kernel_size: int, center_size: int = 5, base: int = 2) -> tuple[int, ...]:
    """The symmetric sharing grid ``S = [s_-r .. s_0 .. s_r]`` (cell widths along one axis, ``sum(S) == k``).

    Cells with ``|i| <= center_size // 2`` have width 1; further out widths grow as ``base**(|i| - r_c)`` while they
    fit, and the outermost cell takes what is left (paper Eq. 2 and its examples: 31 -> [7,4,2,1,1,1,1,1,2,4,7],
    51 -> half-grid [9,8,4,2,1,1,1], 33 -> [8,4,2,1,1,1,...]). ``center_size >= kernel_size`` gives a dense kernel.
    """
    if kernel_size < 1 or kernel_size % 2 == 0 or center_size < 1 or center_size % 2 == 0:
        raise ValueError(f'kernel_size and center_size must be odd and positive, got {kernel_size}, {center_size}')
    half = (kernel_size + 1) // 2  # taps from the centre outwards, centre included
    cells = [1] * min(center_size // 2 + 1, half)
    total, exponent = len(cells), 1
    while total < half:
        width = min(base ** exponent, half - total)
        cells.append(width)
        total += width
        exponent += 1
    return tuple(cells[:0:-1] + cells)


def kpe_bias(weight: torch.Tensor, kpe: torch.Tensor, height: int, width: int, mode: str = 'valid') -> torch.Tensor:
    """What the KPE adds to a depth-wise 'same' convolution's output: ``sum_taps w(i,j) * h(i,j)``.

    ``weight (C, 1, k, k)``, ``kpe (C, k, k)``. ``mode='valid'`` sums only the taps that fall inside the
    ``height x width`` map at each output position (a ``(C, height, width)`` map, from 2-D prefix sums of
    ``w * h``); ``'all'`` sums every tap (a ``(C, 1, 1)`` constant). Accumulated in float32 at least, returned in
    ``weight.dtype``.
    """
    compute = torch.promote_types(weight.dtype, torch.float32)
    prod = weight[:, 0].to(compute) * kpe.to(compute)
    if mode == 'all':
        return prod.sum((-2, -1))[:, None, None].to(weight.dtype)
    if mode != 'valid':
        raise ValueError(f"kpe mode must be 'valid' or 'all', got {mode!r}")
    kh, kw = prod.shape[-2:]
    # csum[:, a, b] = sum of prod[:, :a, :b]
    csum = F.pad(prod.cumsum(-2).cumsum(-1), (1, 0, 1, 0))

    def tap_range(size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Output position y reads input y + i - k//2 through tap i: valid taps are [k//2 - y, k//2 + size - y).
        pos = torch.arange(size, device=prod.device)
        return (k // 2 - pos).clamp(min=0), (k // 2 + size - pos).clamp(max=k)

    r0, r1 = tap_range(height, kh)
    c0, c1 = tap_range(width, kw)
    rows_hi, rows_lo = csum[:, r1], csum[:, r0]  # (C, H, kw + 1)
    out = rows_hi[:, :, c1] - rows_lo[:, :, c1] - rows_hi[:, :, c0] + rows_lo[:, :, c0]
    return out.to(weight.dtype)


@register_notrace_module  # FX keeps it as one call: dwconv2d chooses FFT or native from the shapes
class PartialPeripheralConv(nn.Module):
    """``(B, H, W, C)`` -> ``(B, H, W, C)``: the first ``conv_channels`` channels through a depth-wise peripheral
    convolution (k x k kernel from ``weight (C', 1, k', k')`` by :func:`sharing_grid`, ``bias (C',)``, plus the
    KPE passed to ``forward``), the other channels unchanged."""

    def __init__(self, dim: int, kernel_size: int, center_size: int = 5, conv_ratio: float = 3 / 8,
                 kpe_mode: str = 'valid', conv_impl: str = 'auto'):
        super().__init__()
        if conv_impl not in IMPLS:
            raise ValueError(f'conv_impl must be one of {IMPLS}, got {conv_impl!r}')
        if kpe_mode not in KPE_MODES:
            raise ValueError(f'kpe must be one of {KPE_MODES}, got {kpe_mode!r}')
        self.conv_channels = int(dim * conv_ratio)
        if not 0 < self.conv_channels <= dim:
            raise ValueError(f'conv_ratio {conv_ratio} leaves {self.conv_channels} of {dim} channels to convolve')
        self.kernel_size = kernel_size
        self.grid = sharing_grid(kernel_size, center_size)
        self.cell_of_tap = tuple(a for a, width in enumerate(self.grid) for _ in range(width))
        self.kpe_mode = kpe_mode
        self.conv_impl = conv_impl
        self.weight = nn.Parameter(torch.empty(self.conv_channels, 1, len(self.grid), len(self.grid)))
        self.bias = nn.Parameter(torch.zeros(self.conv_channels))
        self._index: dict[torch.device, torch.Tensor] = {}  # not a buffer: nothing to save, meta-device safe
        trunc_normal_(self.weight, std=0.02)

    def _tap_index(self, device: torch.device) -> torch.Tensor:
        if device not in self._index:
            self._index[device] = torch.tensor(self.cell_of_tap, dtype=torch.long, device=device)
        return self._index[device]

    def expanded_weight(self) -> torch.Tensor:
        """The dense depth-wise kernel ``(C', 1, k, k)``: ``w[.., x, y] = weight[.., cell(x), cell(y)]``."""
        index = self._tap_index(self.weight.device)
        return self.weight.index_select(2, index).index_select(3, index)

    def forward(self, x: torch.Tensor, kpe: torch.Tensor | None = None) -> torch.Tensor:
        g = self.conv_channels
        height, width = x.shape[1:3]
        weight = self.expanded_weight()
        y = dwconv2d(x[..., :g].permute(0, 3, 1, 2), weight, self.bias, impl=self.conv_impl)
        if kpe is not None and self.kpe_mode != 'none':
            y = y + kpe_bias(weight, kpe, height, width, self.kpe_mode).to(y.dtype)
        return torch.cat([y.permute(0, 2, 3, 1), x[..., g:]], dim=-1)

    def extra_repr(self) -> str:
        return (f'conv_channels={self.conv_channels}, kernel_size={self.kernel_size}, grid={list(self.grid)}, '
                f'kpe={self.kpe_mode!r}, conv_impl={self.conv_impl!r}')


class PeLKBlock(nn.Module):
    """``(B, H, W, C)`` -> same: ``x + drop_path(gamma * MLP(LN(partial_peripheral_conv(x, kpe))))``."""

    def __init__(self, dim: int, kernel_size: int, center_size: int = 5, conv_ratio: float = 3 / 8,
                 kpe_mode: str = 'valid', conv_impl: str = 'auto', mlp_ratio: float = 4.0,
                 ls_init_value: float | None = 1e-6, drop_path: float = 0.0):
        super().__init__()
        self.conv = PartialPeripheralConv(dim, kernel_size, center_size, conv_ratio, kpe_mode, conv_impl)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, kpe: torch.Tensor | None = None) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv(x, kpe)))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y)


class Downsample(nn.Module):
    """``(B, H, W, C_in)`` -> ``(B, H/2, W/2, C_out)``: LayerNorm, then a 2x2 stride-2 convolution."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_chs, eps=1e-6)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Stem(nn.Module):
    """``(B, in_chans, H, W)`` NCHW -> ``(B, H/4, W/4, C)`` NHWC: a 4x4 stride-4 convolution, then LayerNorm."""

    def __init__(self, in_chans: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chs, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(out_chs, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class PeLKStage(nn.Module):
    """Downsampling (stages 1..3), then ``depth`` blocks sharing one KPE ``kpe (C', k, k)``; NHWC in and out."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, kernel_size: int, center_size: int,
                 conv_ratio: float, kpe_mode: str, conv_impl: str, drop_path_rates: Sequence[float],
                 mlp_ratio: float, ls_init_value: float | None, downsample: bool):
        super().__init__()
        self.downsample = Downsample(in_chs, out_chs) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([
            PeLKBlock(out_chs, kernel_size, center_size, conv_ratio, kpe_mode, conv_impl, mlp_ratio, ls_init_value,
                      drop_path_rates[j])
            for j in range(depth)])
        conv_channels = self.blocks[0].conv.conv_channels
        use_kpe = kpe_mode != 'none'
        self.kpe = nn.Parameter(torch.empty(conv_channels, kernel_size, kernel_size)) if use_kpe else None
        if self.kpe is not None:
            trunc_normal_(self.kpe, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            x = blk(x, self.kpe)
        return x


def _per_stage(value, name: str, n: int) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * n
    if len(values) != n:
        raise ValueError(f'{name} needs one value per stage ({n}), got {list(values)}')
    return values


class PeLK(nn.Module):
    """PeLK classifier / backbone. Input ``(B, in_chans, H, W)``, H and W multiples of 32; ``forward`` returns
    ``(B, num_classes)``. ``forward_features``: ``(B, dims[-1], H/32, W/32)`` NCHW; ``forward_head``: average pool,
    LayerNorm, (dropout,) Linear.

    Args beyond the timm ones: ``dims`` / ``depths`` / ``kernel_sizes`` per stage; ``center_size`` (int or per
    stage) the fine-grained centre of the sharing grid; ``conv_ratio`` the peripheral share of the channels;
    ``kpe`` 'valid' | 'all' | 'none'; ``conv_impl`` 'auto' | 'native' | 'fft'; ``ls_init_value`` layer scale
    (0: none); ``head_init_scale`` multiplies the initial classifier weights.
    """

    block_layout = 'NHWC'  # its blocks take channels-last input (pretrain.objectives.masking.block_layout)

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Sequence[int] = (3, 3, 9, 3),
            dims: Sequence[int] = (124, 249, 499, 998),
            kernel_sizes: Sequence[int] = (51, 49, 47, 13),
            center_size: int | Sequence[int] = 5,
            conv_ratio: float = 3 / 8,
            kpe: str = 'valid',
            conv_impl: str = 'auto',
            mlp_ratio: float = 4.0,
            ls_init_value: float | None = 1e-6,
            head_init_scale: float = 1.0,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        num_stages = len(depths)
        dims = _per_stage(dims, 'dims', num_stages)
        kernel_sizes = _per_stage(kernel_sizes, 'kernel_sizes', num_stages)
        center_sizes = _per_stage(center_size, 'center_size', num_stages)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stem = Stem(in_chans, dims[0])
        # Computed on the CPU explicitly: the model may be built under a meta device context.
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            self.stages.append(PeLKStage(
                dims[i - 1] if i else dims[0], dims[i], depths[i], kernel_sizes[i], center_sizes[i], conv_ratio, kpe,
                conv_impl, dpr[sum(depths[:i]):sum(depths[:i + 1])], mlp_ratio, ls_init_value, downsample=i > 0))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.num_features = dims[-1]
        self.head = NormMlpClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer='layernorm2d')  # timm LayerNorm2d, eps 1e-6
        self.head_hidden_size = self.head.num_features
        self.apply(self._init_weights)
        if isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # ConvNeXt/SLaK: trunc-normal(.02) convs and linears, zero biases (peripheral kernels init themselves).
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------------------
    # timm interface
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The KPEs, like a ViT's position embedding."""
        return {f'stages.{i}.kpe' for i, s in enumerate(self.stages) if s.kpe is not None}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Stem, then blocks in forward order (a stage's downsampling and KPE join its first block), then the head."""
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(?:downsample|kpe)', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Non-reentrant activation checkpointing of every ``every``-th block (global block index ``% every == 0``),
        by :func:`pretrain.models.factory.set_grad_checkpointing` (the blocks' forward wrapped per instance)."""
        set_grad_checkpointing(self, enable, every=every)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """New ``head.fc`` (``Linear(head_hidden_size, num_classes)``, Identity if 0); ``reset_other`` also drops the
        head norm."""
        self.num_classes = num_classes
        p = next(self.stem.parameters())
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features,
                        device=p.device, dtype=p.dtype)
        self.head_hidden_size = self.head.num_features
        if isinstance(self.head.fc, nn.Linear):
            self._init_weights(self.head.fc)

    def _stages_forward(self, x: torch.Tensor, max_stage: int | None = None) -> list[torch.Tensor]:
        """Stem + stages; each stage's NHWC output ``(B, H/4/2^i, W/4/2^i, dims[i])``."""
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(x)
            if max_stage is not None and i >= max_stage:
                break
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> the last stage's map, NCHW ``(B, dims[-1], H/32, W/32)``."""
        return self._stages_forward(x)[-1].permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NCHW map -> ``(B, num_classes)``, or ``(B, head_hidden_size)`` with ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def __prepare_scriptable__(self):
        # An explicit opt-out (torch.jit.script calls this first): torch 2.14 deprecates scripting, and the
        # peripheral convolution's shape-dependent choice is not scriptable; torch.compile / ONNX are supported.
        raise RuntimeError('PeLK does not support TorchScript (torch.jit.script); use torch.compile, torch.export or '
                           'the ONNX export instead (docs/MODELS.md)')

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-stage outputs, as for timm's ConvNeXt (``norm`` is accepted; the model has no pre-head norm).

        ``indices``: last n stages if int, all if None, these stages if a list; ``output_fmt`` 'NCHW' or 'NHWC'.
        Returns the intermediates, or ``(forward_features(x), intermediates)``.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        outs = self._stages_forward(x, max_stage=max_index if (stop_early and intermediates_only) else None)
        intermediates = [outs[i] if output_fmt == 'NHWC' else outs[i].permute(0, 3, 1, 2) for i in take_indices]
        if intermediates_only:
            return intermediates
        return outs[-1].permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last requested one and (optionally, or when stages were dropped) the head."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '', reset_other=True)
        return take_indices


def _cfg(**kwargs) -> dict:
    # No released weights; eval transform of ConvNeXt/SLaK (crop 0.875, bicubic).
    return {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875,
            'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
            'first_conv': 'stem.conv', 'classifier': 'head.fc', **kwargs}


default_cfgs = generate_default_cfgs({'pelk_t': _cfg(), 'pelk_s': _cfg(), 'pelk_b': _cfg()})

# Per-size constructor arguments: paper depths and kernels, SLaK's 1.3x widths, SLaK's drop-path recipe values.
MODEL_ARGS: dict[str, dict] = {
    'pelk_t': dict(depths=(3, 3, 9, 3), dims=(124, 249, 499, 998), kernel_sizes=(51, 49, 47, 13),
                   drop_path_rate=0.1),
    'pelk_s': dict(depths=(3, 3, 27, 3), dims=(124, 249, 499, 998), kernel_sizes=(51, 49, 47, 13),
                   drop_path_rate=0.4),
    'pelk_b': dict(depths=(3, 3, 27, 3), dims=(166, 332, 665, 1331), kernel_sizes=(51, 49, 47, 13),
                   drop_path_rate=0.5),
}


def _create(variant: str, pretrained: bool, kwargs: dict) -> PeLK:
    return build_staged(PeLK, variant, pretrained, MODEL_ARGS[variant], kwargs)


@register_model
def pelk_t(pretrained: bool = False, **kwargs) -> PeLK:
    """PeLK-T: depths 3-3-9-3, kernels 51/49/47/13, widths 124-998."""
    return _create('pelk_t', pretrained, kwargs)


@register_model
def pelk_s(pretrained: bool = False, **kwargs) -> PeLK:
    """PeLK-S: depths 3-3-27-3, kernels 51/49/47/13, widths 124-998."""
    return _create('pelk_s', pretrained, kwargs)


@register_model
def pelk_b(pretrained: bool = False, **kwargs) -> PeLK:
    """PeLK-B: depths 3-3-27-3, kernels 51/49/47/13, widths 166-1331."""
    return _create('pelk_b', pretrained, kwargs)
