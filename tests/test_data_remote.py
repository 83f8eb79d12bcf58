"""Shards over HTTP (a real ThreadingHTTPServer on loopback, tests/shard_server.py) and through ``pipe:curl``, with
faults: connections dropped mid-shard (resumed with Range, or re-read where the server ignores ranges), retries used
up, 404, a stalled server and a stalled command, exact resume mid-shard, and ``check`` on missing shards."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from data_pipelines import cli
from data_pipelines.loader import SourceSpec, _iterator_states, build_loader
from data_pipelines.tario import RemoteOptions, count_tar_samples, iter_tar_samples, scan_shard, split_key_ext
from data_pipelines.transforms import build_train_transform
from tests.data_helpers import REPO_ROOT, write_cc12m_shards
from tests.shard_server import ShardServer
from tests.test_data_loader import collect, keys_of

SMALL = build_train_transform(32)
FAST = RemoteOptions(timeout_s=1.0, retries=3, backoff_s=0.01)  # test-sized: every fault ends within seconds
NAMES = [f"cc12m-{i:06d}.tar" for i in range(4)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> str:
    """The 32 real CC12M samples in 4 shards of 8, written by our writer (with manifest.json)."""
    return write_cc12m_shards(str(tmp_path_factory.mktemp("remote") / "cc12m"), per_shard=8)


@pytest.fixture
def server(shard_dir):
    with ShardServer(shard_dir) as running:
        yield running


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return keys_of(a) == keys_of(b) and all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def make_loader(urls: list[str], shard_dir: str, *, remote: RemoteOptions = FAST, manifest: bool = True, **kwargs):
    source = SourceSpec("cc12m", urls, remote=remote,
                        manifest=os.path.join(shard_dir, "manifest.json") if manifest else None)
    options = {"batch_size": 4, "num_workers": 0, "seed": 3, "transform": SMALL, **kwargs}
    return build_loader(source, **options)


def local_reference(shard_dir: str, names=NAMES, **kwargs) -> list[dict]:
    return collect(make_loader([os.path.join(shard_dir, n) for n in names], shard_dir, **kwargs))


def sample_starts(path: str) -> tuple[list[str], list[int]]:
    """The keys of a plain tar in order and the byte offset of each sample's first member header."""
    keys, starts = [], []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key = split_key_ext(member.name)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
                starts.append(member.offset)
    return keys, starts


def test_http_and_pipe_curl_read_like_local_files(shard_dir, server):
    reference = local_reference(shard_dir)
    assert len(keys_of(reference)) == 32
    http = make_loader([server.url(n) for n in NAMES], shard_dir, manifest=False)  # counts read over HTTP
    assert [s.samples for s in http.dataset.shards] == [8] * 4
    assert same_batches(collect(http), reference) and http.skip_counts() == {}
    curl = make_loader([f"pipe:curl -s --fail {server.url(n)}" for n in NAMES], shard_dir)
    assert same_batches(collect(curl), reference) and curl.skip_counts() == {}


def test_dropped_connections_resume_at_the_byte_with_range(shard_dir, server):
    drop_bytes = 150_000
    server.drop(drop_bytes, times=3)
    loader = make_loader([server.url(n) for n in NAMES], shard_dir)
    assert same_batches(collect(loader), local_reference(shard_dir))
    assert loader.skip_counts() == {}
    resumed = [r for r in server.requests if r.range_start is not None]
    assert len(server.requests) == 4 + 3 and len(resumed) == 3
    for name in {r.path for r in resumed}:  # each retry asked for the byte where its connection broke
        starts = [r.range_start for r in resumed if r.path == name]
        assert starts == [drop_bytes * (i + 1) for i in range(len(starts))]
    assert {r.status for r in resumed} == {206}


def test_dropped_connections_without_range_support_reread_and_skip(shard_dir, server):
    server.ranges = False
    server.drop(150_000, times=3)
    loader = make_loader([server.url(n) for n in NAMES], shard_dir)
    assert same_batches(collect(loader), local_reference(shard_dir))
    assert loader.skip_counts() == {}
    assert [r.status for r in server.requests if r.range_start is not None] == [200, 200, 200]  # whole re-reads


def test_retries_used_up_deliver_every_sample_before_the_break_once(shard_dir, server, caplog):
    """A server without ranges that drops every connection at the same byte: no progress, so after ``retries`` the
    shard is given up; the samples wholly before the break arrive once, the rest is counted as one lost shard."""
    server.ranges = False
    drop_bytes = 400_000
    server.drop(drop_bytes, times=1000)
    keys, starts = sample_starts(os.path.join(shard_dir, NAMES[0]))
    # A sample is complete once the next sample's 512-byte header has been read.
    expected = [keys[i] for i in range(len(keys) - 1) if starts[i + 1] + 512 <= drop_bytes]
    assert 0 < len(expected) < len(keys)
    remote = RemoteOptions(timeout_s=1.0, retries=2, backoff_s=0.01)
    loader = make_loader([server.url(NAMES[0])], shard_dir, remote=remote, batch_size=1)
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        assert keys_of(collect(loader)) == expected
    assert loader.skip_counts() == {"shard_connection_lost": 1}
    assert len(server.requests) == 1 + remote.retries
    assert any(server.url(NAMES[0]) in r.getMessage() and "shard_connection_lost" in r.getMessage()
               for r in caplog.records)


