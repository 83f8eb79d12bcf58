"""Masks on the stride-32 grid and dense masking of a CNN (as FCMAE simulates sparse convolution).

A mask is ``(B, H / patch, W / patch)``, 1.0 where a cell is masked. A CNN cannot drop masked cells the way a ViT
drops tokens, so :func:`dense_masking` zeroes them in the input image and again at the input of every block (the
children of each ``.blocks`` container, :func:`pretrain.models.factory.checkpointable_blocks`), at that block's
resolution: a masked cell stays empty through every downsampling, and a visible cell sees only visible cells through
the spatial operators of the next block (DCNv3 offsets, depthwise convolutions) -- FCMAE's "re-mask before each
spatial op", one block at a time. Costs the dense FLOPs (no sparse kernels), works under ZeRO-3, checkpointing and
torch.compile.

The decoder (:class:`MaskedDecoder`) is FCMAE's: a 1x1 projection, a learned mask token in the masked cells, ConvNeXt
V2 blocks (timm's), and a 1x1 prediction.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['random_grid_mask', 'upsample_mask', 'apply_visible', 'dense_masking', 'block_layout', 'MaskedDecoder',
           'masked_mean']


def random_grid_mask(batch: int, grid: tuple[int, int], ratio: float, generator: torch.Generator | None = None,
                     device: torch.device | str = 'cpu') -> torch.Tensor:
    """``(batch, gh, gw)`` float mask with exactly ``round(ratio * gh * gw)`` masked cells per sample (at least one,
    and at least one visible), drawn uniformly (FCMAE's random masking of 32x32 patches)."""
    gh, gw = grid
    cells = gh * gw
    n_mask = min(max(int(round(ratio * cells)), 1), cells - 1)
    noise = torch.rand(batch, cells, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return (ranks < n_mask).float().view(batch, gh, gw).to(device)


def upsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, gh, gw)`` -> ``(B, h, w)`` by repeating cells; ``h, w`` must be multiples of the grid."""
    gh, gw = mask.shape[-2:]
    h, w = size
    if h % gh or w % gw:
        raise ValueError(f'feature map {h}x{w} is not a multiple of the {gh}x{gw} mask grid (a stride above the '
                         'mask cell size cannot be masked cell by cell)')
    return mask.repeat_interleave(h // gh, dim=1).repeat_interleave(w // gw, dim=2)


def apply_visible(x: torch.Tensor, mask: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` with the masked cells zeroed; ``layout`` 'NCHW' or 'NHWC' says where the spatial dims are."""
    if layout == 'NHWC':
        keep = 1.0 - upsample_mask(mask, (x.shape[1], x.shape[2]))[..., None]
    else:
        keep = 1.0 - upsample_mask(mask, (x.shape[2], x.shape[3]))[:, None]
    return x * keep.to(x.dtype)


def block_layout(model: nn.Module) -> str:
    """Where a block's input keeps its spatial dims: InternImage blocks run channels-last (NHWC), timm stage models
    (ConvNeXt) channels-first; a model may say so itself with a ``block_layout`` attribute."""
    from pretrain.models.internimage import InternImage

    own = getattr(model, 'block_layout', None)
    if own is not None:
        return own
    return 'NHWC' if isinstance(model, InternImage) else 'NCHW'


@contextlib.contextmanager
def dense_masking(model: nn.Module, mask: torch.Tensor):
    """Within the block, every block of ``model`` sees its input with the masked cells of ``mask`` zeroed (the
    caller masks the image itself). Forward pre-hooks, removed on exit."""
    from pretrain.models.factory import checkpointable_blocks

    layout = block_layout(model)

    def hook(_module, args):
        return (apply_visible(args[0], mask, layout), *args[1:])

    handles = [blk.register_forward_pre_hook(hook) for blk in checkpointable_blocks(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(values * weights) / sum(weights)`` (0 when no weight)."""
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


class MaskedDecoder(nn.Module):
    """FCMAE's decoder on a ``(B, C, h, w)`` feature map: 1x1 to ``dim``, the mask token in masked cells,
    ``depth`` ConvNeXt V2 blocks (7x7 depthwise, GRN MLP), 1x1 to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, dim: int = 512, depth: int = 1):
        super().__init__()
        from timm.models.convnext import ConvNeXtBlock

        self.proj = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, use_grn=True, ls_init_value=None) for _ in range(depth)])
        self.pred = nn.Conv2d(dim, out_dim, kernel_size=1)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        m = upsample_mask(mask, x.shape[-2:])[:, None].to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype) * m
        return self.pred(self.blocks(x))


def normalized(t: torch.Tensor) -> torch.Tensor:
    """Per-position LayerNorm over channels without affine (the regression target of feature MIM)."""
    return F.layer_norm(t.float().permute(0, 2, 3, 1), (t.shape[1],)).permute(0, 3, 1, 2)
