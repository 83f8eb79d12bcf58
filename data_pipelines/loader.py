"""An exactly resumable WebDataset loader on torchdata's ``StatefulDataLoader``.

The pipeline, per data-loader worker, is a composition of small stages::

    shard plan (epoch: sample ranges per rank/worker | resampled: weighted shard draws)
      -> interleave up to ``interleave_shards`` open shards (seeded pick)     [tario.iter_tar_samples]
      -> select image / caption / label / metadata                            [_select_fields]
      -> metadata filters                                                     [filters]
      -> decode + transform (fast JPEG path, seeded per sample)               [transforms]
      -> tokenize caption                                                     [text]

No stage buffers samples, so the whole position is the plan position, the open shards' (url, samples consumed)
and one RNG state; that is what the worker iterator's ``state_dict`` holds, and StatefulDataLoader collects it
from every worker after every batch. Augmentation randomness is re-seeded per sample from
(seed, epoch, rank, worker, sample index), so resumed batches are identical tensor for tensor.

Bad samples raise ``SkipSample`` in a stage; :meth:`_WorkerIterator.__next__` is the one place that catches it,
counts it per reason and logs shard + key (``errors.SkipCounter``). ``loader.skip_counts()`` sums the counts.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import random
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipelines.decode import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_limit, decode_image
from data_pipelines.errors import (
    BAD_LABEL,
    BAD_METADATA,
    MISSING_CAPTION,
    MISSING_IMAGE,
    SkipCounter,
    SkipSample,
)
from data_pipelines.filters import SampleFilter
from data_pipelines.manifest import manifest_sample_counts, read_manifest
from data_pipelines.tario import DEFAULT_REMOTE, RemoteOptions, count_tar_samples, expand_urls, iter_tar_samples
from data_pipelines.text import build_tokenizer, clean_caption

log = logging.getLogger("data_pipelines")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
_ITER_STATE_MARK = "__data_pipelines_iterator__"
STATE_VERSION = 1


@dataclass
class SourceSpec:
    """A named data source: shard URLs and a mixture weight.

    ``urls``: a brace pattern (``/data/cc12m/cc12m-{000000..002175}.tar``), ``::``-joined patterns, or a list;
    local paths, ``file:``, ``http(s)://`` or ``pipe:COMMAND`` (object stores). ``weight``: relative share of samples
    drawn from this source in resampled mode; None means "by size" (its sample count from the manifest, else its shard
    count times the mean samples per shard). Epoch mode reads every sample of every source once and ignores it.
    """

    name: str
    urls: str | list[str]
    weight: float | None = None
    image_extensions: Sequence[str] = IMAGE_EXTENSIONS
    manifest: str | None = None  # manifest.json for remote (pipe:) shards, matched by shard file name
    remote: RemoteOptions = DEFAULT_REMOTE  # timeouts and retries of http(s):// and pipe: shards


@dataclass
class _Shard:
    url: str
    samples: int | None
    source: int


@dataclass
class _Slot:
    """One open shard segment: samples [start, stop) of ``url``; ``consumed`` of them already read."""

    url: str
    source: int
    start: int
    stop: int | None
    consumed: int = 0
    to_end: bool = True  # read on to the end of the tar after ``stop`` so that a truncation is reported
    next_offset_bytes: int | None = None  # where sample start + consumed begins (uncompressed local/http(s) tars)
    reader: Iterator[dict] | None = field(default=None, repr=False)

    def open(self, remote: RemoteOptions = DEFAULT_REMOTE) -> Iterator[dict]:
        if self.reader is None:
            remaining = None if self.stop is None else self.stop - self.start - self.consumed
            if remaining == 0:  # saved right after its last sample: nothing to open the shard for
                self.reader = iter(())
            elif self.consumed and self.next_offset_bytes is not None:  # resume: seek instead of reading past
                self.reader = iter_tar_samples(self.url, start_offset_bytes=self.next_offset_bytes, remote=remote,
                                               max_samples=remaining, check_end=self.to_end)
            else:
                self.reader = iter_tar_samples(self.url, skip_samples=self.start + self.consumed, remote=remote,
                                               max_samples=remaining, check_end=self.to_end)
        return self.reader


def _stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, identical in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def resolve_shards(sources: Sequence[SourceSpec], *, need_counts: bool) -> list[_Shard]:
    """Expand every source's URLs; attach sample counts from manifests (or, if ``need_counts``, by reading tar
    headers of shards without one)."""
    shards: list[_Shard] = []
    for i, source in enumerate(sources):
        urls = expand_urls(source.urls)
        if not urls:
            raise ValueError(f"source {source.name!r}: no shard URLs in {source.urls!r}")
        counts = manifest_sample_counts(urls)
        if source.manifest is not None:
            counts.update(_counts_from_manifest_file(source.manifest, urls))
        for url in urls:
            n = counts.get(url)
            if n is None and need_counts:
                try:
                    n = count_tar_samples(url, source.remote)
                except SkipSample as e:  # a plan cannot be cut around a shard of unknown size
                    raise ValueError(f"source {source.name!r}: cannot count the samples of {url} ({e}); epoch mode "
                                     f"needs every shard's count: give the source a manifest (then the shard is "
                                     f"skipped and counted when read) or leave the URL out") from e
            shards.append(_Shard(url, n, i))
    return shards


def _counts_from_manifest_file(path: str, urls: list[str]) -> dict[str, int]:
    """Sample counts for ``urls`` from the manifest at ``path``, matching the ``*.tar`` file name in each URL."""
    by_name = {shard["name"]: shard["samples"] for shard in read_manifest(path)["shards"]}
    counts = {}
    for url in urls:
        names = [n for n in re.findall(r"[^/\s'\"]+\.(?:tar|tgz|tar\.gz)", url) if n in by_name]
        if names:
            counts[url] = by_name[names[-1]]
    return counts


Piece = tuple[str, int, int, int, bool]  # (url, start, stop, source, ends_shard): samples [start, stop) of a shard


def epoch_order(shards: Sequence[_Shard], *, seed: int, epoch: int) -> list[Piece]:
    """Every sample of an epoch in its global order: the shards, whole, shuffled identically on all ranks from
    (seed, epoch)."""
    order = list(range(len(shards)))
    random.Random(_stable_seed("shard-order", seed, epoch)).shuffle(order)
    return [(shards[i].url, 0, shards[i].samples, shards[i].source, True) for i in order]


def epoch_plan(shards: Sequence[_Shard], *, seed: int, epoch: int, rank: int, world_size: int, worker_id: int,
               num_workers: int, batch_size: int, drop_last: bool, rest: Sequence[Piece] | None = None) -> list[Piece]:
    """The segments (url, start, stop, source, ends_shard) that one worker reads in epoch mode.

    All ranks shuffle the shard order identically from (seed, epoch), lay the samples end to end and cut them into
    ``world_size`` contiguous ranges (sizes differ by at most one; with ``drop_last`` every rank gets the same
    whole number of batches and the remainder, a different one each epoch, is left out). Each rank's range is dealt
    to its workers in whole batches, so at most one worker per rank ends with a partial batch.
    ``rest``: the pieces of the epoch not yet read (by a run at another world size, see
    :func:`data_pipelines.epoch_rest.rest_of_epoch`), in their global order, cut instead of the whole epoch.
    """
    if rest is None:
        global_workers = world_size * num_workers
        if len(shards) < global_workers:
            raise ValueError(f"epoch mode needs at least one shard per data-loader worker: {len(shards)} shards for "
                             f"{world_size} ranks x {num_workers} workers; write smaller shards (--samples-per-shard) "
                             f"or use fewer workers or the resampled mode")
        rest = epoch_order(shards, seed=seed, epoch=epoch)
    total = sum(stop - start for _, start, stop, _, _ in rest)
    if drop_last:
        per_rank = (total // world_size // batch_size) * batch_size
        rank_start, rank_stop = rank * per_rank, (rank + 1) * per_rank
    else:
        rank_start, rank_stop = rank * total // world_size, (rank + 1) * total // world_size
    n_rank = rank_stop - rank_start
    full_batches, remainder = divmod(n_rank, batch_size)
    sizes = [(full_batches // num_workers + (w < full_batches % num_workers)) * batch_size
             for w in range(num_workers)]
    sizes[full_batches % num_workers] += remainder
    start = rank_start + sum(sizes[:worker_id])
    stop = start + sizes[worker_id]
    plan = []
    offset = 0
    for url, piece_start, piece_stop, source, ends_shard in rest:
        n = piece_stop - piece_start
        lo, hi = max(start - offset, 0), min(stop - offset, n)
        if lo < hi:
            plan.append((url, piece_start + lo, piece_start + hi, source, ends_shard and hi == n))
        offset += n
    return plan


class WebDatasetStream(IterableDataset):
    """Iterable dataset over WebDataset shards; ``iter()`` gives a resumable :class:`_WorkerIterator`.

    Samples are dicts ``{"image": Tensor[3,H,W], "label": int (-1 if absent), "key": str, "source": str,
    "text": LongTensor[77] and "has_text": bool (only with a tokenizer; ``has_text`` is False for a sample without
    a caption when captions are not required, whose ``text`` is then the empty caption's tokens)}``.
    """

    def __init__(self, sources: Sequence[SourceSpec], *, mode: str, seed: int, rank: int, world_size: int,
                 batch_size: int, transform: Callable, tokenizer: Callable | None = None,
                 caption_required: bool | None = None, filters: Sequence[SampleFilter] = (), epoch: int = 0,
                 drop_last: bool = False, interleave_shards: int = 4, samples_per_epoch: int | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        if mode not in ("epoch", "resampled"):
            raise ValueError(f"mode must be 'epoch' or 'resampled', not {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if interleave_shards < 1:
            raise ValueError("interleave_shards must be >= 1")
        self.sources = list(sources)
        self.mode = mode
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.transform = transform
        self.tokenizer = tokenizer
        self.caption_required = tokenizer is not None if caption_required is None else caption_required
        self.filters = list(filters)
        self.epoch = epoch
        self.epoch_consumed = 0  # see set_epoch
        self.epoch_rest: list[Piece] | None = None  # see set_epoch
        self.drop_last = drop_last
        self.interleave_shards = interleave_shards
        self.samples_per_epoch = samples_per_epoch
        self.max_image_pixels = max_image_pixels
        self.shards = resolve_shards(self.sources, need_counts=(mode == "epoch"))
        self.shard_weights = self._shard_weights()
        self.shard_cum_weights = list(itertools.accumulate(self.shard_weights))
        self.fingerprint = _stable_seed([(s.url, s.samples) for s in self.shards])

    def _shard_weights(self) -> list[float]:
        """Per-shard draw weight in resampled mode: each source's weight spread over its shards by size."""
        known = [s.samples for s in self.shards if s.samples is not None]
        mean_samples = sum(known) / len(known) if known else 1.0
        sizes = [s.samples if s.samples is not None else mean_samples for s in self.shards]
        source_sizes = [0.0] * len(self.sources)
        for shard, size in zip(self.shards, sizes):
            source_sizes[shard.source] += size
        weights = []
        for shard, size in zip(self.shards, sizes):
            spec_weight = self.sources[shard.source].weight
            source_weight = source_sizes[shard.source] if spec_weight is None else spec_weight
            weights.append(source_weight * size / source_sizes[shard.source] if source_sizes[shard.source] else 0.0)
        if not any(w > 0 for w in weights):
            raise ValueError("all source weights are zero")
        return weights

    def set_epoch(self, epoch: int, consumed: int = 0, rest: Sequence[Piece] | None = None) -> None:
        """Select the epoch (shard order in epoch mode, shard draws in resampled mode) of the next ``iter()``.

        ``consumed`` (resampled mode with ``samples_per_epoch``): samples of this epoch, over all ranks, that a run at
        another world size already trained on. The pass is then the rest of the epoch, ``samples_per_epoch -
        consumed``, drawn afresh (the draws are also seeded by ``consumed``), so a resized run neither replays the
        epoch's first draws nor moves its end.
        ``rest`` (epoch mode, with the ``consumed`` count): the pieces of the epoch that a run at another world size
        did not read (``WebDatasetLoader.load_other_world_size`` computes them); the pass reads exactly those, cut
        over this run's ranks and workers."""
        if rest is not None and self.mode != "epoch":
            raise ValueError(f"the rest of an epoch as shard pieces is for epoch mode, not {self.mode!r}")
        if consumed and rest is None and not self.continues_epochs:
            raise ValueError("continuing an epoch after `consumed` samples needs resampled mode with samples_per_epoch"
                             f" (mode {self.mode!r}, samples_per_epoch {self.samples_per_epoch}), or in epoch mode "
                             "the pieces not yet read (load_other_world_size)")
        if consumed < 0:
            raise ValueError(f"consumed must be >= 0, got {consumed}")
        self.epoch = epoch
        self.epoch_consumed = consumed
        self.epoch_rest = None if rest is None else [tuple(piece) for piece in rest]

    @property
    def continues_epochs(self) -> bool:
        """Whether ``set_epoch(e, consumed)`` can continue an epoch part-way (resampled mode with samples_per_epoch)."""
        return self.mode == "resampled" and self.samples_per_epoch is not None

    def __iter__(self) -> _WorkerIterator:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return _WorkerIterator(self, worker_id, num_workers)


class _WorkerIterator:
    """The per-worker sample stream; ``state_dict``/``load_state_dict`` make it exactly resumable."""

    def __init__(self, ds: WebDatasetStream, worker_id: int, num_workers: int):
        self.ds = ds
        self.worker_id = worker_id
        self.num_workers = num_workers
        self.epoch = ds.epoch
        self.consumed = ds.epoch_consumed
        self.skips = SkipCounter()
        self._reset()

    def _salt(self) -> tuple:
        """Seed parts that tell a pass continuing an epoch at another world size from the epoch's own pass."""
        return ("rest of epoch", self.consumed) if self.consumed else ()

    def _reset(self) -> None:
        ds = self.ds
        self.rng = random.Random(_stable_seed("worker", ds.seed, self.epoch, ds.rank, self.worker_id, *self._salt()))
        self.plan: list[tuple[str, int, int, int, bool]] | None = None  # epoch mode only; built lazily
        self.next_segment = 0
        self.slots: list[_Slot] = []
        self.n_processed = 0  # samples read from tars (good or bad), also the augmentation seed counter
        self.n_yielded = 0
        self.failed_shards_in_a_row = 0
        self.limit = None
        if ds.mode == "resampled" and ds.samples_per_epoch is not None:
            remaining = max(ds.samples_per_epoch - self.consumed, 0)
            per_worker = -(-remaining // (ds.world_size * self.num_workers))
            self.limit = -(-per_worker // ds.batch_size) * ds.batch_size

    # ---- stage: shard plan -------------------------------------------------------------------------------------
    def _fill_slots(self) -> None:
        ds = self.ds
        if ds.mode == "epoch":
            if self.plan is None:
                self.plan = epoch_plan(ds.shards, seed=ds.seed, epoch=self.epoch, rank=ds.rank,
                                       world_size=ds.world_size, worker_id=self.worker_id,
                                       num_workers=self.num_workers, batch_size=ds.batch_size,
                                       drop_last=ds.drop_last, rest=ds.epoch_rest)
            while len(self.slots) < ds.interleave_shards and self.next_segment < len(self.plan):
                url, start, stop, source, ends_shard = self.plan[self.next_segment]
                self.slots.append(_Slot(url, source, start, stop, to_end=ends_shard))
                self.next_segment += 1
        else:
            while len(self.slots) < ds.interleave_shards:
                (index,) = self.rng.choices(range(len(ds.shards)), cum_weights=ds.shard_cum_weights)
                shard = ds.shards[index]
                self.slots.append(_Slot(shard.url, shard.source, 0, None))
                self.next_segment += 1

    # ---- the pipeline driver: the one place that handles bad samples -------------------------------------------
    def __iter__(self) -> _WorkerIterator:
        return self

    def __next__(self) -> dict:
        while True:
            if self.limit is not None and self.n_yielded >= self.limit:
                raise StopIteration
            self._fill_slots()
            if not self.slots:
                raise StopIteration
            slot = self.slots[self.rng.randrange(len(self.slots))]
            try:
                raw = next(slot.open(self.ds.sources[slot.source].remote))
            except StopIteration:
                self.slots.remove(slot)
                continue
            except SkipSample as e:  # unreadable or truncated shard: its good samples were already delivered
                self.slots.remove(slot)
                self.skips.skip(e, shard=slot.url, key=None)
                self.failed_shards_in_a_row += slot.consumed == 0
                if self.failed_shards_in_a_row > max(16, 2 * len(self.ds.shards)):
                    # In resampled mode this would otherwise spin forever on sources that cannot be read.
                    raise RuntimeError(f"{self.failed_shards_in_a_row} shards in a row could not be read (last: "
                                       f"{slot.url}: {e}); check the URLs and credentials") from e
                continue
            slot.consumed += 1
            slot.next_offset_bytes = raw.pop("__next_offset__", None)
            self.failed_shards_in_a_row = 0
            self.n_processed += 1
            key = raw["__key__"]
            try:
                sample = self._process(raw, slot)
            except SkipSample as e:
                self.skips.skip(e, shard=slot.url, key=key)
                continue
            self.n_yielded += 1
            return sample

    # ---- stages: select -> filter -> decode/transform -> tokenize ----------------------------------------------
    def _process(self, raw: dict, slot: _Slot) -> dict:
        ds = self.ds
        source = ds.sources[slot.source]
        fields = _select_fields(raw, source.image_extensions)
        if fields["caption"] is None and ds.caption_required:
            raise SkipSample(MISSING_CAPTION)
        for sample_filter in ds.filters:
            sample_filter(fields)
        aug_seed = _stable_seed("aug", ds.seed, self.epoch, ds.rank, self.worker_id, self.n_processed, *self._salt())
        with _seeded_rngs(aug_seed):
            image = _apply_transform(ds.transform, fields["image"], ds.max_image_pixels)
        sample = {"image": image, "label": fields["label"], "key": raw["__key__"], "source": source.name}
        if ds.tokenizer is not None:
            sample["text"] = ds.tokenizer(fields["caption"] or "")
            sample["has_text"] = fields["caption"] is not None
        return sample

    # ---- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        ds = self.ds
        return {
            _ITER_STATE_MARK: STATE_VERSION,
            "mode": ds.mode, "seed": ds.seed, "rank": ds.rank, "world_size": ds.world_size,
            "worker_id": self.worker_id, "num_workers": self.num_workers, "fingerprint": ds.fingerprint,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "next_segment": self.next_segment,
            "slots": [(s.url, s.source, s.start, s.stop, s.consumed, s.to_end, s.next_offset_bytes)
                      for s in self.slots],
            "rng": self.rng.getstate(),
            "n_processed": self.n_processed,
            "n_yielded": self.n_yielded,
            "skips": self.skips.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        ds = self.ds
        if state.get(_ITER_STATE_MARK) != STATE_VERSION:
            raise ValueError("not a data_pipelines loader state (or from another version)")
        expected = {"mode": ds.mode, "seed": ds.seed, "rank": ds.rank, "world_size": ds.world_size,
                    "worker_id": self.worker_id, "num_workers": self.num_workers, "fingerprint": ds.fingerprint}
        mismatched = {k: (state[k], v) for k, v in expected.items() if state[k] != v}
        if mismatched:
            raise ValueError(f"cannot resume the data loader exactly: saved vs current differ in {mismatched} "
                             f"(resume needs the same sources, seed, ranks and workers)")
        for slot in self.slots:
            if slot.reader is not None:
                slot.reader.close()
        self.epoch = state["epoch"]
        self.consumed = state.get("consumed", 0)
        self._reset()
        self.next_segment = state["next_segment"]
        self.slots = [_Slot(*slot) for slot in state["slots"]]
        self.rng.setstate(state["rng"])
        self.n_processed = state["n_processed"]
        self.n_yielded = state["n_yielded"]
        self.skips.load_state_dict(state["skips"])


def _select_fields(raw: dict, image_extensions: Sequence[str]) -> dict:
    """Stage: pick the image bytes, cleaned caption, label and JSON metadata out of a raw tar sample."""
    image = next((raw[ext] for ext in image_extensions if ext in raw), None)
    if image is None:
        raise SkipSample(MISSING_IMAGE, f"extensions present: {sorted(k for k in raw if not k.startswith('__'))}")
    caption = clean_caption(raw["txt"]) if "txt" in raw else None
    label = -1
    if "cls" in raw:
        try:
            label = int(raw["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as e:
            raise SkipSample(BAD_LABEL, repr(raw["cls"][:20])) from e
    meta = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, ValueError) as e:
            raise SkipSample(BAD_METADATA, str(e)) from e
    return {"image": image, "caption": caption or None, "label": label, "meta": meta}


def _apply_transform(transform: Callable, data: bytes, max_image_pixels: int) -> torch.Tensor:
    """Stage: bytes -> tensor, through the transform's fused ``from_encoded`` fast path when it has one."""
    if hasattr(transform, "from_encoded"):
        if data:
            check_pixel_limit(data, max_image_pixels)  # the loader's limit, whatever the transform's own is
        return transform.from_encoded(data)
    return transform(decode_image(data, max_image_pixels=max_image_pixels))


class _seeded_rngs:
    """Seed Python, NumPy and torch RNGs for one sample's augmentation, and restore them afterwards when the loader
    runs in the trainer's own process (num_workers=0). A worker process draws from them for nothing else, so it
    skips the save and restore (about 0.1 ms of a 28 x 28 sample's 1.1 ms on this CPU)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        in_worker = get_worker_info() is not None
        self.saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed % (1 << 32))
        # Only the CPU generator: torch.manual_seed would also queue CUDA seeding (milliseconds per call).
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            return
        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])
        torch.random.set_rng_state(self.saved[2])


def _iterator_states(state: object) -> Iterator[dict]:
    """Find every worker iterator state nested anywhere in a StatefulDataLoader state dict."""
    if isinstance(state, dict):
        if _ITER_STATE_MARK in state:
            yield state
            return
        for value in state.values():
            yield from _iterator_states(value)
    elif isinstance(state, list | tuple):
        for value in state:
            yield from _iterator_states(value)


class WebDatasetLoader(StatefulDataLoader):
    """StatefulDataLoader over a :class:`WebDatasetStream` with ``set_epoch``, ``skip_counts`` and a resume check."""

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        """Select the epoch for the next ``iter(loader)`` (workers are not persistent: each pass ships them the
        dataset anew, epoch included);
        ``consumed``: see :meth:`WebDatasetStream.set_epoch`."""
        self.dataset.set_epoch(epoch, consumed)

    def load_other_world_size(self, states: Sequence[dict]) -> str:
        """Epoch mode: continue the epoch that a run at another world size saved, from ``states``, the
        :meth:`state_dict` of each of its ranks in rank order. This pass reads exactly the samples of that epoch
        that no old worker had read (each old worker's plan is recomputed and its open shards' positions
        subtracted), cut over this loader's ranks and workers, so over all ranks nothing is read twice; with
        ``drop_last`` the remainders of the old cut and of this one are left out, as any epoch's would be.
        Returns a sentence saying so; raises ValueError when the states cannot be mapped (another mode, sources or
        seed, a rank missing)."""
        from data_pipelines.epoch_rest import rest_of_epoch

        ds = self.dataset
        epoch, rest, consumed = rest_of_epoch(ds, states)
        ds.set_epoch(epoch, consumed=consumed, rest=rest)
        left = sum(stop - start for _, start, stop, _, _ in rest)
        return (f"epoch {epoch} goes on with the {left} samples that the {len(states)} saved ranks had not read "
                f"({consumed} read)")

    @property
    def continues_epochs(self) -> bool:
        """See :attr:`WebDatasetStream.continues_epochs`."""
        return self.dataset.continues_epochs

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples per reason in the current pass, over all workers, as of the latest batch received."""
        total: dict[str, int] = {}
        if getattr(self, "_iterator", None) is None and self.next_iter_state is None:
            return total  # nothing read yet (and state_dict() would start workers just to say so)
        # The state_dict snapshot is taken when a batch is yielded, so it misses skips a worker made after its
        # last batch; torchdata's live per-worker states (private, hence the fallback) include them.
        live = getattr(getattr(self, "_iterator", None), "_worker_snapshots", None)
        states = [w.get_state() for w in live.values()] if live else [super().state_dict()]
        for iterator_state in _iterator_states(states):
            for reason, n in iterator_state["skips"].items():
                total[reason] = total.get(reason, 0) + n
        return dict(sorted(total.items()))

    def state_dict(self) -> dict:
        """The loader position: torchdata's state plus what must match on resume."""
        ds = self.dataset
        return {"stateful_dataloader": super().state_dict(),
                "data_pipelines": {"version": STATE_VERSION, "epoch": ds.epoch, "epoch_consumed": ds.epoch_consumed,
                                   "epoch_rest": ds.epoch_rest, "batch_size": ds.batch_size,
                                   "drop_last": ds.drop_last,
                                   "num_workers": self.num_workers,
                                   "rank": ds.rank, "world_size": ds.world_size, "seed": ds.seed,
                                   "mode": ds.mode, "fingerprint": ds.fingerprint}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict`; raises ValueError if it cannot continue exactly."""
        ds = self.dataset
        saved = state["data_pipelines"]
        current = {"version": STATE_VERSION, "num_workers": self.num_workers, "rank": ds.rank,
                   "world_size": ds.world_size, "seed": ds.seed, "mode": ds.mode, "fingerprint": ds.fingerprint}
        mismatched = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if mismatched:
            raise ValueError(f"cannot resume the data loader exactly; saved vs current: {mismatched} "
                             f"(keep the sources, seed, mode, ranks and num_workers of the saved run)")
        ds.set_epoch(saved["epoch"], saved.get("epoch_consumed", 0), saved.get("epoch_rest"))
        super().load_state_dict(state["stateful_dataloader"])


# forkserver, not fork: the trainer forks workers at every epoch from a process that has other threads (gloo,
# DeepSpeed, OpenMP, queue feeders); a lock one of them holds at fork time stays locked in the child for ever.
WORKER_START_METHOD = "forkserver"
WORKER_START_METHODS = ("forkserver", "spawn", "fork")
_forkserver_preload = {"data_pipelines.loader"}


def worker_context(method: str, shipped: Sequence[object] = ()):
    """The multiprocessing context that starts loader workers: "forkserver" (default; workers fork from a clean,
    single-threaded server process that imported the loader and the modules of the ``shipped`` objects once),
    "spawn" (a fresh interpreter per worker: each imports torch and the loader) or "fork" (fastest, unsafe in a
    process with threads). An object may name extra modules in ``worker_preload_modules`` (the tokenizer:
    open_clip). The forkserver starts here, with the first loader (it imports while the trainer builds its model);
    modules of objects shipped by loaders built later are imported per worker."""
    import multiprocessing
    import multiprocessing.forkserver

    if method not in WORKER_START_METHODS:
        raise ValueError(f"worker_start_method must be one of {WORKER_START_METHODS}, not {method!r}")
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        for obj in shipped:
            if obj is not None:
                _forkserver_preload.add(type(obj).__module__)
                _forkserver_preload.update(getattr(obj, "worker_preload_modules", ()))
        context.set_forkserver_preload(sorted(m for m in _forkserver_preload if m != "builtins"))
        # Start it now: it imports in the background while the trainer builds the model, not at the first batch.
        multiprocessing.forkserver.ensure_running()
    return context


def _exit_with_main_process(main_pid: int, worker_id: int) -> None:  # noqa: ARG001 - worker_init_fn's signature
    """worker_init_fn for forkserver/spawn workers: exit when the loader's process is gone. torch's own check
    watches the worker's parent, which here is the forkserver; a trainer that left with ``os._exit`` (watchdog,
    requeue) or was killed would otherwise leave its workers, and through them the forkserver, alive for ever."""

    def watch() -> None:
        while True:
            time.sleep(2.0)
            try:
                os.kill(main_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, name="exit-with-main-process", daemon=True).start()


def build_loader(sources: Sequence[SourceSpec] | SourceSpec, *, batch_size: int, num_workers: int, mode: str = "epoch",
                 seed: int = 0, rank: int = 0, world_size: int = 1, transform: Callable,
                 tokenizer: Callable | str | None = None, epoch: int = 0, caption_required: bool | None = None,
                 filters: Sequence[SampleFilter] = (), drop_last: bool = False, interleave_shards: int = 4,
                 samples_per_epoch: int | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 pin_memory: bool = False, prefetch_factor: int | None = None,
                 worker_start_method: str = WORKER_START_METHOD) -> WebDatasetLoader:
    """Build the training/eval loader.

    In: ``sources`` (SourceSpec or a list); ``mode`` "epoch" (every sample once per epoch over all ranks and
    workers; ``drop_last`` gives every rank the same number of full batches and drops a batch left short by skipped
    samples, as training needs; evaluation keeps partial batches) or "resampled" (infinite weighted
    shard draws, or ``samples_per_epoch`` over all ranks); ``transform`` maps an image (PIL, or bytes through its
    ``from_encoded``) to Tensor[3,H,W]; ``tokenizer`` an open_clip model name or a callable str -> LongTensor[77];
    captions are required when a tokenizer is given (unless ``caption_required=False``). ``worker_start_method``:
    how worker processes start (see :func:`worker_context`); the dataset, transform, tokenizer and filters must pickle.

    Out: a :class:`WebDatasetLoader` (a ``StatefulDataLoader``) yielding dicts ``image`` float [B,3,H,W],
    ``label`` long [B] (-1 where absent), ``key`` list[str], ``source`` list[str], ``text`` long [B,77] and
    ``has_text`` bool [B] with a tokenizer. ``state_dict()`` / ``load_state_dict()`` resume exactly;
    ``skip_counts()`` reports bad samples.
    """
    if isinstance(sources, SourceSpec):
        sources = [sources]
    if isinstance(tokenizer, str):
        tokenizer = build_tokenizer(tokenizer)
    dataset = WebDatasetStream(sources, mode=mode, seed=seed, rank=rank, world_size=world_size,
                               batch_size=batch_size, transform=transform, tokenizer=tokenizer,
                               caption_required=caption_required, filters=filters, epoch=epoch,
                               drop_last=drop_last, interleave_shards=interleave_shards,
                               samples_per_epoch=samples_per_epoch, max_image_pixels=max_image_pixels)
    if mode == "epoch":  # fail now, in the main process, rather than inside a worker
        epoch_plan(dataset.shards, seed=seed, epoch=epoch, rank=rank, world_size=world_size, worker_id=0,
                   num_workers=max(num_workers, 1), batch_size=batch_size, drop_last=drop_last)
    kwargs = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
    if num_workers > 0:
        kwargs["multiprocessing_context"] = worker_context(worker_start_method, (transform, tokenizer, *filters))
        if worker_start_method != "fork":
            kwargs["worker_init_fn"] = functools.partial(_exit_with_main_process, os.getpid())
    # Non-persistent workers: each pass gets a fresh copy of the dataset (epoch) and no memory creeps across
    # epochs (webdataset#365); every batch carries its worker's state (snapshot_every_n_steps=1) for exactness.
    # drop_last also at the batch level: a skipped sample must not leave a short batch (odd for Mixup, unequal
    # shapes for all_gather); the plan already makes every other batch full.
    with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch API in its constructor
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return WebDatasetLoader(dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=False,
                                pin_memory=pin_memory, drop_last=drop_last, snapshot_every_n_steps=1,
                                generator=torch.Generator().manual_seed(_stable_seed("loader", seed, rank)),
                                **kwargs)

