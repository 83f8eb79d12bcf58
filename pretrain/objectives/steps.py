"""What one micro-batch costs and how a stage is evaluated, per objective kind; the trainer only calls these.

- :class:`SupervisedStep` (``objective.kind: supervised``): the backbone's logits, cross-entropy with label
  smoothing, or soft targets under Mixup/CutMix (the fine-tuning stages); evaluation: top-1/top-5.
- :class:`M3IStep` (``objective.kind: multi``, alias ``m3i``): the :class:`~pretrain.objectives.m3i.M3IModel`
  losses; keeps the MIM teacher (an :class:`~pretrain.common.ema.EMA` of the backbone, checkpointed as ``teacher``);
  evaluation: top-1/top-5 of the classifier (when trained) and zero-shot classification with the text tower.

Each kind also owns the module DeepSpeed trains (:func:`build_model`: the backbone, or the backbone inside
:class:`~pretrain.objectives.m3i.M3IModel`), as torchtitan's train spec owns the model and the loss.

Every evaluation is collective (ZeRO-3 forwards): ranks whose share of the val set ran out run a dummy batch until
every rank is done, and the counts are summed over ranks.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.common import dist as edist
from pretrain.config import TrainConfig
from pretrain.objectives.masking import random_grid_mask

__all__ = ['SupervisedStep', 'M3IStep', 'build_model', 'build_objective_step', 'classification_eval']


def classification_eval(predict: Callable[[torch.Tensor], torch.Tensor], loader, *, device, dtype, img_size: int,
                        num_classes: int) -> dict:
    """Top-1/top-k accuracy and loss of ``predict(images) -> logits`` over every rank's share of ``loader``."""
    k = min(5, num_classes)
    totals = torch.zeros(4, dtype=torch.float64)  # top1, topk, loss sum, count
    it = iter(loader)
    dummy = torch.zeros(1, 3, img_size, img_size, device=device, dtype=dtype)
    while True:
        batch = next(it, None)
        if edist.all_reduce_max(0.0 if batch is None else 1.0) == 0.0:
            break
        if batch is None:
            predict(dummy)
            continue
        images = batch['image'].to(device).to(dtype)
        labels = batch['label'].to(device)
        logits = predict(images).float()
        known = labels >= 0
        logits, labels = logits[known], labels[known]
        hit = logits.topk(k, dim=1).indices == labels[:, None]
        totals += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(),
                                F.cross_entropy(logits, labels, reduction='sum').item() if len(labels) else 0.0,
                                labels.numel()], dtype=torch.float64)
    totals = edist.all_reduce_sum(totals)
    n = max(totals[3].item(), 1.0)
    return {'top1': 100 * totals[0].item() / n, f'top{k}': 100 * totals[1].item() / n,
            'loss': totals[2].item() / n, 'images': int(totals[3].item())}


