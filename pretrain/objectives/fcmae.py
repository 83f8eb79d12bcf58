"""ConvNeXt V2's FCMAE objective (Woo et al., CVPR 2023): reconstruct the pixels of the masked patches.

The encoder runs densely masked (:func:`pretrain.objectives.masking.dense_masking`: the image and every block's input
re-masked, GRN statistics over the visible positions), the decoder (:class:`~pretrain.objectives.masking.
MaskedDecoder`: 1x1 to 512, mask token in the masked cells, one ConvNeXt V2 block, 1x1) predicts for each cell of the
feature map the ``stride x stride x 3`` pixels of its patch, and the loss is the mean squared error against the
patch's pixels -- each patch normalised by its own mean and (unbiased) variance with ``norm_pix_loss`` -- averaged
over the masked patches only (official ``fcmae.py``: ``forward_loss``). Used by
:class:`~pretrain.objectives.m3i.M3IModel` as its ``fcmae`` part.
"""
from __future__ import annotations

import torch

from pretrain.objectives.masking import masked_mean, upsample_mask

__all__ = ['patchify', 'fcmae_loss']


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, H/patch, W/patch, patch * patch * 3)``, each patch's pixels in (row, column, channel)
    order (the official ``patchify``; the decoder's prediction channels follow it)."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f'image {h}x{w} is not a multiple of the {patch}-pixel patch')
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum('nchpwq->nhwpqc', x).reshape(b, h // patch, w // patch, patch * patch * c)


def fcmae_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Mean over the masked patches of the per-patch MSE between ``pred`` ``(B, p*p*3, h, w)`` (one patch per cell)
    and the patches of ``images`` ``(B, 3, h*p, w*p)``; ``mask`` ``(B, gh, gw)`` on a grid that divides ``(h, w)``
    (1.0 = masked). Computed in float32."""
    h, w = pred.shape[-2:]
    patch = images.shape[-1] // w
    target = patchify(images.float(), patch)
    if pred.shape[1] != target.shape[-1] or target.shape[1:3] != (h, w):
        raise ValueError(f'prediction {tuple(pred.shape)} does not hold one {patch}x{patch}x3 patch per cell of '
                         f'the {tuple(images.shape)} image')
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official torch.var default
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = (pred.float().permute(0, 2, 3, 1) - target).pow(2).mean(dim=-1)
    return masked_mean(per_patch, upsample_mask(mask, (h, w)).to(per_patch.dtype))
