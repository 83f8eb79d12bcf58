"""Reading WebDataset tar shards: open a URL (local path, ``file:`` or ``pipe:`` command) and group members into
samples by key.

A sample is a dict ``{"__key__": str, "__url__": str, <ext>: bytes, ...}``, where the key is the member path up to the
first dot of its base name and the extension is the rest, lower-cased (the webdataset convention). A truncated or
corrupt tar ends the shard with ``SkipSample("truncated_tar")`` *after* every complete sample before the break
has been yielded; the sample that was cut is not yielded.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO

import braceexpand

from data_pipelines.errors import TRUNCATED_TAR, UNREADABLE_SHARD, SkipSample

log = logging.getLogger("data_pipelines")

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def expand_urls(pattern: str | list[str]) -> list[str]:
    """Expand ``{000..123}`` braces and ``::``-separated lists into a flat list of shard URLs (order kept)."""
    patterns = pattern if isinstance(pattern, list) else pattern.split("::")
    urls: list[str] = []
    for p in patterns:
        urls.extend(braceexpand.braceexpand(p))
    return urls


def split_key_ext(name: str) -> tuple[str, str] | None:
    """Split a member name into (key, extension); None for names without an extension."""
    match = _KEY_EXT.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


class _PipeStream:
    """File-like reader over a shell command's stdout; closing it reaps the process."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)

    def read(self, size: int = -1) -> bytes:
        return self.proc.stdout.read(size)

    def close(self) -> int:
        """Close the pipe and return the command's exit status."""
        self.proc.stdout.close()
        return self.proc.wait()


def open_url(url: str) -> IO[bytes]:
    """Open a shard for reading: a local path, ``file:PATH`` or ``pipe:COMMAND`` (e.g. ``pipe:aws s3 cp URL -``)."""
    if url.startswith("pipe:"):
        return _PipeStream(url[len("pipe:"):])  # type: ignore[return-value]
    path = url[len("file:"):] if url.startswith("file:") else url
    try:
        return open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise SkipSample(UNREADABLE_SHARD, f"{url}: {e}") from e


def iter_tar_samples(url: str, *, skip_samples: int = 0, max_samples: int | None = None,
                     check_end: bool = False, start_offset_bytes: int = 0) -> Iterator[dict]:
    """Yield the samples of the tar shard at ``url`` (plain or gzip-compressed), in tar order.

    ``skip_samples`` samples are read past without being yielded (used to resume); at most ``max_samples`` are
    yielded after them. With ``check_end`` the rest of the tar is still read after the last yielded sample, so a
    truncation there is reported. ``start_offset_bytes`` starts reading a local uncompressed tar at that byte
    (a sample boundary that an earlier read reported). Each sample carries ``__next_offset__``: the byte offset of
    the next sample in a local uncompressed tar, else None. Raises SkipSample(``unreadable_shard`` |
    ``truncated_tar``) after the last good sample.
    """
    stream = open_url(url)
    if start_offset_bytes:
        stream.seek(start_offset_bytes)
    seekable = not isinstance(stream, _PipeStream)
    n_seen = 0  # samples completed, including skipped ones
    limit = None if max_samples is None else skip_samples + max_samples
    current: dict | None = None
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise SkipSample(UNREADABLE_SHARD, f"{url}: cannot read a tar header: {e}") from e
        try:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_key_ext(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if current is not None and current["__key__"] != key:
                    if n_seen >= skip_samples:
                        plain = seekable and getattr(tar.fileobj, "comptype", None) == "tar"
                        current["__next_offset__"] = start_offset_bytes + member.offset if plain else None
                        yield current
                    n_seen += 1
                    current = None
                    if limit is not None and n_seen >= limit:
                        if not check_end:
                            return
                        _drain(tar, url)
                        return
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if n_seen >= skip_samples:
                    current[ext] = tar.extractfile(member).read()
                    if len(current[ext]) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
            if current is not None and (limit is None or n_seen < limit):
                if n_seen >= skip_samples:
                    current["__next_offset__"] = None
                    yield current
            if isinstance(stream, _PipeStream):
                status = stream.close()
                if status != 0:
                    raise SkipSample(UNREADABLE_SHARD, f"{url}: command exited with status {status}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            cut = current["__key__"] if current is not None else None
            raise SkipSample(TRUNCATED_TAR, f"{url}: {type(e).__name__}: {e} (sample cut: {cut})") from e
    finally:
        stream.close()


def _drain(tar: tarfile.TarFile, url: str) -> None:
    """Read the remaining members (raising on a truncated tar); more samples than expected are only logged."""
    extra = sum(1 for m in tar if m.isfile())
    if extra:
        log.warning("%s: %d members after the expected number of samples (stale manifest?); not read", url, extra)


def count_tar_samples(url: str) -> int:
    """Count the complete samples in a shard by reading its tar headers only (nothing is decoded)."""
    n = 0
    last_key = None
    stream = open_url(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                parts = split_key_ext(member.name) if member.isfile() else None
                if parts is not None and parts[0] != last_key:
                    n += 1
                    last_key = parts[0]
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        n = max(n - 1, 0)  # the sample in progress at the break is not complete
    finally:
        stream.close()
    return n