class SupervisedStep:
    """Classification: ``loss(batch)`` -> (loss, parts)."""

    needs_text = False

    def __init__(self, cfg: TrainConfig, engine, world_size: int, device, dtype):
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.cfg, self.engine, self.device, self.dtype = cfg, engine, device, dtype
        self.averages: dict = {}
        self.mixup = None
        if cfg.loss.mixup_alpha > 0 or cfg.loss.cutmix_alpha > 0:
            from data_pipelines.transforms import build_mixup
            self.mixup = build_mixup(cfg.model.num_classes, mixup_alpha=cfg.loss.mixup_alpha,
                                     cutmix_alpha=cfg.loss.cutmix_alpha, prob=cfg.loss.mixup_prob,
                                     switch_prob=cfg.loss.mixup_switch_prob, label_smoothing=cfg.loss.label_smoothing)
        if self.mixup is not None:
            self.criterion = SoftTargetCrossEntropy()  # Mixup already folds label smoothing into the soft targets
        elif cfg.loss.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.loss.label_smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()

    def loss(self, batch: dict, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        if (batch['label'] < 0).any():  # checked on the host batch: no device sync
            keys = [k for k, lab in zip(batch['key'], batch['label'].tolist()) if lab < 0][:3]
            raise ValueError(f'supervised training needs a .cls label on every sample; none for {keys}')
        images = batch['image'].to(self.device, non_blocking=True).to(self.dtype)
        labels = batch['label'].to(self.device, non_blocking=True)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        loss = self.criterion(self.engine(images).float(), targets)
        return loss, {'ce': loss.detach()}

    @staticmethod
    def batch_counts(batch: dict | None) -> list[float]:
        """Nothing to count across ranks (the cross-entropy is a per-rank mean)."""
        return []

    def after_step(self, step: int) -> None:
        pass

    def evaluate(self, loader) -> dict:
        c = self.cfg
        return classification_eval(self.engine, loader, device=self.device, dtype=self.dtype,
                                   img_size=c.data.img_size, num_classes=c.model.num_classes)


class M3IStep:
    """Multi-objective: see :mod:`pretrain.objectives.m3i`."""

    def __init__(self, cfg: TrainConfig, engine, world_size: int, device, dtype, total_steps: int, rank: int):
        from pretrain.common.ema import EMA

        self.cfg, self.engine, self.device, self.dtype = cfg, engine, device, dtype
        self.rank, self.world_size, self.total_steps = rank, world_size, total_steps
        self.model = engine.module
        ob = cfg.objective
        self.use = {name: w > 0 for name, w in ob.weights().items()}
        self.use['supervised'] = self.use['supervised'] and self.model.has_classifier
        self.needs_text = self.use['contrastive']
        self.teacher = EMA(self.model.backbone, ob.mim.teacher_decay) if self.use['mim'] else None
        self.averages = {'teacher': self.teacher} if self.teacher is not None else {}

    def _mask(self, batch_size: int, step: int, micro: int) -> torch.Tensor:
        """The one mask of this micro-batch, shared by MIM and FCMAE: one draw per sample, seeded by (seed, step,
        the sample's place in the step's global batch), so the masks do not depend on how the global batch is split
        into ranks and micro-batches (2 ranks x 4 draw what 1 rank x 8 draws), and are the same after a resume
        without any RNG state."""
        ratio, patch = self.cfg.objective.mask_settings()
        size = self.cfg.data.img_size // patch
        first = (micro * self.world_size + self.rank) * batch_size
        masks = []
        for sample in range(first, first + batch_size):
            seed = ((self.cfg.run.seed * 1_000_003 + step) * 1_000_033 + sample) % 2 ** 62
            masks.append(random_grid_mask(1, (size, size), ratio, torch.Generator().manual_seed(seed)))
        return torch.cat(masks).to(self.device)

    @staticmethod
    def batch_counts(batch: dict | None) -> list[float]:
        """``[samples with a caption, samples with a label]`` of this rank's micro-batch (host tensors, no device
        sync); zeros for None (a rank whose pass is over). Summed over ranks by the trainer's BatchStream."""
        if batch is None:
            return [0.0, 0.0]
        labels = batch['label']
        return [float(batch['has_text'].sum()) if 'has_text' in batch else 0.0, float((labels >= 0).sum())]

    def loss(self, batch: dict, step: int, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``batch['global_counts']`` (from BatchStream) are :meth:`batch_counts` summed over ranks; without them
        (a caller outside the stream) this call reduces them itself (collective)."""
        counts = batch.get('global_counts')
        if counts is None:
            counts = edist.all_reduce_sum(torch.tensor(self.batch_counts(batch), dtype=torch.float64))
        images = batch['image'].to(self.device, non_blocking=True).to(self.dtype)
        labels = batch['label'].to(self.device, non_blocking=True)
        has_text = batch['has_text'].to(self.device) if 'has_text' in batch else torch.zeros_like(labels, dtype=bool)
        kwargs: dict = {'counts': counts.to(self.device, non_blocking=True)}
        if self.use['contrastive'] and counts[0] > 0:  # host tensors: no device sync
            kwargs.update(text=batch['text'].to(self.device, non_blocking=True), text_valid=has_text)
        if self.use['supervised'] and counts[1] > 0:
            kwargs['labels'] = labels
        if self.use['mim'] or self.use['fcmae']:
            kwargs['mask'] = self._mask(images.shape[0], step, micro)
        if self.use['mim']:
            kwargs['teacher_features'] = self._teacher_features(images)
        parts = self.engine(images, **kwargs)
        return parts.pop('loss'), {k: v.detach() for k, v in parts.items()}

    @torch.no_grad()
    def _teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        backbone = self.model.backbone
        was_training = backbone.training
        with self.teacher.swapped_in():
            backbone.eval()
            try:
                return backbone.forward_features(images).float()
            finally:
                backbone.train(was_training)

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based count of steps done): the teacher follows the student."""
        if self.teacher is not None:
            from pretrain.objectives.m3i import teacher_decay_at

            m = self.cfg.objective.mim
            self.teacher.decay = teacher_decay_at(step, self.total_steps, m.teacher_decay, m.teacher_decay_end)
            self.teacher.update()

    # -- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self, loader) -> dict:
        c = self.cfg
        out: dict = {}
        kw = dict(device=self.device, dtype=self.dtype, img_size=c.data.img_size)
        if self.use['supervised']:
            out['classifier'] = classification_eval(self.model.classify, loader, num_classes=c.model.num_classes,
                                                    **kw)
        z = c.objective.zero_shot
        if self.use['contrastive'] and z.enabled and z.classnames:
            weights = self.zero_shot_weights()
            out['zero_shot'] = classification_eval(
                lambda x: 100.0 * self.model.encode_image(x, normalize=True) @ weights, loader,
                num_classes=weights.shape[1], **kw)
        return out

    @torch.no_grad()
    def zero_shot_weights(self) -> torch.Tensor:
        """``(embed_dim, classes)``: the mean normalised text embedding of each class name over the prompt templates
        (open_clip's build_zero_shot_classifier). Every rank computes it (collective under ZeRO-3)."""
        import open_clip
        from open_clip.zero_shot_classifier import build_zero_shot_classifier
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        z, con = self.cfg.objective.zero_shot, self.cfg.objective.contrastive
        names = read_classnames(z.classnames)
        templates = SIMPLE_IMAGENET_TEMPLATES if z.templates == 'simple' else OPENAI_IMAGENET_TEMPLATES
        tokenizer = open_clip.get_tokenizer(con.tokenizer, context_length=con.context_length)
        was_training = self.model.training
        self.model.eval()
        try:
            w = build_zero_shot_classifier(self.model, tokenizer, names, templates,
                                           num_classes_per_batch=z.classes_per_batch, device=self.device)
        finally:
            self.model.train(was_training)
        return w.float()


def read_classnames(path: str) -> list[str]:
    """Class names in label order: a file with one per line, or open_clip's ImageNet-1K list."""
    from pretrain.config import OPEN_CLIP_IMAGENET

    if path == OPEN_CLIP_IMAGENET:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        return list(IMAGENET_CLASSNAMES)
    names = [line.strip() for line in Path(path).read_text().splitlines()]
    if not names or any(not n for n in names):
        raise ValueError(f'{path}: expected one non-empty class name per line')
    return names


def build_objective_step(cfg: TrainConfig, engine, *, world_size: int, rank: int, device, dtype, total_steps: int):
    if cfg.objective.kind == 'supervised':
        return SupervisedStep(cfg, engine, world_size, device, dtype)
    return M3IStep(cfg, engine, world_size, device, dtype, total_steps, rank)


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The module DeepSpeed trains for ``cfg.objective.kind``: the backbone of ``cfg.model`` (supervised), or that
    backbone inside an :class:`~pretrain.objectives.m3i.M3IModel` (multi; its keys ``backbone.*``), built without a
    classifier when the supervised part's weight is 0. Keeps the backbone's ``load_report`` (``model.init_from``)."""
    from pretrain.models import backbone_from_config

    ob = cfg.objective
    if ob.kind == 'supervised':
        return backbone_from_config(cfg.model, num_classes=cfg.model.num_classes)
    from pretrain.objectives.m3i import M3IModel

    classes = cfg.model.num_classes if ob.weights()['supervised'] > 0 else 0
    backbone = backbone_from_config(cfg.model, num_classes=classes)
    model = M3IModel(backbone, ob, label_smoothing=cfg.loss.label_smoothing)
    model.load_report = getattr(backbone, 'load_report', None)
    return model
