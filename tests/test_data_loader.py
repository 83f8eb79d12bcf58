"""The loader on real shards: contents exact, bad samples skipped and counted per reason, epoch mode split over
2 ranks x 2 workers, resampled mixing, and exact resume through StatefulDataLoader state."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter

import pytest
import torch

from data_pipelines.filters import field_condition, min_image_side
from data_pipelines.loader import SourceSpec, build_loader
from data_pipelines.text import build_tokenizer, clean_caption
from data_pipelines.transforms import build_train_transform
from data_pipelines.writers import WriteOptions, list_webdataset, write_shards
from tests.data_helpers import (
    CC12M_TAR,
    MNIST_TGZ,
    REPO_ROOT,
    bad_samples,
    read_tar,
    unusual_images,
    write_cc12m_shards,
    write_tar,
)

SMALL = build_train_transform(32)


def tiny_tensor(img) -> torch.Tensor:
    """A cheap transform (PIL image -> Tensor[3,2,2]) for tests that only look at which samples arrive."""
    return torch.zeros(3, 2, 2)
MAX_PIXELS = 10_000_000


@pytest.fixture(scope="module")
def cc12m_dir(tmp_path_factory) -> str:
    return write_cc12m_shards(str(tmp_path_factory.mktemp("cc12m") / "cc12m"), per_shard=4)


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("mnist") / "mnist")
    samples, _ = list_webdataset(MNIST_TGZ)
    write_shards(samples, out, WriteOptions(samples_per_shard=30, progress=False, prefix="mnist"), kind="webdataset",
                 input_desc=MNIST_TGZ)
    return out


CC12M_URLS = "cc12m-{000000..000007}.tar"


def collect(loader, max_batches: int | None = None) -> list[dict]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if max_batches is not None and len(batches) == max_batches:
            break
    return batches


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> tuple[list[str], list[str], dict[str, int]]:
    """A shard of every bad case plus good and unusual samples, and a truncated shard.
    Returns (urls, keys that must be delivered, expected skip counts)."""
    root = tmp_path_factory.mktemp("bad")
    original = read_tar(CC12M_TAR)
    keys = sorted(original)
    good = [(k, {"jpg": original[k]["jpg"], "txt": original[k]["txt"]}) for k in keys[:5]]
    unusual = [(f"odd_{name}", {("jpg" if name.endswith("jpeg") else "png"): data, "txt": name.encode()})
               for name, (data, _) in sorted(unusual_images().items())]
    bad = bad_samples(original[keys[5]]["jpg"])
    mixed = good[:2] + [(k, p) for k, p, _ in bad[:4]] + unusual + good[2:] + [(k, p) for k, p, _ in bad[4:]]
    write_tar(str(root / "bad-000000.tar"), mixed)
    # A shard cut in the middle of its 6th sample's image: the first 5 samples must still arrive.
    whole = [(k, {"jpg": original[k]["jpg"], "txt": original[k]["txt"]}) for k in keys[10:18]]
    write_tar(str(root / "whole.tar"), whole)
    with tarfile.open(root / "whole.tar") as tar:
        cut_at = next(m for m in tar.getmembers() if m.name == f"{keys[15]}.jpg")
    data = (root / "whole.tar").read_bytes()[: cut_at.offset_data + cut_at.size // 2]
    (root / "bad-000001.tar").write_bytes(data)
    expected_keys = [k for k, _ in good + unusual] + keys[10:15]
    expected_skips = dict(Counter(reason for _, _, reason in bad))
    expected_skips["truncated_tar"] = 1
    return [str(root / "bad-000000.tar"), str(root / "bad-000001.tar")], expected_keys, expected_skips


def test_bad_samples_skipped_with_counts_per_reason(bad_shards):
    urls, expected_keys, expected_skips = bad_shards
    loader = build_loader(SourceSpec("bad", urls), batch_size=4, num_workers=0, transform=SMALL,
                          tokenizer="ViT-B-32", max_image_pixels=MAX_PIXELS)
    batches = collect(loader)
    assert sorted(keys_of(batches)) == sorted(expected_keys)
    assert loader.skip_counts() == dict(sorted(expected_skips.items()))
    assert all(torch.isfinite(b["image"]).all() for b in batches)


@pytest.mark.slow
@pytest.mark.dist
def test_check_cli_reports_good_and_skipped_with_workers(bad_shards):
    urls, expected_keys, expected_skips = bad_shards
    result = subprocess.run([sys.executable, "-m", "data_pipelines", "check", "::".join(urls), "--json",
                             "--require-caption", "--max-image-pixels", str(MAX_PIXELS), "--workers", "2"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr  # something was skipped
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {k: report[k] for k in ("good", "skipped")} == {"good": len(expected_keys),
                                                           "skipped": dict(sorted(expected_skips.items()))}
    assert [(s["url"], s["reason"]) for s in report["skipped_shards"]] == [(urls[1], "truncated_tar")]


def test_captions_tokens_and_labels_exact(cc12m_dir, mnist_dir):
    original = read_tar(CC12M_TAR)
    tokenize = build_tokenizer("ViT-B-32")
    loader = build_loader(SourceSpec("cc12m", os.path.join(cc12m_dir, CC12M_URLS)), batch_size=5, num_workers=0,
                          transform=SMALL, tokenizer=tokenize)
    seen = 0
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 32, 32) and batch["text"].shape[1] == 77
        assert batch["label"].tolist() == [-1] * len(batch["key"])
        for key, tokens in zip(batch["key"], batch["text"]):
            assert torch.equal(tokens, tokenize(clean_caption(original[key]["txt"])))
            seen += 1
    assert seen == 32
    mnist = read_tar(MNIST_TGZ)
    loader = build_loader(SourceSpec("mnist", os.path.join(mnist_dir, "mnist-{000000..000002}.tar")), batch_size=16,
                          num_workers=0, transform=SMALL)
    labels = {k: int(v) for b in loader for k, v in zip(b["key"], b["label"].tolist())}
    assert labels == {k: int(p["cls"]) for k, p in mnist.items()}


@pytest.mark.slow
@pytest.mark.dist
def test_epoch_mode_two_ranks_two_workers_see_every_sample_once(cc12m_dir):
    urls = os.path.join(cc12m_dir, CC12M_URLS)
    per_rank = []
    for rank in range(2):
        loader = build_loader(SourceSpec("cc12m", urls), batch_size=3, num_workers=2, mode="epoch", seed=7,
                              rank=rank, world_size=2, transform=SMALL, interleave_shards=2)
        per_rank.append(keys_of(collect(loader)))
    all_keys = per_rank[0] + per_rank[1]
    assert len(all_keys) == 32 and set(all_keys) == set(read_tar(CC12M_TAR))
    assert [len(k) for k in per_rank] == [16, 16]
    # A new epoch: same samples, another order.
    loader = build_loader(SourceSpec("cc12m", urls), batch_size=3, num_workers=2, seed=7, rank=0, world_size=2,
                          transform=SMALL, epoch=1, interleave_shards=2)
    epoch1 = keys_of(collect(loader))
    assert epoch1 != per_rank[0]
    # drop_last: every rank gets the same number of full batches.
    counts = []
    for rank in range(2):
        loader = build_loader(SourceSpec("cc12m", urls), batch_size=5, num_workers=2, seed=7, rank=rank,
                              world_size=2, transform=SMALL, drop_last=True)
        counts.append([len(b["key"]) for b in collect(loader)])
    assert counts == [[5, 5, 5], [5, 5, 5]]


def test_too_few_shards_is_a_clear_error(cc12m_dir):
    with pytest.raises(ValueError, match="at least one shard per data-loader worker"):
        build_loader(SourceSpec("cc12m", os.path.join(cc12m_dir, "cc12m-{000000..000002}.tar")), batch_size=2,
                     num_workers=2, rank=0, world_size=2, transform=SMALL)


def _resume_matches(make_loader, stop_after: int, total_batches: int | None) -> None:
    reference = collect(make_loader(), total_batches)
    first = make_loader()
    head = collect(first, stop_after)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # the state must survive a checkpoint file
    buffer.seek(0)
    resumed = make_loader()
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    rest_count = None if total_batches is None else total_batches - stop_after
    tail = collect(resumed, rest_count)
    combined = head + tail
    assert keys_of(combined) == keys_of(reference)
    for got, want in zip(combined, reference):
        assert torch.equal(got["image"], want["image"])  # augmentation identical too


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("stop_after", [2, 5])
def test_epoch_mode_resume_is_exact(cc12m_dir, stop_after):
    urls = os.path.join(cc12m_dir, CC12M_URLS)

    def make_loader():
        return build_loader(SourceSpec("cc12m", urls), batch_size=3, num_workers=2, mode="epoch", seed=3,
                            transform=SMALL, interleave_shards=3)

    _resume_matches(make_loader, stop_after, None)


@pytest.mark.slow
@pytest.mark.dist
def test_resampled_mode_resume_is_exact(cc12m_dir, mnist_dir):
    sources = [SourceSpec("cc12m", os.path.join(cc12m_dir, CC12M_URLS)),
               SourceSpec("mnist", os.path.join(mnist_dir, "mnist-{000000..000002}.tar"))]

    def make_loader():
        return build_loader(sources, batch_size=4, num_workers=2, mode="resampled", seed=11, transform=SMALL)

    _resume_matches(make_loader, 3, 8)


def test_resume_with_other_workers_is_refused(cc12m_dir):
    urls = os.path.join(cc12m_dir, CC12M_URLS)
    loader = build_loader(SourceSpec("cc12m", urls), batch_size=4, num_workers=0, transform=SMALL)
    collect(loader, 2)
    state = loader.state_dict()
    other = build_loader(SourceSpec("cc12m", urls), batch_size=4, num_workers=2, transform=SMALL)
    with pytest.raises(ValueError, match="cannot resume"):
        other.load_state_dict(state)
    other_seed = build_loader(SourceSpec("cc12m", urls), batch_size=4, num_workers=0, seed=5, transform=SMALL)
    with pytest.raises(ValueError, match="cannot resume"):
        other_seed.load_state_dict(state)


@pytest.mark.slow
def test_resampled_mixing_weights_and_seeding(mnist_dir):
    source_a = SourceSpec("a", os.path.join(mnist_dir, "mnist-{000000..000001}.tar"), weight=3.0)
    source_b = SourceSpec("b", os.path.join(mnist_dir, "mnist-000002.tar"), weight=1.0)

    def sources_seen(seed: int, rank: int) -> list[str]:
        loader = build_loader([source_a, source_b], batch_size=100, num_workers=0, mode="resampled", seed=seed,
                              rank=rank, world_size=2, transform=tiny_tensor, interleave_shards=2)
        return [s for b in collect(loader, 40) for s in b["source"]]

    seen = sources_seen(0, 0)
    assert abs(seen.count("a") / len(seen) - 0.75) < 0.1
    assert sources_seen(0, 0) == seen  # seeded
    by_size = build_loader([SourceSpec("a", source_a.urls), SourceSpec("b", source_b.urls)], batch_size=1,
                           num_workers=0, mode="resampled", transform=SMALL)
    weights = by_size.dataset.shard_weights
    assert sum(weights[:2]) / sum(weights) == pytest.approx(2 / 3)  # 60 vs 30 samples


def test_other_rank_gets_other_resampled_stream(mnist_dir):
    source = SourceSpec("mnist", os.path.join(mnist_dir, "mnist-{000000..000002}.tar"))
    streams = [keys_of(collect(build_loader(source, batch_size=8, num_workers=0, mode="resampled", seed=1, rank=r,
                                            world_size=2, transform=SMALL), 4)) for r in range(2)]
    assert streams[0] != streams[1]


def test_metadata_filters_count_as_skips(cc12m_dir):
    original = read_tar(CC12M_TAR)
    small = sum(min(json.loads(p["json"])["width"], json.loads(p["json"])["height"]) < 400
                for p in original.values())
    loader = build_loader(SourceSpec("cc12m", os.path.join(cc12m_dir, CC12M_URLS)), batch_size=8, num_workers=0,
                          transform=SMALL, filters=[min_image_side(400), field_condition("status == success")])
    assert len(keys_of(collect(loader))) == 32 - small
    assert loader.skip_counts() == ({"filter:min_image_side": small} if small else {})


def test_pipe_urls_with_a_manifest_read_like_local_files(cc12m_dir):
    local = os.path.join(cc12m_dir, CC12M_URLS)
    piped = f"pipe:cat {local}"
    ref = build_loader(SourceSpec("cc12m", local), batch_size=4, num_workers=0, seed=2, transform=SMALL)
    via_pipe = build_loader(SourceSpec("cc12m", piped, manifest=os.path.join(cc12m_dir, "manifest.json")),
                            batch_size=4, num_workers=0, seed=2, transform=SMALL)
    assert [s.samples for s in via_pipe.dataset.shards] == [4] * 8  # from the manifest, not by reading
    ref_batches, pipe_batches = collect(ref), collect(via_pipe)
    assert keys_of(pipe_batches) == keys_of(ref_batches) and len(keys_of(ref_batches)) == 32
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(ref_batches, pipe_batches))


def test_unreadable_shards_are_counted_not_fatal(cc12m_dir, tmp_path):
    good = os.path.join(cc12m_dir, "cc12m-000000.tar")
    failing_pipe = f"pipe:cat {good}; exit 3"
    missing = str(tmp_path / "missing.tar")
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    loader = build_loader(SourceSpec("mixed", [good, failing_pipe, missing, str(empty)]), batch_size=2,
                          num_workers=0, mode="resampled", samples_per_epoch=8, transform=SMALL, interleave_shards=1,
                          seed=4)
    keys = keys_of(collect(loader))
    assert len(keys) == 8 and set(keys) <= set(read_tar(good))
    assert set(loader.skip_counts()) == {"unreadable_shard"}


def test_resampled_mode_with_no_readable_shard_fails_fast_instead_of_spinning(tmp_path):
    loader = build_loader(SourceSpec("gone", [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]), batch_size=2,
                          num_workers=0, mode="resampled", transform=SMALL)
    with pytest.raises(RuntimeError, match="shards in a row could not be read"):
        collect(loader, 1)


def test_set_epoch_reorders_the_same_samples(cc12m_dir):
    loader = build_loader(SourceSpec("cc12m", os.path.join(cc12m_dir, CC12M_URLS)), batch_size=8, num_workers=0,
                          seed=1, transform=tiny_tensor)
    epoch0 = keys_of(collect(loader))
    assert keys_of(collect(loader)) == epoch0  # same epoch, same order
    loader.set_epoch(1)
    epoch1 = keys_of(collect(loader))
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)


@pytest.mark.slow
@pytest.mark.dist
def test_resumed_loader_goes_on_to_the_next_epoch(cc12m_dir):
    source = SourceSpec("cc12m", os.path.join(cc12m_dir, CC12M_URLS))

    def make_loader(epoch: int):
        return build_loader(source, batch_size=3, num_workers=2, transform=tiny_tensor, epoch=epoch, seed=9)

    epoch0, epoch1 = keys_of(collect(make_loader(0))), keys_of(collect(make_loader(1)))
    first = make_loader(0)
    head = keys_of(collect(first, 4))
    resumed = make_loader(0)
    resumed.load_state_dict(first.state_dict())
    assert head + keys_of(collect(resumed)) == epoch0
    resumed.set_epoch(1)
    assert keys_of(collect(resumed)) == epoch1


def test_resampled_epoch_continues_after_samples_another_world_size_consumed(mnist_dir):
    """``set_epoch(e, consumed=c)``, the resume of a resampled run at another world size: the pass is the rest of the
    epoch (samples_per_epoch - c over all ranks), drawn afresh rather than replaying the epoch's first draws, and it
    resumes exactly mid-pass like any other."""
    source = SourceSpec("mnist", os.path.join(mnist_dir, "mnist-{000000..000002}.tar"))

    def make_loader(consumed: int = 0, world_size: int = 1):
        loader = build_loader(source, batch_size=4, num_workers=0, mode="resampled", seed=5, samples_per_epoch=48,
                              world_size=world_size, transform=SMALL)
        loader.set_epoch(0, consumed)
        return loader

    whole = keys_of(collect(make_loader()))
    assert len(whole) == 48
    rest = keys_of(collect(make_loader(consumed=32)))
    assert len(rest) == 16 and rest != whole[:16]  # the rest of the epoch, not its beginning again
    assert len(keys_of(collect(make_loader(32, 2)))) == 8  # rank 0's share at 2 ranks
    assert collect(make_loader(consumed=48)) == []  # nothing left: the trainer rolls over to the next epoch
    _resume_matches(lambda: make_loader(consumed=20), 2, None)  # 28 left: 7 batches, stop after 2
    later = make_loader(consumed=20)
    later.set_epoch(1)  # the next epoch is whole again
    assert len(keys_of(collect(later))) == 48
    with pytest.raises(ValueError, match="needs resampled mode with samples_per_epoch"):
        build_loader(source, batch_size=4, num_workers=0, mode="epoch", transform=SMALL).set_epoch(0, 8)


@pytest.mark.slow
@pytest.mark.dist
def test_resume_seeks_to_the_saved_byte_offset(cc12m_dir, tmp_path):
    """Resuming must not re-read what was consumed: zero the consumed part of the open shards after saving."""
    from data_pipelines.loader import _iterator_states

    copy = tmp_path / "cc12m"
    shutil.copytree(cc12m_dir, copy)
    source = SourceSpec("cc12m", str(copy / CC12M_URLS))

    def make_loader():  # batch 4: each worker's range is whole shards, so no other worker reads the erased bytes
        return build_loader(source, batch_size=4, num_workers=2, transform=tiny_tensor, seed=5)

    reference = keys_of(collect(make_loader()))
    first = make_loader()
    head = keys_of(collect(first, 3))
    state = first.state_dict()
    erased = 0
    for worker_state in _iterator_states(state):
        for url, _source, _start, _stop, consumed, _to_end, offset_bytes in worker_state["slots"]:
            if consumed and offset_bytes:
                with open(url, "r+b") as f:
                    f.write(b"\0" * offset_bytes)
                erased += 1
    assert erased >= 1
    resumed = make_loader()
    resumed.load_state_dict(state)
    assert head + keys_of(collect(resumed)) == reference
    assert resumed.skip_counts() == {}


@pytest.mark.slow
def test_resume_in_the_main_process_is_exact(cc12m_dir, bad_shards):
    """num_workers=0 (state held by the iterator in this process), on shards with bad samples and a truncation."""
    urls = [os.path.join(cc12m_dir, "cc12m-000000.tar")] + bad_shards[0]

    def make_loader():
        return build_loader(SourceSpec("mixed", urls), batch_size=3, num_workers=0, seed=8, transform=SMALL,
                            tokenizer="ViT-B-32", max_image_pixels=MAX_PIXELS)

    _resume_matches(make_loader, 2, None)
    full = make_loader()
    collect(full)
    first = make_loader()
    collect(first, 2)
    resumed = make_loader()
    resumed.load_state_dict(first.state_dict())
    collect(resumed)
    assert resumed.skip_counts() == full.skip_counts() == dict(sorted(bad_shards[2].items()))


# ------------------------------------------------------------------------------------------------------------------
# epoch mode at another world size


def _saved(loader) -> dict:
    """``loader.state_dict()`` through a checkpoint file's round trip."""
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _run_ranks(make_loader, world_size: int, batches: int | None, states: list[dict] | None = None):
    """Every rank of a run of ``world_size`` (simulated one after the other: ranks share nothing but the saved
    states); each continues the epoch of ``states`` when given, reads ``batches`` batches (None: to the end of
    its pass) and saves. Returns (keys read over all ranks, the saved states in rank order, the last message)."""
    keys, saved, message = [], [], None
    for rank in range(world_size):
        loader = make_loader(rank, world_size)
        if states is not None:
            message = loader.load_other_world_size(states)
        keys += keys_of(collect(loader, batches))
        saved.append(_saved(loader))
    return keys, saved, message


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("old_world, new_world, workers", [(2, 1, (2, 0)), (1, 2, (0, 2)), (2, 1, (0, 2))])
def test_epoch_continues_at_another_world_size_without_repeats_or_gaps(cc12m_dir, old_world, new_world, workers):
    """Epoch mode, 32 real samples in 8 shards, batches of 3 (segments start and stop mid-shard), 2 shards open per
    worker. ``old_world`` ranks read 2 batches each and save; ``new_world`` ranks continue the epoch from all the
    saved states. What was read before plus what is read after is the epoch's sample set, each key exactly once."""
    urls = os.path.join(cc12m_dir, CC12M_URLS)
    old_workers, new_workers = workers

    def make_loader(rank, world_size, num_workers=None):
        num_workers = (old_workers if world_size == old_world else new_workers) if num_workers is None else num_workers
        return build_loader(SourceSpec("cc12m", urls), batch_size=3, num_workers=num_workers, mode="epoch", seed=3,
                            rank=rank, world_size=world_size, transform=tiny_tensor, interleave_shards=2)

    epoch_keys, _, _ = _run_ranks(make_loader, old_world, None)
    assert sorted(epoch_keys) == sorted(read_tar(CC12M_TAR))  # the epoch: every sample once
    before, states, _ = _run_ranks(make_loader, old_world, 2)
    assert len(before) == old_world * 2 * 3
    after, after_states, message = _run_ranks(make_loader, new_world, None, states)
    assert f"the {32 - len(before)} samples that the {old_world} saved ranks had not read ({len(before)} read)" \
        in message
    assert Counter(before + after) == Counter(epoch_keys), (Counter(before + after) - Counter(epoch_keys),
                                                           Counter(epoch_keys) - Counter(before + after))
    # the rest pass resumes exactly at its own world size, and the next epoch is whole again
    for rank in range(new_world):
        _resume_matches(lambda rank=rank: _continued(make_loader(rank, new_world), states), 1, None)
    nxt = make_loader(0, new_world)
    nxt.load_other_world_size(states)
    collect(nxt)
    nxt.set_epoch(1)
    assert len(keys_of(collect(nxt))) == 32 // new_world


