"""Data for the trainer: loaders from the config, and a batch stream on which every rank agrees.

Training batches are always full: the loader drops a batch left short by skipped bad samples (Mixup needs an even
batch, the contrastive all_gather equal shapes, ``samples_seen`` the same count on every rank); evaluation keeps
partial batches. So in epoch mode a rank's pass can be one batch shorter than another's (docs/DATA.md). Every
rank must run the same number of steps (ZeRO collectives), so :class:`BatchStream` all-reduces "I ran out" before
each micro-batch (the objective's counts ride in the same all-reduce): when any rank's pass is over, every rank
starts the next epoch (the steps per epoch are the minimum over ranks; a rank that still had a batch drops it).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from data_pipelines.loader import SourceSpec, build_loader, resolve_shards
from data_pipelines.transforms import build_eval_transform, build_train_transform
from pretrain.common import dist as edist
from pretrain.config import RemoteConfig, SourceConfig, TrainConfig
from pretrain.engine import watchdog

__all__ = ['build_train_loader', 'train_transform', 'build_val_loader', 'steps_per_epoch', 'BatchStream']


def _specs(sources: list[SourceConfig], remote: RemoteConfig) -> list[SourceSpec]:
    return [SourceSpec(s.name, s.urls, weight=s.weight, manifest=s.manifest, remote=remote.options()) for s in sources]


def train_transform(cfg: TrainConfig):
    """The training transform of ``cfg.data``: RandomResizedCrop (scale, ratio), flips, augmentation, normalise."""
    d = cfg.data
    return build_train_transform(d.img_size, scale=(d.scale_min, 1.0), ratio=d.ratio, hflip=d.hflip,
                                 color_jitter=d.color_jitter, auto_augment=d.auto_augment, re_prob=d.re_prob,
                                 interpolation=d.interpolation)


def build_train_loader(cfg: TrainConfig, rank: int, world_size: int, epoch: int = 0, tokenize: bool = False):
    """``tokenize``: captions become ``text`` tokens (open_clip's tokenizer of ``objective.contrastive``) with a
    ``has_text`` flag; samples without a caption are kept (labelled sources mixed with image-text ones)."""
    d = cfg.data
    tokenizer = None
    if tokenize:
        from data_pipelines.text import build_tokenizer
        c = cfg.objective.contrastive
        tokenizer = build_tokenizer(c.tokenizer, context_length=c.context_length)
    return build_loader(_specs(d.train, d.remote), batch_size=cfg.deepspeed.micro_batch_size, num_workers=d.num_workers,
                        mode=d.mode, seed=d.seed, rank=rank, world_size=world_size, transform=train_transform(cfg),
                        epoch=epoch, drop_last=True, interleave_shards=d.interleave_shards,
                        samples_per_epoch=d.samples_per_epoch, tokenizer=tokenizer, caption_required=False)


def build_val_loader(cfg: TrainConfig, rank: int, world_size: int):
    """This rank's share of ``data.val`` in one pass, partial batches kept (None without a val set); each batch
    received counts as progress for the watchdog, so a long evaluation is not taken for a hang."""
    d = cfg.data
    if not d.val:
        return None
    transform = build_eval_transform(d.img_size, crop_pct=d.eval_crop_pct, interpolation=d.interpolation)
    return _BeatingLoader(build_loader(
        _specs(d.val, d.remote), batch_size=d.eval_micro_batch_size or cfg.deepspeed.micro_batch_size,
        num_workers=d.num_workers, mode='epoch', seed=d.seed, rank=rank, world_size=world_size, transform=transform,
        drop_last=False, interleave_shards=d.interleave_shards))


class _BeatingLoader:
    """A loader whose iteration calls ``watchdog.beat()`` at every ``next()``, also once this rank's share is used up
    (evaluation then keeps calling ``next(it, None)`` until every rank is done); everything else is the wrapped
    loader's."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return _BeatingIterator(iter(self.loader))

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class _BeatingIterator:
    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __next__(self):
        watchdog.beat()
        return next(self.it)


def steps_per_epoch(cfg: TrainConfig, world_size: int) -> int:
    """Optimizer steps in one pass (an upper bound in epoch mode: skipped samples can end a pass one step early)."""
    if cfg.schedule.steps_per_epoch is not None:
        return cfg.schedule.steps_per_epoch
    per_step = cfg.deepspeed.micro_batch_size * world_size * cfg.deepspeed.grad_accum_steps
    if cfg.data.mode == 'resampled':
        if cfg.data.samples_per_epoch is None:
            raise ValueError('resampled mode without samples_per_epoch has no epochs; set schedule.total_steps')
        return max(cfg.data.samples_per_epoch // per_step, 1)
    total = sum(s.samples for s in resolve_shards(_specs(cfg.data.train, cfg.data.remote), need_counts=True))
    steps = total // per_step
    if steps < 1:
        raise ValueError(f'{total} training samples are fewer than one global batch ({per_step})')
    return steps


class BatchStream:
    """``next_batch()`` -> the next micro-batch dict, the same number on every rank; rolls epochs over.

    One all-reduce per micro-batch carries both "I ran out" and the objective's per-sample counts
    (``counts_of(batch or None) -> [float, ...]``, a fixed length, zeros for None; e.g. captioned and labelled
    samples), summed over ranks and handed on as ``batch['global_counts']`` (float64, on the host), so the objective
    needs no collective of its own.
    ``state.epoch`` (a TrainState) is advanced in place at each rollover.
    """

    def __init__(self, loader, state, counts_of: Callable[[dict | None], list[float]] | None = None):
        self.loader, self.state, self.counts_of = loader, state, counts_of
        self._it = None

    def next_batch(self) -> dict:
        for _ in range(3):
            if self._it is None:
                self._it = iter(self.loader)
            batch = next(self._it, None)
            counts = self.counts_of(batch) if self.counts_of is not None else []
            summed = edist.all_reduce_sum(torch.tensor([1.0 if batch is None else 0.0, *counts], dtype=torch.float64))
            if summed[0] == 0:
                if self.counts_of is not None:
                    batch['global_counts'] = summed[1:]
                return batch
            self._it = None  # some rank's pass is over: everyone starts the next epoch
            self.state.epoch += 1
            self.state.epoch_samples = 0
            self.loader.set_epoch(self.state.epoch)
        raise RuntimeError(f'epoch {self.state.epoch}: the data loader yields no batch on some rank')
