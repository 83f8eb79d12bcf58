"""Shared DCNv3 test cases, and an independent oracle: the official ``dcnv3_core_pytorch`` algorithm transcribed
step by step from its description in ../shared/spec/official-internimage.md §3.2 (pad, normalised reference points
and dilation grid, grid_sample on the padded input). Computed in float64 so it can check every backend's semantics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.ops import output_size


def official_dcnv3_core(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                        dilation_w, group, group_channels, offset_scale, remove_center):
    dt = torch.float64
    input, offset, mask = input.to(dt), offset.to(dt), mask.to(dt)
    input = F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])
    n, h_in, w_in, _ = input.shape  # padded sizes, as in the official function
    _, h_out, w_out, _ = offset.shape
    ch, cw = (dilation_h * (kernel_h - 1)) // 2, (dilation_w * (kernel_w - 1)) // 2
    ref_y, ref_x = torch.meshgrid(
        torch.linspace(ch + 0.5, ch + 0.5 + (h_out - 1) * stride_h, h_out, dtype=dt),
        torch.linspace(cw + 0.5, cw + 0.5 + (w_out - 1) * stride_w, w_out, dtype=dt), indexing="ij")
    ref = torch.stack((ref_x.reshape(-1)[None] / w_in, ref_y.reshape(-1)[None] / h_in), -1)
    ref = ref.reshape(1, h_out, w_out, 1, 2)
    x, y = torch.meshgrid(
        torch.linspace(-cw, -cw + (kernel_w - 1) * dilation_w, kernel_w, dtype=dt),
        torch.linspace(-ch, -ch + (kernel_h - 1) * dilation_h, kernel_h, dtype=dt), indexing="ij")
    grid = torch.stack([x / w_in, y / h_in], -1).reshape(-1, 1, 2).repeat(1, group, 1).permute(1, 0, 2)
    grid = grid.reshape(1, 1, 1, group * kernel_h * kernel_w, 2)
    loc = (ref + grid * offset_scale).repeat(n, 1, 1, 1, 1)
    if remove_center:
        c = (kernel_w * kernel_h - 1) // 2
        keep = [i for i in range(loc.shape[-2]) if i != c and (i - c) % (c * 2 + 1) != 0]
        loc = loc[:, :, :, keep, :]
    points = kernel_h * kernel_w - int(remove_center)
    spatial_norm = torch.tensor([w_in, h_in], dtype=dt).reshape(1, 1, 1, 2).repeat(1, 1, 1, group * points)
    loc = loc.flatten(3, 4) + offset * offset_scale / spatial_norm
    grids = 2 * loc - 1
    value = input.view(n, h_in * w_in, group * group_channels).transpose(1, 2)
    value = value.reshape(n * group, group_channels, h_in, w_in)
    grids = grids.view(n, h_out * w_out, group, points, 2).transpose(1, 2).flatten(0, 1)
    sampled = F.grid_sample(value, grids, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = mask.view(n, h_out * w_out, group, points).transpose(1, 2).reshape(n * group, 1, h_out * w_out, points)
    out = (sampled * mask).sum(-1).view(n, group * group_channels, h_out * w_out)
    return out.transpose(1, 2).reshape(n, h_out, w_out, -1).contiguous()


# (N, H, W, group, group_channels, kernel, stride, pad, dilation, offset_scale, remove_center, offset_std)
SHAPES = {
    "base": (2, 9, 7, 4, 16, 3, 1, 1, 1, 1.0, False, 2.0),
    "stride2": (2, 11, 10, 2, 8, 3, 2, 1, 1, 1.0, False, 2.0),
    "pad2_dil2": (2, 10, 9, 2, 8, 3, 1, 2, 2, 1.0, False, 2.0),
    "offset_scale2": (2, 8, 8, 3, 4, 3, 1, 1, 1, 2.0, False, 2.0),
    "remove_center": (2, 8, 9, 2, 8, 3, 1, 1, 1, 1.0, True, 2.0),
    "kernel5_rc": (1, 9, 8, 2, 4, 5, 1, 2, 1, 1.0, True, 2.0),
    "gc5": (2, 7, 7, 3, 5, 3, 1, 1, 1, 1.0, False, 2.0),
    "gc30": (2, 6, 6, 2, 30, 3, 1, 1, 1, 1.0, False, 2.0),
    "gc71": (1, 6, 5, 2, 71, 3, 1, 1, 1, 2.0, True, 2.0),
    "gc32": (2, 5, 6, 3, 32, 3, 1, 1, 1, 1.0, False, 2.0),  # InternImage-H/G's group width
    "outside": (2, 6, 6, 2, 4, 3, 1, 1, 1, 1.0, False, 12.0),  # most samples fall outside the image
    "all_mixed": (1, 12, 11, 2, 6, 3, 2, 2, 2, 2.0, True, 3.0),
}


def make_inputs(shape, dtype=torch.float64, seed=0, device="cpu", off_grid=False):
    """Random inputs for one SHAPES entry. ``off_grid`` keeps every offset's fractional part in [0.1, 0.4] so that
    sampling locations (also at offset_scale 2) never land on integer pixels, where bilinear sampling has a kink and
    the offset gradient is one-sided: coarse bf16/fp16 offsets hit them often, and float32 rounding of a float64 offset
    occasionally moves a location across one."""
    n, h, w, g, d, k, s, p, dil, osc, rc, std = shape
    gen = torch.Generator().manual_seed(seed)
    points = k * k - int(rc)
    h_out, w_out = output_size(h, k, s, p, dil), output_size(w, k, s, p, dil)
    x = torch.randn(n, h, w, g * d, generator=gen, dtype=torch.float64)
    offset = torch.randn(n, h_out, w_out, g * points * 2, generator=gen, dtype=torch.float64) * std
    mask = torch.rand(n, h_out, w_out, g * points, generator=gen, dtype=torch.float64)
    if off_grid:
        offset = torch.floor(offset) + 0.1 + 0.3 * torch.rand(offset.shape, generator=gen, dtype=torch.float64)
    args = (k, k, s, s, p, p, dil, dil, g, d, osc, rc)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, offset, mask)], args


def forward_backward(fn, tensors, args, grad_seed=1, **kw):
    out = fn(*tensors, *args, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, tensors, grad.to(out))
    return out, grads
