"""Image-text contrastive learning: open_clip's text tower and an InfoNCE that negatives come to from every rank.

:func:`contrastive_loss` is open_clip's ``ClipLoss`` (same features gather, same symmetric cross-entropy, same
``local_loss`` / ``gather_with_grad`` options) plus a per-sample ``valid`` flag: a batch may mix image-text pairs with
images that have no caption (labelled sources); those are neither queries nor negatives. With every sample valid it
equals ``open_clip.ClipLoss`` (tests/test_objectives.py checks it), and on any number of ranks the mean over ranks
equals the loss of one process on the concatenated batch.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['build_text_tower', 'contrastive_loss', 'LogitScale']


def build_text_tower(embed_dim: int, *, width: int = 768, layers: int = 12, heads: int = 12,
                     context_length: int = 77, vocab_size: int = 49408) -> nn.Module:
    """open_clip's causal text Transformer (CLIP's), pooled at the end-of-text token, projected to ``embed_dim``."""
    from open_clip.transformer import TextTransformer

    return TextTransformer(context_length=context_length, vocab_size=vocab_size, width=width, heads=heads,
                           layers=layers, output_dim=embed_dim)


class LogitScale(nn.Module):
    """The learnable inverse temperature, stored as its log (CLIP), clamped at ``max_scale`` in the forward."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        # Shape (1,), not CLIP's 0-dim: DeepSpeed views every parameter as bytes to broadcast it.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.max_log = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.logit_scale.float().clamp(max=self.max_log).exp()[0]


def _gather(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order; with gradient as open_clip's ``gather_with_grad`` (the backward
    sums every rank's gradient into the owner's), else only the local part keeps its gradient."""
    if with_grad:
        import torch.distributed.nn

        return torch.cat(torch.distributed.nn.all_gather(x.contiguous()))
    return _gather_no_grad(x, dist.get_rank(), dist.get_world_size())


def _gather_no_grad(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    parts = [torch.zeros_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    parts[rank] = x  # keep the local gradient path (open_clip's gather without grad)
    return torch.cat(parts)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, logit_scale: torch.Tensor, *,
                     local_loss: bool = False, gather_with_grad: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised ``image`` and ``text`` embeddings ``(B, D)``; ``valid`` ``(B,)`` bool marks
    the pairs. Negatives are every valid pair on every rank. Returns this rank's share: the mean over ranks is the
    mean loss over all valid pairs (each rank's value also carries the right gradient for DeepSpeed's averaging)."""
    image = F.normalize(image.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    valid = valid.bool()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if world > 1:
        all_image, all_text = _gather(image, gather_with_grad), _gather(text, gather_with_grad)
        all_valid = _gather_no_grad(valid.to(torch.uint8), rank, world).bool()
    else:
        all_image, all_text, all_valid = image, text, valid
    n_valid = all_valid.sum()
    if n_valid == 0:
        return image.sum() * 0.0
    neg_inf = torch.finfo(torch.float32).min
    if local_loss:
        rows = valid
        offset = rank * image.shape[0]
        logits_i = logit_scale * image @ all_text.T
        logits_t = logit_scale * text @ all_image.T
        labels = torch.arange(image.shape[0], device=image.device) + offset
    else:
        rows = all_valid
        logits_i = logit_scale * all_image @ all_text.T
        logits_t = logits_i.T
        labels = torch.arange(all_image.shape[0], device=image.device)
    logits_i = logits_i.masked_fill(~all_valid[None, :], neg_inf)[rows]
    logits_t = logits_t.masked_fill(~all_valid[None, :], neg_inf)[rows]
    labels = labels[rows]
    total = F.cross_entropy(logits_i, labels, reduction='sum') + F.cross_entropy(logits_t, labels, reduction='sum')
    # local: each rank's rows, scaled so that the mean over ranks is the global mean; global: every rank the same.
    scale = world if local_loss else 1
    return total * scale / (2 * n_valid)