def _continued(loader, states):
    loader.load_other_world_size(states)
    return loader


@pytest.mark.slow
@pytest.mark.dist
def test_epoch_resized_twice_and_with_drop_last(cc12m_dir):
    """2 ranks -> 1 rank -> 2 ranks within one epoch: the second resize starts from the first one's rest. With
    ``drop_last`` (as the trainer reads) nothing is read twice, and what is left out is less than one batch per new
    rank of the rest."""
    urls = os.path.join(cc12m_dir, CC12M_URLS)

    def make_loader(rank, world_size, drop_last=False):
        return build_loader(SourceSpec("cc12m", urls), batch_size=3, num_workers=0, mode="epoch", seed=9, rank=rank,
                            world_size=world_size, transform=tiny_tensor, interleave_shards=3, drop_last=drop_last)

    first, states, _ = _run_ranks(make_loader, 2, 1)
    second, states, _ = _run_ranks(make_loader, 1, 3, states)
    third, _, message = _run_ranks(make_loader, 2, None, states)
    assert "the 17 samples that the 1 saved ranks had not read (15 read)" in message  # 2 x 3 + 3 x 3 read
    assert Counter(first + second + third) == Counter(read_tar(CC12M_TAR).keys())

    def make_dropping(rank, world_size):
        return make_loader(rank, world_size, drop_last=True)

    before, states, _ = _run_ranks(make_dropping, 2, 2)  # 12 of the 30 samples the epoch's cut keeps
    after, _, _ = _run_ranks(make_dropping, 1, None, states)
    seen = before + after
    assert len(seen) == len(set(seen)) and set(seen) <= set(read_tar(CC12M_TAR))
    assert 32 - len(seen) < 2 * 3 + 1 * 3  # the first cut's remainder (< a batch per rank) and the rest's (< 1)


def test_epoch_rest_refuses_states_it_cannot_map(cc12m_dir, mnist_dir):
    urls = os.path.join(cc12m_dir, CC12M_URLS)

    def make_loader(rank, world_size, seed=3, mode="epoch"):
        return build_loader(SourceSpec("cc12m", urls), batch_size=4, num_workers=0, mode=mode, seed=seed, rank=rank,
                            world_size=world_size, transform=tiny_tensor, samples_per_epoch=32)

    _, states, _ = _run_ranks(make_loader, 2, 1)
    with pytest.raises(ValueError, match="need the states of all 1 ranks"):
        make_loader(0, 1).load_other_world_size(states[1:])
    with pytest.raises(ValueError, match="another seed"):
        make_loader(0, 1, seed=4).load_other_world_size(states)
    with pytest.raises(ValueError, match="for epoch mode, not 'resampled'"):
        make_loader(0, 1, mode="resampled").load_other_world_size(states)
    other = build_loader(SourceSpec("mnist", os.path.join(mnist_dir, "mnist-{000000..000002}.tar")), batch_size=4,
                         num_workers=0, seed=3, transform=tiny_tensor)
    with pytest.raises(ValueError, match="other sources"):
        other.load_other_world_size(states[:1] + states[1:])
