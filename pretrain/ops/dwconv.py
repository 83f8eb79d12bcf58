"""Depth-wise 2-D convolution with large odd kernels, stride 1, 'same' zero padding: native or FFT.

``dwconv2d(x, weight, bias, impl)`` equals ``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` for
``x (B, C, H, W)`` and ``weight (C, 1, kh, kw)`` with odd ``kh``/``kw``, whatever the implementation:

* every implementation first crops the kernel to the taps that can reach an input pixel (at most ``2H-1`` x
  ``2W-1``): PeLK's 47x47 kernel on a 14x14 map is a 27x27 one, a third of the work, with identical results;
* ``'native'``: ``F.conv2d(groups=C)`` in channels-last memory format (on the CPU oneDNN runs it 4-20x faster
  than the NCHW path for kernels above 7x7, see ``benchmarks/large_kernel.py``); bf16/fp16 CPU tensors are
  convolved in float32 (the CPU's reduced-precision depth-wise kernels were 50-100x slower than float32 here);
* ``'fft'``: ``rfft2`` of the input and the flipped kernel at a 7-smooth size >= ``H + kh // 2`` (no wrap-around
  reaches the kept window), product, ``irfft2``, crop. Computed in float32 (float64 stays float64) and cast back;
* ``'auto'``: :func:`choose_impl`, the rule measured with ``benchmarks/large_kernel.py`` (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.ops.modules import aligned

__all__ = ['IMPLS', 'dwconv2d', 'dwconv2d_native', 'dwconv2d_fft', 'choose_impl', 'crop_kernel', 'fft_size']

IMPLS = ('auto', 'native', 'fft')
# The 'auto' rule, from benchmarks/large_kernel.py --sweep on the CPU (docs/PERFORMANCE.md). With gradients the FFT
# wins from 13x13 (cropped) on every map size (oneDNN's depth-wise weight gradient is slow); forward-only the native
# kernel wins up to 15x15, and on maps below 28x28 at every size.
FFT_MIN_TAPS_TRAIN = 13 * 13
FFT_MIN_TAPS_INFER = 17 * 17
FFT_MIN_PIXELS_INFER = 28 * 28
_REDUCED = (torch.float16, torch.bfloat16)


def crop_kernel(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre ``min(kh, 2*height-1) x min(kw, 2*width-1)`` of ``weight (C, 1, kh, kw)``: the only taps that
    ever meet an input pixel of a ``height x width`` map under 'same' padding (a view, no copy)."""
    kh, kw = weight.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f'kernel size must be odd, got {kh}x{kw}')
    ch, cw = min(kh, 2 * height - 1), min(kw, 2 * width - 1)
    top, left = (kh - ch) // 2, (kw - cw) // 2
    return weight[..., top:top + ch, left:left + cw]


def choose_impl(kernel_h: int, kernel_w: int, height: int, width: int, needs_grad: bool = True) -> str:
    """'fft' or 'native' for a (kernel_h x kernel_w) kernel on a (height x width) map (the kernel cropped first),
    for a forward that will be differentiated (``needs_grad``) or not."""
    taps = min(kernel_h, 2 * height - 1) * min(kernel_w, 2 * width - 1)
    if needs_grad:
        return 'fft' if taps >= FFT_MIN_TAPS_TRAIN else 'native'
    return 'fft' if taps >= FFT_MIN_TAPS_INFER and height * width >= FFT_MIN_PIXELS_INFER else 'native'


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.ndim != 4 or weight.ndim != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f'expected x (B, C, H, W) and weight (C, 1, kh, kw), got {tuple(x.shape)} and '
                         f'{tuple(weight.shape)}')


def dwconv2d_native(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(groups=C)`` on the cropped kernel, channels-last; the output is channels-last ``(B, C, H, W)``
    in ``x.dtype``."""
    _check(x, weight)
    dtype = x.dtype
    w = crop_kernel(weight, *x.shape[-2:])
    if x.device.type == 'cpu' and dtype in _REDUCED:
        x, w, bias = x.float(), w.float(), bias.float() if bias is not None else None
    x = x.contiguous(memory_format=torch.channels_last)
    w = aligned(w.contiguous(memory_format=torch.channels_last))  # ZeRO-3 views (pretrain.ops.modules.Conv2d)
    return F.conv2d(x, w, aligned(bias), padding=(w.shape[-2] // 2, w.shape[-1] // 2), groups=x.shape[1]).to(dtype)


def fft_size(n: int) -> int:
    """The smallest integer >= n with no prime factor above 7 (fast for pocketfft and cuFFT)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def dwconv2d_fft(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same convolution through ``torch.fft``; the output ``(B, C, H, W)`` is contiguous, in ``x.dtype``."""
    _check(x, weight)
    h, w_ = x.shape[-2:]
    k = crop_kernel(weight, h, w_)
    rh, rw = k.shape[-2] // 2, k.shape[-1] // 2
    # Circular convolution of length n >= H + r keeps output rows r .. r+H-1 free of wrap-around.
    size = (fft_size(h + rh), fft_size(w_ + rw))
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = torch.fft.rfft2(x.to(compute), s=size)
    kf = torch.fft.rfft2(k[:, 0].flip(-2, -1).to(compute), s=size)  # correlation = convolution with the flip
    y = torch.fft.irfft2(xf * kf, s=size)[..., rh:rh + h, rw:rw + w_]
    if bias is not None:
        y = y + bias.to(compute).view(1, -1, 1, 1)
    return y.to(x.dtype)


def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             impl: str = 'auto') -> torch.Tensor:
    """Depth-wise 'same' convolution of ``x (B, C, H, W)`` with ``weight (C, 1, kh, kw)`` (odd sizes) and optional
    ``bias (C,)`` by ``impl`` ('auto' | 'native' | 'fft'); returns ``(B, C, H, W)`` in ``x.dtype``."""
    if impl == 'auto':
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        impl = choose_impl(*weight.shape[-2:], *x.shape[-2:], needs_grad=needs_grad)
    if impl == 'native':
        return dwconv2d_native(x, weight, bias)
    if impl == 'fft':
        return dwconv2d_fft(x, weight, bias)
    raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