def test_404_is_skipped_and_counted_with_the_url(shard_dir, server, caplog):
    server.missing.add(NAMES[1])
    loader = make_loader([server.url(n) for n in NAMES], shard_dir)
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        keys = keys_of(collect(loader))
    assert sorted(keys) == sorted(keys_of(local_reference(shard_dir, [NAMES[0], NAMES[2], NAMES[3]],
                                                          drop_last=False)))
    assert loader.skip_counts() == {"shard_not_found": 1}
    assert any("shard_not_found" in r.getMessage() and server.url(NAMES[1]) in r.getMessage() for r in caplog.records)
    assert [r.status for r in server.requests if r.path == NAMES[1]] == [404]  # a 404 is not retried
    # Without a manifest, epoch mode cannot plan around a shard of unknown size: a clear error naming it.
    with pytest.raises(ValueError, match=f"cannot count the samples of {server.url(NAMES[1])}.*shard_not_found"):
        make_loader([server.url(n) for n in NAMES], shard_dir, manifest=False)


def test_a_stalled_server_times_out_instead_of_hanging(shard_dir, server):
    """Every response stalls at the same byte (no ranges: a retry re-reads up to it and brings nothing new)."""
    server.ranges = False
    stall_bytes = 400_000
    server.stall(stall_bytes, seconds=60)
    keys, starts = sample_starts(os.path.join(shard_dir, NAMES[0]))
    expected = [keys[i] for i in range(len(keys) - 1) if starts[i + 1] + 512 <= stall_bytes]
    remote = RemoteOptions(timeout_s=0.3, retries=1, backoff_s=0.01)
    loader = make_loader([server.url(NAMES[0])], shard_dir, remote=remote, batch_size=1)
    began = time.monotonic()
    assert keys_of(collect(loader)) == expected
    elapsed_s = time.monotonic() - began
    assert loader.skip_counts() == {"shard_timeout": 1}
    assert elapsed_s < 10, f"{elapsed_s:.1f} s: (retries + 1) x timeout_s is 0.6 s, plus decoding"
    assert len(server.requests) == 1 + remote.retries


def test_a_server_that_is_down_is_retried_then_counted():
    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/{NAMES[0]}"
    n_samples, problem = scan_shard(url, RemoteOptions(timeout_s=1.0, retries=2, backoff_s=0.01))
    assert n_samples == 0 and problem.reason == "shard_connection_lost"
    assert url in problem.detail and "3 failures in a row" in problem.detail


def test_a_stalled_pipe_command_times_out(tmp_path):
    began = time.monotonic()
    with pytest.raises(Exception) as caught:
        list(iter_tar_samples("pipe:sleep 30", remote=RemoteOptions(timeout_s=0.3)))
    assert getattr(caught.value, "reason", None) == "shard_timeout" and "sleep 30" in str(caught.value)
    assert time.monotonic() - began < 10


def test_a_pipe_command_read_only_in_part_is_killed_not_waited_for(shard_dir):
    # The command writes the shard, then hangs as a stalled download would: it never sees the closed pipe.
    marker = f"pipe-left-{os.getpid()}"
    command = f"pipe:sh -c 'cat {shard_dir}/{NAMES[0]}; exec sleep 300 {marker}' || true"
    began = time.monotonic()
    got = list(iter_tar_samples(command.replace(" || true", ""), max_samples=2, remote=RemoteOptions(timeout_s=30)))
    assert len(got) == 2 and time.monotonic() - began < 10  # not the 30 s timeout, nor the 300 s sleep
    alive = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert alive == []


def test_max_samples_zero_yields_nothing(shard_dir):
    path = f"{shard_dir}/{NAMES[0]}"
    assert list(iter_tar_samples(path, skip_samples=3, max_samples=0)) == []
    assert [s["__key__"] for s in iter_tar_samples(path, skip_samples=3, max_samples=1)] == \
        [s["__key__"] for s in iter_tar_samples(path)][3:4]


