"""2-D convolution whose weight gradient is summed tap by tap, for the small maps where oneDNN's is slow.

On the CPU, oneDNN computes a convolution's weight gradient with its JIT kernels only while the map is at least
as large as the kernel; on smaller maps (the last stages of a 32 or 64 px model: 2 x 2 and 1 x 1 under InternImage's
3 x 3 depth-wise kernel, 4 x 4 and below under ConvNeXt's 7 x 7) it falls back to a GEMM-based implementation
(``x64:gemm:jit`` in ``ONEDNN_VERBOSE``): a depth-wise layer's forward + backward there took 2-33x the time it takes
with the weight gradient summed tap by tap, a dense strided one up to 2.3x (``benchmarks/small_conv.py``,
docs/PERFORMANCE.md). Forward and input gradient stay oneDNN's (fast on every size).

:func:`conv2d` runs ``F.conv2d(x, weight, bias, stride, padding, groups=groups)`` through :class:`_TapConv2d` when
:func:`use_taps` says so, else plain. The weight gradient sums, per kernel tap ``(i, j)``, the output gradient times
the input window that tap reads (one ``(O x M) @ (M x C)`` product for a dense convolution, one multiply-and-sum
for a depth-wise one, ``M = N * Ho * Wo``); taps that only ever read padding get an exact zero without work. Same
values as ``F.conv2d``'s autograd up to summation order. Reduced-precision tensors run in their own dtype, or, under
a ``TorchFunctionMode`` that declares ``fp32_products = True`` (the engine's ``Fp32Products``,
``deepspeed.cpu_bf16_products``), in float32 with the output cast back, the backward included (which runs outside
the mode).

``PRETRAIN_TAP_WEIGHT_GRAD=0`` in the environment (read at import) or ``ENABLED = False`` turns the path off.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ['ENABLED', 'MAX_TAPS', 'MAX_TAP_OUTPUT_PIXELS', 'conv2d', 'dense_or_depthwise', 'fp32_products_active',
           'use_taps', 'weight_grad_by_taps']

ENABLED = os.environ.get('PRETRAIN_TAP_WEIGHT_GRAD', '1') != '0'
# The rule, measured with benchmarks/small_conv.py (docs/PERFORMANCE.md): taps when the input map is smaller than the
# kernel in either dimension, or the output has at most this many pixels (strided downsampling onto 2 x 2 or 1 x 1),
# for kernels of at most MAX_TAPS taps (one Python-level product per tap; ConvNeXt's 7 x 7 is the largest measured).
MAX_TAP_OUTPUT_PIXELS = 4
MAX_TAPS = 49
_REDUCED = (torch.float16, torch.bfloat16)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def use_taps(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
             bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`conv2d` takes the tap-by-tap weight gradient: on the CPU, with a weight gradient to compute
    (grad mode on, the weight requiring it; whether the module is in training mode does not matter), not under
    torch.compile or CPU autocast, with input, weight and bias of one dtype, for a dense or a depth-wise (one filter
    per channel) convolution with integer padding, no dilation and at most ``MAX_TAPS`` taps, on a map smaller than
    the kernel or onto an output of at most ``MAX_TAP_OUTPUT_PIXELS`` pixels."""
    if not (ENABLED and x.device.type == 'cpu' and weight.device.type == 'cpu' and x.ndim == 4
            and torch.is_grad_enabled() and weight.requires_grad):
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled('cpu'):
        return False
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    if isinstance(padding, str) or _pair(dilation) != (1, 1) or weight.shape[-2] * weight.shape[-1] > MAX_TAPS:
        return False
    if not dense_or_depthwise(x.shape[1], weight.shape, groups):
        return False
    (kh, kw), (sh, sw), (ph, pw) = weight.shape[-2:], _pair(stride), _pair(padding)
    height, width = x.shape[-2:]
    out_pixels = _output_size(height, kh, sh, ph) * _output_size(width, kw, sw, pw)
    return height < kh or width < kw or out_pixels <= MAX_TAP_OUTPUT_PIXELS


