"""The DCNv3 module and the small layout helpers of the official InternImage release (same names, same keys)."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.ops import tapconv
from pretrain.ops.function import dcnv3_core

# The official core_op names, mapped to our backends.
CORE_OPS = {"DCNv3": "auto", "DCNv3_pytorch": "pytorch"}


class to_channels_first(nn.Module):  # noqa: N801 - official name
    """NHWC -> NCHW."""

    def forward(self, x):
        return x.permute(0, 3, 1, 2)


class to_channels_last(nn.Module):  # noqa: N801 - official name
    """NCHW -> NHWC."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def build_norm_layer(dim: int, norm_layer: str, in_format: str = "channels_last", out_format: str = "channels_last",
                     eps: float = 1e-6) -> nn.Sequential:
    """Official helper: the norm wrapped in an ``nn.Sequential`` with permutes, so keys are ``.0.`` for a channels-last
    input and ``.1.`` when a permute comes first (LN) — exactly the official state_dict layout."""
    layers: list[nn.Module] = []
    if norm_layer == "BN":
        if in_format == "channels_last":
            layers.append(to_channels_first())
        layers.append(nn.BatchNorm2d(dim))
        if out_format == "channels_last":
            layers.append(to_channels_last())
    elif norm_layer == "LN":
        if in_format == "channels_first":
            layers.append(to_channels_last())
        layers.append(nn.LayerNorm(dim, eps=eps))
        if out_format == "channels_first":
            layers.append(to_channels_first())
    else:
        raise NotImplementedError(f"norm_layer must be 'BN' or 'LN', got {norm_layer!r}")
    return nn.Sequential(*layers)


def build_act_layer(act_layer: str) -> nn.Module:
    """Official helper: 'ReLU' and 'SiLU' in place, 'GELU' exact (erf)."""
    if act_layer == "ReLU":
        return nn.ReLU(inplace=True)
    if act_layer == "SiLU":
        return nn.SiLU(inplace=True)
    if act_layer == "GELU":
        return nn.GELU()
    raise NotImplementedError(f"act_layer must be 'ReLU', 'SiLU' or 'GELU', got {act_layer!r}")


ALIGN_BYTES = 16


def aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself, or a copy (autograd flows back through it) when its data is not ``ALIGN_BYTES``-aligned.
    Under torch.compile / torch.export (fake tensors, no address) ``t`` itself."""
    if t is None or torch.compiler.is_compiling() or t.data_ptr() % ALIGN_BYTES == 0:
        return t
    return t.clone()


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state_dict keys) that hands the kernel 16-byte-aligned weights.

    Under ZeRO-3 a gathered parameter is a view into one flat buffer, so a tensor whose predecessors have odd sizes
    starts at an address cuDNN's vectorised kernels cannot read ("misaligned address" / "unable to find an engine";
    the same packing broke TransformerEngine's LayerNorm, NVIDIA/TransformerEngine#490). A misaligned weight or bias
    is copied for the call; aligned ones (every other case) pass through untouched. Not yet confirmed on a GPU.
    On the CPU, a forward with a weight gradient to compute, on a map smaller than the kernel (or onto at most 4
    output pixels), takes the tap-by-tap weight gradient of :mod:`pretrain.ops.tapconv` (oneDNN falls back to a
    slow GEMM path there; :func:`pretrain.ops.tapconv.use_taps` has the whole rule).
    The trainer turns every ``nn.Conv2d`` of the model it trains into one (:func:`align_convolutions`)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight, bias = aligned(weight), aligned(bias)
        if self.padding_mode == 'zeros':
            return tapconv.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def align_convolutions(model: nn.Module) -> int:
    """Every plain ``nn.Conv2d`` in ``model`` becomes an aligned :class:`Conv2d` in place (its class only: the same
    parameters, keys and outputs), whoever built it: InternImage, PeLK, timm's ConvNeXt, the objectives' decoders.
    Returns how many were changed."""
    changed = 0
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = Conv2d
            changed += 1
    return changed


class CenterFeatureScaleModule(nn.Module):
    """sigmoid(linear(query)): per-group weights mixing the DCN output with the input projection (no parameters)."""

    def forward(self, query, center_feature_scale_proj_weight, center_feature_scale_proj_bias):
        return F.linear(query, weight=center_feature_scale_proj_weight, bias=center_feature_scale_proj_bias).sigmoid()


class DCNv3(nn.Module):
    """DCNv3 layer: ``(N, H, W, C) -> (N, H, W, C)``, parameters and forward as the official ``DCNv3`` module.

    ``backend`` chooses the core: 'auto' (CUDA kernel on GPU, fused kernel on CPU, reference as a fallback), 'cpu',
    'cuda' or 'pytorch'; the official ``core_op`` names map through :data:`CORE_OPS`. All backends share one
    state_dict layout: ``input_proj``, ``dw_conv.0``, ``dw_conv.1.1``, ``offset``, ``mask``, ``output_proj`` and, with
    ``center_feature_scale``, ``center_feature_scale_proj_weight`` ``(group, C)`` / ``_bias`` ``(group,)``.
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3, dw_kernel_size: int | None = None, stride: int = 1,
                 pad: int = 1, dilation: int = 1, group: int = 4, offset_scale: float = 1.0, act_layer: str = "GELU",
                 norm_layer: str = "LN", center_feature_scale: bool = False, remove_center: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if channels % group != 0:
            raise ValueError(f"channels must be divisible by group, got {channels} and {group}")
        if stride != 1:
            # The official module computes offsets at the input resolution, so only stride 1 is consistent.
            raise ValueError("the DCNv3 module supports stride 1 only (as the official one); call dcnv3_core directly "
                             "for strided sampling")
        if remove_center and kernel_size % 2 == 0:
            raise ValueError("remove_center needs an odd kernel_size")
        _d_per_group = channels // group
        if not math.log2(_d_per_group).is_integer():
            warnings.warn(f"DCNv3: group_channels={_d_per_group} is not a power of 2; all backends support it",
                          stacklevel=2)
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.offset_scale = offset_scale
        self.channels = channels
        self.kernel_size = kernel_size
        self.dw_kernel_size = dw_kernel_size
        self.stride = stride
        self.dilation = dilation
        self.pad = pad
        self.group = group
        self.group_channels = channels // group
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        self.backend = CORE_OPS.get(backend, backend)
        points = kernel_size * kernel_size - self.remove_center

        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=dw_kernel_size, stride=1, padding=(dw_kernel_size - 1) // 2,
                      groups=channels),
            build_norm_layer(channels, norm_layer, "channels_first", "channels_last"),
            build_act_layer(act_layer),
        )
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self._reset_parameters()
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros((group, channels), dtype=torch.float))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group, dtype=torch.float))
            self.center_feature_scale_module = CenterFeatureScaleModule()

    def _reset_parameters(self):
        """Official init: zero offsets and mask logits (uniform softmax), xavier projections, zero biases."""
        nn.init.constant_(self.offset.weight.data, 0.0)
        nn.init.constant_(self.offset.bias.data, 0.0)
        nn.init.constant_(self.mask.weight.data, 0.0)
        nn.init.constant_(self.mask.bias.data, 0.0)
        nn.init.xavier_uniform_(self.input_proj.weight.data)
        nn.init.constant_(self.input_proj.bias.data, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight.data)
        nn.init.constant_(self.output_proj.bias.data, 0.0)

    def _offset_and_mask_fusable(self) -> bool:
        from torch.nn.modules import module as nn_module
        mods = (self.offset, self.mask)
        if any(type(m) is not nn.Linear or m.bias is None or m._forward_hooks or m._forward_pre_hooks
               or hasattr(m.weight, 'ds_id') for m in mods):
            return False
        return not (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)

    def _offset_and_mask(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``self.offset(x1)`` and ``self.mask(x1)`` (mask logits) as one matmul on the concatenated weights, split.

        The two projections share their input, so one GEMM replaces two and, under autocast, ``x1`` is cast once
        instead of twice (with each cast's backward): 13 operators and 8 kernels fewer per DCNv3 layer in a bf16
        training step (benchmarks/op_count.py). Same products, each output column a dot product over the same
        ``C`` inputs; the gradient of ``x1`` is one GEMM over both projections instead of two summed.

        Only for two plain ``nn.Linear`` that nothing observes: with a forward hook on either (ZeRO-3's, which
        gathers the partitioned weights; a FLOP counter's; a feature extractor's), a global module hook, or a
        replaced module (LoRA, quantized), both modules are called, so whatever hooks or wraps them still runs."""
        if not self._offset_and_mask_fusable():
            return self.offset(x1), self.mask(x1)
        wo, wm, bo, bm = self.offset.weight, self.mask.weight, self.offset.bias, self.mask.bias
        both = F.linear(x1, torch.cat((wo, wm)), torch.cat((bo, bm)))
        return torch.split(both, (wo.shape[0], wm.shape[0]), dim=-1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``input (N, H, W, C)`` -> ``(N, H, W, C)``."""
        n, h, w, _ = input.shape
        x = self.input_proj(input)
        x_proj = x
        x1 = self.dw_conv(input.permute(0, 3, 1, 2))
        offset, mask = self._offset_and_mask(x1)
        mask = F.softmax(mask.reshape(n, h, w, self.group, -1), -1).reshape(n, h, w, -1)
        x = dcnv3_core(x, offset, mask, self.kernel_size, self.kernel_size, self.stride, self.stride, self.pad,
                       self.pad, self.dilation, self.dilation, self.group, self.group_channels, self.offset_scale,
                       self.remove_center, backend=self.backend)
        if self.center_feature_scale:
            scale = self.center_feature_scale_module(x1, self.center_feature_scale_proj_weight,
                                                     self.center_feature_scale_proj_bias)
            # (N, H, W, G) -> (N, H, W, G*D): one scalar per group
            scale = scale[..., None].expand(n, h, w, self.group, self.group_channels).reshape(n, h, w, self.channels)
            x = x * (1 - scale) + x_proj * scale
        return self.output_proj(x)


# Official alias: the pure-PyTorch module has the same keys.
def DCNv3_pytorch(*args, **kwargs) -> DCNv3:  # noqa: N802 - official name
    kwargs["backend"] = "pytorch"
    return DCNv3(*args, **kwargs)
