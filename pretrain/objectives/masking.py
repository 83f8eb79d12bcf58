"""Masks on the stride-32 grid and dense masking of a CNN (as FCMAE simulates sparse convolution).

A mask is ``(B, H / patch, W / patch)``, 1.0 where a cell is masked. A CNN cannot drop masked cells the way a ViT
drops tokens, so :func:`dense_masking` zeroes them in the input image and again at the input of every block (the
children of each ``.blocks`` container, :func:`pretrain.models.factory.checkpointable_blocks`), at that block's
resolution: a masked cell stays empty through every downsampling, and a visible cell sees only visible cells through
the spatial operators of the next block (DCNv3 offsets, depthwise convolutions) -- FCMAE's "re-mask before each
spatial op", one block at a time. Costs the dense FLOPs (no sparse kernels), works under ZeRO-3, checkpointing and
torch.compile.

ConvNeXt V2's GRN (timm's ``GlobalResponseNorm``) pools an L2 norm over all positions; under :func:`dense_masking`
it pools it, per sample and channel, over the visible positions only (FCMAE's JAX dense simulation; MinkowskiEngine's
sparse GRN pools over the whole batch instead), so the visible cells are computed as a sparse network computes them.
Its input's masked positions are zeroed (a forward pre-hook like the blocks'): at the visible positions the output is
exactly the JAX GRN's, at the masked ones it is GRN's bias (they hold nothing a visible cell reads).

The decoder (:class:`MaskedDecoder`) is FCMAE's: a 1x1 projection, a learned mask token in the masked cells, ConvNeXt
V2 blocks (timm's), and a 1x1 prediction.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['random_grid_mask', 'upsample_mask', 'apply_visible', 'dense_masking', 'visible_grn', 'block_layout',
           'MaskedDecoder', 'masked_mean']


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
    """Where a block's input keeps its spatial dims: a model whose blocks run channels-last says so with a
    ``block_layout = 'NHWC'`` attribute (InternImage, PeLK); timm stage models (ConvNeXt) are channels-first."""
    return getattr(model, 'block_layout', 'NCHW')


def _masking_hook(mask: torch.Tensor, layout: str):
    """A forward pre-hook zeroing the masked cells of a module's first input."""
    def hook(_module, args):
        return (apply_visible(args[0], mask, layout), *args[1:])
    return hook


def _grns(module: nn.Module) -> list[nn.Module]:
    from timm.layers.grn import GlobalResponseNorm

    return [m for m in module.modules() if isinstance(m, GlobalResponseNorm)]


@contextlib.contextmanager
def visible_grn(module: nn.Module, mask: torch.Tensor):
    """Within the block, every GRN in ``module`` pools its statistics over the visible positions of ``mask`` only
    (its input's masked positions zeroed, at the input's resolution and layout). Forward pre-hooks, removed on
    exit."""
    handles = [g.register_forward_pre_hook(_masking_hook(mask, 'NHWC' if g.channel_dim == -1 else 'NCHW'))
               for g in _grns(module)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def dense_masking(model: nn.Module, mask: torch.Tensor):
    """Within the block, every block of ``model`` sees its input with the masked cells of ``mask`` zeroed (the
    caller masks the image itself) and every GRN pools over the visible positions (:func:`visible_grn`). Forward
    pre-hooks, removed on exit; a block that activation checkpointing recomputes in the backward, after the exit,
    gets its GRN masks again there (``checkpoint_context_fn``, read by
    :func:`pretrain.models.factory.set_grad_checkpointing`'s wrapper; its input was saved masked already)."""
    from pretrain.models.factory import checkpointable_blocks

    blocks = checkpointable_blocks(model)
    layout = block_layout(model)
    handles = [blk.register_forward_pre_hook(_masking_hook(mask, layout)) for blk in blocks]
    for blk in blocks:
        if _grns(blk):
            blk.checkpoint_context_fn = lambda blk=blk: (contextlib.nullcontext(), visible_grn(blk, mask))
    try:
        with visible_grn(model, mask):
            yield
    finally:
        for h in handles:
            h.remove()
        for blk in blocks:
            blk.__dict__.pop('checkpoint_context_fn', None)


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