def test_redirects_are_followed_to_http_only(shard_dir, server):
    server.redirects = {"moved.tar": server.url(NAMES[1]), "to-file.tar": f"file://{shard_dir}/{NAMES[1]}",
                        "ftp.tar": "ftp://127.0.0.1/x.tar"}
    try:
        assert scan_shard(server.url("moved.tar"), FAST) == scan_shard(server.url(NAMES[1]), FAST)
        for name in ("to-file.tar", "ftp.tar"):
            n_samples, problem = scan_shard(server.url(name), FAST)
            assert n_samples == 0 and problem.reason == "unreadable_shard", (name, problem)
            assert "refused to follow a redirect to" in problem.detail and server.url(name) in problem.detail
    finally:
        server.redirects = {}


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_exact_resume_mid_shard_on_http_shards(shard_dir, server, ranges):
    """A checkpoint taken mid-shard: the resumed run reopens each open shard at the saved byte (a Range request, or
    a re-read that skips to it) and yields the same keys and tensors as an uninterrupted run."""
    server.ranges = ranges
    urls = [server.url(n) for n in NAMES]
    whole = collect(make_loader(urls, shard_dir, batch_size=3))
    first = make_loader(urls, shard_dir, batch_size=3)
    head = collect(first, 3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # the state must survive a checkpoint file
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    open_offsets = {(url.rsplit("/", 1)[1], offset) for worker in _iterator_states(state)
                    for url, _, _, _, consumed, _, offset in worker["slots"] if consumed}
    assert open_offsets and all(offset for _, offset in open_offsets)  # mid-shard, at a known byte
    server.requests.clear()
    resumed = make_loader(urls, shard_dir, batch_size=3)
    resumed.load_state_dict(state)
    rest = collect(resumed)
    assert same_batches(head + rest, whole)
    assert resumed.skip_counts() == {}
    reopened = {(r.path, r.range_start) for r in server.requests if r.range_start is not None}
    assert reopened == open_offsets
    assert {r.status for r in server.requests if r.range_start is not None} == {206 if ranges else 200}


@pytest.mark.slow
@pytest.mark.dist
def test_worker_processes_read_http_with_faults_and_resume_exactly(shard_dir, server):
    """2 forkserver workers: the remote options travel with the dataset, drops are retried inside the workers, and
    the per-worker states resume mid-shard with Range requests to the same samples."""
    server.drop(150_000, times=2)
    urls = [server.url(n) for n in NAMES]
    whole = collect(make_loader(urls, shard_dir, batch_size=2, num_workers=2))
    assert same_batches(whole, local_reference(shard_dir, batch_size=2, num_workers=2))
    assert sum(r.range_start is not None for r in server.requests) == 2
    first = make_loader(urls, shard_dir, batch_size=2, num_workers=2)
    head = collect(first, 5)
    state = first.state_dict()
    server.requests.clear()
    resumed = make_loader(urls, shard_dir, batch_size=2, num_workers=2)
    resumed.load_state_dict(state)
    assert same_batches(head + collect(resumed), whole) and resumed.skip_counts() == {}
    assert any(r.status == 206 for r in server.requests)


def test_exact_resume_mid_shard_through_pipe_curl(shard_dir, server):
    """pipe: cannot seek: the resumed run re-reads each open shard and skips the consumed samples."""
    urls = [f"pipe:curl -s --fail {server.url(n)}" for n in NAMES]
    whole = collect(make_loader(urls, shard_dir, batch_size=3))
    first = make_loader(urls, shard_dir, batch_size=3)
    head = collect(first, 3)
    state = first.state_dict()
    assert all(offset is None for worker in _iterator_states(state) for *_, offset in worker["slots"])
    resumed = make_loader(urls, shard_dir, batch_size=3)
    resumed.load_state_dict(state)
    assert same_batches(head + collect(resumed), whole)


def test_count_over_http_matches_the_manifest(shard_dir, server):
    server.drop(100_000, times=2)
    assert [count_tar_samples(server.url(n), FAST) for n in NAMES] == [8] * 4


@pytest.mark.slow  # a fresh interpreter imports torch: ~25 s on the loaded 2-core machine
def test_check_cli_on_a_missing_local_shard_reports_instead_of_a_traceback(tmp_path):
    missing = str(tmp_path / "nonexistent-000000.tar")
    result = subprocess.run([sys.executable, "-m", "data_pipelines", "check", missing, "--json"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["good"] == 0 and report["skipped"] == {"unreadable_shard": 1}
    assert [(s["url"], s["reason"]) for s in report["skipped_shards"]] == [(missing, "unreadable_shard")]


def test_check_cli_names_missing_local_and_remote_shards(shard_dir, server, tmp_path, capsys):
    server.missing.add(NAMES[1])
    missing_local = str(tmp_path / "gone-000000.tar")
    urls = [server.url(NAMES[0]), server.url(NAMES[1]), missing_local, os.path.join(shard_dir, NAMES[2])]
    status = cli.main(["check", "::".join(urls), "--json", "--timeout-s", "1", "--retries", "1", "--backoff-s", "0"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 1
    assert report["good"] == 16
    assert report["skipped"] == {"shard_not_found": 1, "unreadable_shard": 1}
    assert {(s["url"], s["reason"]) for s in report["skipped_shards"]} == {(server.url(NAMES[1]), "shard_not_found"),
                                                                           (missing_local, "unreadable_shard")}
    status = cli.main(["check", "::".join([server.url(NAMES[0]), server.url(NAMES[2])]), "--json"])
    assert status == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"good": 16, "skipped": {},
                                                                           "skipped_shards": []}


def test_data_remote_config_reaches_every_source():
    from pretrain.config import RemoteConfig, SourceConfig
    from pretrain.engine.data import _specs

    specs = _specs([SourceConfig(urls="http://h/a.tar"), SourceConfig(urls="pipe:cat b.tar")],
                   RemoteConfig(timeout_s=7.0, retries=2, backoff_s=0.5))
    assert [s.remote for s in specs] == [RemoteOptions(timeout_s=7.0, retries=2, backoff_s=0.5)] * 2
