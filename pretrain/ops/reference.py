"""Pure-PyTorch DCNv3 core (grid_sample based): the reference every other backend is tested against.

Semantics are those of the official InternImage release (``dcnv3_core_pytorch``):

* tensors are NHWC: ``input (N, H_in, W_in, G*D)``, ``offset (N, H_out, W_out, G*P*2)``,
  ``mask (N, H_out, W_out, G*P)``, output ``(N, H_out, W_out, G*D)``;
* offset channel ``(g*P + p)*2 + {0: x, 1: y}``, mask channel ``g*P + p``;
* kernel points enumerated x-major: ``p = i_x * kernel_h + i_y`` (the centre is dropped when ``remove_center``);
* offsets are in pixels; ``offset_scale`` multiplies both the regular kernel grid and the learned offsets;
* bilinear sampling with zeros outside the image, as ``grid_sample(align_corners=False, padding_mode='zeros')``.

Unlike the official function, the reference grid is computed in the input's dtype, so float64 is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def output_size(size_in: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Spatial output size of a DCNv3 layer along one axis."""
    return (size_in + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def kernel_grid(kernel_h: int, kernel_w: int, dilation_h: int, dilation_w: int, remove_center: bool,
                device=None, dtype=None) -> torch.Tensor:
    """Regular kernel offsets in pixels, ``(P, 2)`` as (x, y), x-major point order."""
    center_h, center_w = dilation_h * (kernel_h - 1) // 2, dilation_w * (kernel_w - 1) // 2
    xs = torch.arange(kernel_w, device=device, dtype=dtype) * dilation_w - center_w
    ys = torch.arange(kernel_h, device=device, dtype=dtype) * dilation_h - center_h
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")  # x-major: p = i_x * kernel_h + i_y
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)
    if remove_center:
        grid = torch.cat([grid[: grid.shape[0] // 2], grid[grid.shape[0] // 2 + 1:]])
    return grid


def dcnv3_core_pytorch(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int,
                       stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
                       group: int, group_channels: int, offset_scale: float, remove_center: bool) -> torch.Tensor:
    """DCNv3 aggregation by ``grid_sample`` (layouts in the module docstring). Returns ``(N, H_out, W_out, G*D)``."""
    n, h_in, w_in, _ = input.shape
    _, h_out, w_out, _ = offset.shape
    points = kernel_h * kernel_w - int(remove_center)
    dtype = input.dtype if input.dtype == torch.float64 else torch.float32
    # Pixel coordinates of every sampling location in the unpadded input: (N, H_out, W_out, G, P, 2) as (x, y).
    base_y = torch.arange(h_out, device=input.device, dtype=dtype) * stride_h - pad_h + dilation_h * (kernel_h - 1) // 2
    base_x = torch.arange(w_out, device=input.device, dtype=dtype) * stride_w - pad_w + dilation_w * (kernel_w - 1) // 2
    base = torch.stack(torch.meshgrid(base_x, base_y, indexing="xy"), dim=-1)  # (H_out, W_out, 2)
    grid = kernel_grid(kernel_h, kernel_w, dilation_h, dilation_w, remove_center, input.device, dtype)
    loc = base[:, :, None, None, :] + (grid + offset.to(dtype).view(n, h_out, w_out, group, points, 2)) * offset_scale
    # grid_sample with align_corners=False maps pixel x to (2x + 1) / W - 1.
    size = torch.tensor([w_in, h_in], device=input.device, dtype=dtype)
    norm = (2 * loc + 1) / size - 1
    norm = norm.permute(0, 3, 1, 2, 4, 5).reshape(n * group, h_out * w_out, points, 2)
    value = input.view(n, h_in, w_in, group, group_channels).permute(0, 3, 4, 1, 2)
    value = value.reshape(n * group, group_channels, h_in, w_in)
    sampled = F.grid_sample(value, norm.to(value.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    # sampled: (N*G, D, H_out*W_out, P); weights: (N*G, 1, H_out*W_out, P)
    weights = mask.view(n, h_out * w_out, group, points).permute(0, 2, 1, 3)
    weights = weights.reshape(n * group, 1, h_out * w_out, points)
    out = (sampled * weights.to(sampled.dtype)).sum(-1)  # (N*G, D, H_out*W_out)
    out = out.view(n, group * group_channels, h_out * w_out).transpose(1, 2)
    return out.reshape(n, h_out, w_out, group * group_channels).contiguous()