def weight_grad_by_taps(x: torch.Tensor, grad_out: torch.Tensor, weight_shape: torch.Size, stride, padding,
                        groups: int) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, w, stride=stride, padding=padding, groups=groups)`` with respect to ``w``
    (shape ``weight_shape``), given the output gradient ``grad_out``; ``groups`` is 1 or the channel count."""
    o, _, kh, kw = weight_shape
    n, c, height, width = x.shape
    if not dense_or_depthwise(c, weight_shape, groups):
        raise ValueError(f'weight_grad_by_taps: dense (groups=1) or depth-wise (groups = channels = {c}, one filter '
                         f'each) only, got groups={groups} and weight {tuple(weight_shape)}')
    ho, wo = grad_out.shape[-2:]
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # NHWC, zero-padded (a copy: also a layout change)
    g = grad_out.permute(0, 2, 3, 1)  # (N, Ho, Wo, O)
    depthwise = groups > 1
    g2 = None if depthwise else g.reshape(-1, o)
    out = x.new_zeros(weight_shape)
    for i in _reachable_taps(kh, sh, ph, height, ho):
        for j in _reachable_taps(kw, sw, pw, width, wo):
            window = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]  # (N, Ho, Wo, C)
            if depthwise:
                out[:, 0, i, j] = (g * window).sum((0, 1, 2))
            else:
                out[:, :, i, j] = g2.t() @ window.reshape(-1, c)
    return out


def dense_or_depthwise(channels: int, weight_shape, groups: int) -> bool:
    """Whether a convolution of ``channels`` input channels with a ``weight_shape`` weight in ``groups`` groups is
    dense (``groups == 1``) or depth-wise (one filter per channel): the two kinds the taps compute."""
    return groups == 1 or (groups == channels == weight_shape[0] and weight_shape[1] == 1)


def _reachable_taps(kernel: int, stride: int, pad: int, size: int, out_size: int) -> list[int]:
    """The kernel taps of one axis through which some output position reads a real pixel (not padding)."""
    return [tap for tap in range(kernel) if any(0 <= tap + stride * r - pad < size for r in range(out_size))]


def _crop(weight: torch.Tensor, in_size, out_size, stride, padding) -> tuple[torch.Tensor, tuple[int, int]]:
    """``weight`` cut to the taps that reach a real pixel, with the padding that keeps every output position, when
    that cut is symmetric (stride 1, 'same' padding: a 7 x 7 kernel on a 1 x 1 map is its centre tap); else
    ``weight`` and ``padding``. The convolution is the same (the cut taps only ever multiply zeros)."""
    cut = []
    for axis in (0, 1):
        k = weight.shape[2 + axis]
        taps = _reachable_taps(k, stride[axis], padding[axis], in_size[axis], out_size[axis])
        first = taps[0] if taps else 0
        if not taps or taps[-1] != k - 1 - first or first > padding[axis]:
            return weight, padding
        cut.append(first)
    (a, b), (kh, kw) = cut, weight.shape[-2:]
    return weight[..., a:kh - a, b:kw - b], (padding[0] - a, padding[1] - b)


class _TapConv2d(torch.autograd.Function):
    """``F.conv2d`` forward and input gradient (with the kernel cut to the taps that reach a pixel, where that cut
    is symmetric: oneDNN's forward with a bias on a map smaller than the kernel took 29 ms, the cut one 0.2 ms);
    the weight gradient from :func:`weight_grad_by_taps`."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups):
        in_size = x.shape[-2:]
        out_size = [_output_size(in_size[a], weight.shape[2 + a], stride[a], padding[a]) for a in (0, 1)]
        cut, cut_padding = _crop(weight, in_size, out_size, stride, padding)
        ctx.save_for_backward(x, cut)
        ctx.conf = (stride, padding, cut_padding, groups, bias is not None, weight.shape)
        return F.conv2d(x, cut, bias, stride, cut_padding, 1, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, cut = ctx.saved_tensors
        stride, padding, cut_padding, groups, has_bias, weight_shape = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, cut, grad_out, stride, cut_padding, 1, groups)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad_by_taps(x, grad_out, weight_shape, stride, padding, groups)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``, with the tap-by-tap weight gradient where
    :func:`use_taps` holds (reduced-precision tensors under an fp32-products mode then computed in float32, output in
    ``x.dtype``)."""
    if not use_taps(x, weight, stride, padding, dilation, groups, bias):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    dtype = x.dtype
    if dtype in _REDUCED and fp32_products_active():
        x, weight = x.float(), weight.float()
        bias = bias.float() if bias is not None else None
    return _TapConv2d.apply(x, weight, bias, _pair(stride), _pair(padding), groups).to(dtype)


def fp32_products_active() -> bool:
    """Whether a ``TorchFunctionMode`` that declares ``fp32_products = True`` is active (the engine's
    ``pretrain.engine.cpu_bf16.Fp32Products``: bf16 CPU products run on fp32 operands)."""
    return any(getattr(mode, 'fp32_products', False) for mode in torch.overrides._get_current_function_mode_stack())
