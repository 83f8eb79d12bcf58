"""M3I-style multi-objective pretraining (``objective.kind: multi``): one student forward, several targets, a sum.

M3I (Su et al., CVPR 2023) pretrains InternImage-H by maximising the mutual information between one input and
several targets; no code was released (../shared/spec/objectives-and-models.md §A). What is built here, per step:

- the student sees one view per image; with ``mim.weight > 0`` or ``fcmae.weight > 0`` it is block-masked on the
  stride-32 grid and the masked cells are re-masked at every block (:mod:`pretrain.objectives.masking`, FCMAE's dense
  masking);
- **mim**: a decoder (:class:`MaskedDecoder`) predicts, at the masked cells, the features that the teacher -- an
  EMA of the student's backbone, with the same ZeRO-3 sharding -- computes on the whole image (its
  ``forward_features`` map, LayerNorm'd without affine), mean squared error over masked positions;
- **contrastive**: the pooled embedding (InternImage-H/G's 768-d attention-pooling head, a linear projection for the
  other models) against an open_clip text tower, InfoNCE with negatives from every rank and a learnable temperature;
- **supervised**: the backbone's classifier on the pooled embedding, cross-entropy with label smoothing;
- **fcmae**: ConvNeXt V2's masked autoencoder (:mod:`pretrain.objectives.fcmae`): a second decoder predicts the
  normalised pixels of each masked patch, MSE over the masked patches. MIM and FCMAE share one mask per micro-batch.

A sample takes part in the objectives whose targets it carries (a caption: ``has_text``; a label: ``label >= 0``);
an objective runs when any sample on any rank carries its target (one all-reduce per micro-batch, so that ZeRO-3's
collective parameter gathers stay in step on every rank). Each loss is normalised by the global number of samples
that carry its target, so the total is the same on any number of ranks.

Not reproduced (unknown or left out): M3I's mixing of two images into one input, its loss weights, temperature and
mask ratio (all configurable here, defaults documented in docs/OBJECTIVES.md).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pretrain.common.schedule import cosine_between
from pretrain.config import ObjectiveConfig
from pretrain.objectives.contrastive import LogitScale, build_text_tower, contrastive_loss
from pretrain.objectives.fcmae import fcmae_loss
from pretrain.objectives.masking import MaskedDecoder, dense_masking, masked_mean, normalized, upsample_mask

__all__ = ['M3IModel', 'feature_dim', 'feature_stride', 'pooled_dim']


def feature_dim(backbone: nn.Module) -> int:
    """Channels of ``backbone.forward_features``'s map (what the MIM teacher's targets have): timm's
    ``num_features``."""
    return int(backbone.num_features)


def feature_stride(backbone: nn.Module) -> int:
    """Pixels per cell of ``backbone.forward_features``'s map (FCMAE predicts one ``stride x stride`` patch per
    cell), as the backbone publishes it (:func:`pretrain.models.output_stride`)."""
    from pretrain.models import output_stride

    return output_stride(backbone)


def pooled_dim(backbone: nn.Module) -> int:
    """Width of ``forward_head(..., pre_logits=True)``."""
    return getattr(backbone, 'head_hidden_size', None) or backbone.num_features


class M3IModel(nn.Module):
    """The backbone (under ``backbone.``, so exported and next-stage weights are found by that prefix) with the
    parts the enabled objectives need: ``text`` + ``image_proj`` + ``logit_scale`` (contrastive), ``mim_decoder``
    (mim), ``fcmae_decoder`` (fcmae). ``forward`` returns the loss parts and their weighted sum (``'loss'``)."""

    def __init__(self, backbone: nn.Module, cfg: ObjectiveConfig, label_smoothing: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.weights = cfg.weights()
        self.label_smoothing = label_smoothing
        self.contrastive_cfg = cfg.contrastive
        c = cfg.contrastive
        if self.weights['contrastive'] > 0:
            vocab = _tokenizer_vocab_size(c.tokenizer)
            self.text = build_text_tower(c.embed_dim, width=c.text_width, layers=c.text_layers, heads=c.text_heads,
                                         context_length=c.context_length, vocab_size=vocab)
            pdim = pooled_dim(backbone)
            self.image_proj = nn.Identity() if pdim == c.embed_dim else nn.Linear(pdim, c.embed_dim, bias=False)
            if isinstance(self.image_proj, nn.Linear):
                nn.init.normal_(self.image_proj.weight, std=pdim ** -0.5)
            self.logit_scale = LogitScale(c.init_temperature, c.max_logit_scale)
        if self.weights['mim'] > 0:
            fdim = feature_dim(backbone)
            self.mim_decoder = MaskedDecoder(fdim, fdim, dim=cfg.mim.decoder_dim, depth=cfg.mim.decoder_depth)
        if self.weights['fcmae'] > 0:
            f = cfg.fcmae
            self.fcmae_decoder = MaskedDecoder(feature_dim(backbone), feature_stride(backbone) ** 2 * 3,
                                               dim=f.decoder_dim, depth=f.decoder_depth)
            self.fcmae_norm_pix = f.norm_pix_loss

    # -- optimizer hooks ------------------------------------------------------------------------------------------
    def layer_decay_root(self) -> tuple[nn.Module, str]:
        """Layer-wise lr decay counts the backbone's layers; the objective heads take the last (scale 1.0)."""
        return self.backbone, 'backbone.'

    def no_weight_decay(self) -> set[str]:
        own = {f'backbone.{n}' for n in getattr(self.backbone, 'no_weight_decay', set)()}
        own.update(f'{d}.mask_token' for d in ('mim_decoder', 'fcmae_decoder') if hasattr(self, d))
        return own

    # -- encoders -------------------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        emb = self.image_proj(self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True))
        return F.normalize(emb.float(), dim=-1) if normalize else emb

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        emb = self.text(text)
        return F.normalize(emb.float(), dim=-1) if normalize else emb

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    @property
    def has_classifier(self) -> bool:
        return getattr(self.backbone, 'num_classes', 0) > 0

    # -- the step -------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, *, text: torch.Tensor | None = None, text_valid: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                teacher_features: torch.Tensor | None = None, counts: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """``counts`` = ``[samples with a caption, samples with a label]`` summed over all ranks (normalises the
        supervised loss globally). An objective runs when its inputs are given (fcmae: ``mask``, when built)."""
        parts: dict[str, torch.Tensor] = {}
        if mask is not None:
            keep = 1.0 - upsample_mask(mask, images.shape[-2:])[:, None]
            with dense_masking(self.backbone, mask):
                feats = self.backbone.forward_features(images * keep.to(images.dtype))
        else:
            feats = self.backbone.forward_features(images)
        if teacher_features is not None:
            pred = self.mim_decoder(feats, mask)
            target = normalized(teacher_features)
            per_position = (pred.float() - target).pow(2).mean(dim=1)
            parts['mim'] = masked_mean(per_position, upsample_mask(mask, per_position.shape[-2:]))
        if mask is not None and hasattr(self, 'fcmae_decoder'):
            parts['fcmae'] = fcmae_loss(self.fcmae_decoder(feats, mask), images, mask, self.fcmae_norm_pix)
        if labels is not None or text is not None:
            pooled = self.backbone.forward_head(feats, pre_logits=True)
            if labels is not None:
                logits = self.backbone.get_classifier()(pooled).float()
                valid = labels >= 0
                ce = F.cross_entropy(logits[valid], labels[valid], label_smoothing=self.label_smoothing,
                                     reduction='sum') if valid.any() else logits.sum() * 0.0
                world = dist.get_world_size() if dist.is_initialized() else 1
                parts['supervised'] = ce * world / counts[1].clamp_min(1)
            if text is not None:
                c = self.contrastive_cfg
                parts['contrastive'] = contrastive_loss(self.image_proj(pooled), self.text(text), text_valid,
                                                        self.logit_scale(), local_loss=c.local_loss,
                                                        gather_with_grad=c.gather_with_grad)
        loss = sum(self.weights[k] * v for k, v in parts.items())
        parts['loss'] = loss if torch.is_tensor(loss) else feats.sum() * 0.0
        return parts


def _tokenizer_vocab_size(name: str) -> int:
    import open_clip

    return int(open_clip.get_tokenizer(name).vocab_size)


def teacher_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine ramp of the teacher EMA decay from ``start`` (step 0) to ``end`` (last step), as BYOL / SiameseIM."""
    return cosine_between(step, total_steps, start, end)
