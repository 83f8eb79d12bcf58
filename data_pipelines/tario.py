"""Reading WebDataset tar shards: open a URL (local path, ``file:``, ``http(s)://`` or ``pipe:`` command) and group
members into samples by key.

A sample is a dict ``{"__key__": str, "__url__": str, <ext>: bytes, ...}``, where the key is the member path up to the
first dot of its base name and the extension is the rest, lower-cased (the webdataset convention). A truncated or
corrupt tar ends the shard with ``SkipSample("truncated_tar")`` *after* every complete sample before the break
has been yielded; the sample that was cut is not yielded.

http(s) shards are read with the standard library's ``http.client`` rather than webdataset's ``gopen`` (a
``curl --retry`` pipe): a dropped connection is resumed here at the byte where it broke (a ``Range`` request, or a
re-read that skips to it when the server ignores ranges), so the tar reader never sees the fault, and an exact resume
can start at a saved byte offset; curl's retries restart the whole body into the same pipe.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import http.client
import logging
import lzma
import os
import re
import select
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO
from urllib.parse import urljoin, urlsplit

import braceexpand

from data_pipelines.errors import (
    SHARD_CONNECTION_LOST,
    SHARD_NOT_FOUND,
    SHARD_TIMEOUT,
    TRUNCATED_TAR,
    UNREADABLE_SHARD,
    SkipSample,
)

log = logging.getLogger("data_pipelines")

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_REMOTE_SCHEMES = ("http://", "https://")
_MAX_BACKOFF_S = 60.0
_MAX_REDIRECTS = 5
_READ_BUFFER_BYTES = 1 << 20


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are read (``data.remote`` in the training config).

    ``timeout_s``: the longest wait for a connection or for the next bytes of an http(s) shard or a ``pipe:``
    command's output; ``retries``: reconnections in a row that bring no new byte before an http(s) shard is given up
    (a connection that delivered data resets the count); ``backoff_s``: the wait before the first retry, doubled at
    each further one (at most 60 s). ``pipe:`` commands are not retried here (use the tool's own retries)."""

    timeout_s: float = 60.0
    retries: int = 5
    backoff_s: float = 1.0


DEFAULT_REMOTE = RemoteOptions()


def is_remote(url: str) -> bool:
    """Whether ``url`` is read over the network or through a command (http(s):// or pipe:), not from a local path."""
    return url.startswith(_REMOTE_SCHEMES) or url.startswith("pipe:")


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
    """File-like reader over a shell command's stdout that waits at most ``timeout_s`` for each next output;
    closing it reaps the process."""

    def __init__(self, command: str, timeout_s: float):
        self.command = command
        self.timeout_s = timeout_s
        # Its own process group, so that a timeout kills the whole command (``sh -c 'a | b'``), not just the shell.
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.at_end = False  # its whole output was read

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(_READ_BUFFER_BYTES), b""))
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:  # a stalled command (a hung download) must not hang the loader
            self._kill()
            raise SkipSample(SHARD_TIMEOUT, f"pipe:{self.command}: no output for {self.timeout_s} s (timeout_s)")
        data = os.read(self.fd, size)
        self.at_end = self.at_end or (size > 0 and not data)
        return data

    def close(self) -> int:
        """Close the pipe and return the command's exit status (idempotent). A command whose output was not read to
        its end (the reader stopped early) is killed, not waited for: a stalled download may never write again, so it
        would never see the closed pipe. One that does not exit within ``timeout_s`` after its end is killed too."""
        self.proc.stdout.close()
        if not self.at_end:
            self._kill()
        try:
            return self.proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()
            return self.proc.wait()

    def _kill(self) -> None:
        """SIGKILL the command's whole process group (``sh -c 'a | b'``), if it is still there."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class _RetryableStatus(Exception):
    """An HTTP status worth retrying (408, 429, 5xx)."""


class _HttpStream:
    """A read-only stream over an http(s) URL from byte ``offset_bytes`` on, that survives dropped connections.

    A failed connect, a timeout, a connection closed before the announced length or a retryable status reconnects
    after an exponential backoff and goes on at the byte reached: with ``Range: bytes=N-`` where the server answers
    206, else by re-reading the body and discarding its first N bytes. ``retries`` failures in a row without a new
    byte end the shard with SkipSample (``shard_timeout`` or ``shard_connection_lost``); 404/410 give
    ``shard_not_found`` and other 4xx ``unreadable_shard`` at once."""

    def __init__(self, url: str, offset_bytes: int, options: RemoteOptions):
        self.url = url
        self.options = options
        self.position = offset_bytes  # bytes of the shard received (or seeked past): where a reconnection resumes
        self._chunk = memoryview(b"")  # received, not yet handed to the reader
        self.failures_in_a_row = 0
        self.requests = 0
        self.ranged_requests = 0  # requests answered with 206 (the server supports ranges)
        self._conn: http.client.HTTPConnection | None = None
        self._response: http.client.HTTPResponse | None = None
        self._retrying(lambda: None)  # connect now: a 404 or a dead server shows at open, as a missing file does

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (fewer near a network chunk's end; b"" at the end of the shard)."""
        if size < 0:
            return b"".join(iter(lambda: self.read(_READ_BUFFER_BYTES), b""))
        if not self._chunk:
            # Bytes are handed on only after they arrived, so a failure loses nothing already received.
            self._chunk = memoryview(self._retrying(lambda: self._response.read1(_READ_BUFFER_BYTES)))
            self.position += len(self._chunk)
        data = bytes(self._chunk[:size])
        self._chunk = self._chunk[size:]
        return data

    def _retrying(self, read):
        """Run ``read`` on an open response, reconnecting and retrying as the class says; returns its result."""
        while True:
            try:
                if self._response is None:
                    self._request()
                result = read()
                if result == b"" and self._response.length:  # http.client returns b"" when the peer closes early
                    raise ConnectionError(f"connection closed {self._response.length} bytes before the end")
                if result:
                    self.failures_in_a_row = 0
                return result
            except SkipSample:  # a 404, a refused redirect ...: no socket is left open behind it
                self._drop_connection()
                raise
            except (OSError, http.client.HTTPException, _RetryableStatus) as e:  # socket timeouts are OSErrors
                self._drop_connection()
                self.failures_in_a_row += 1
                if self.failures_in_a_row > self.options.retries:
                    reason = SHARD_TIMEOUT if isinstance(e, TimeoutError) else SHARD_CONNECTION_LOST
                    raise SkipSample(reason, f"{self.url}: {type(e).__name__}: {e} at byte {self.position}, "
                                             f"{self.failures_in_a_row} failures in a row (timeout_s="
                                             f"{self.options.timeout_s}, retries={self.options.retries})") from e
                wait_s = min(self.options.backoff_s * 2 ** (self.failures_in_a_row - 1), _MAX_BACKOFF_S)
                log.warning("%s: %s: %s at byte %d; retry %d/%d in %.2f s", self.url, type(e).__name__, e,
                            self.position, self.failures_in_a_row, self.options.retries, wait_s)
                time.sleep(wait_s)

    def _request(self) -> None:
        """One GET from ``self.position`` (following redirects); leaves ``self._response`` at that byte."""
        target = self.url
        for _ in range(_MAX_REDIRECTS + 1):
            parts = urlsplit(target)
            try:
                port = parts.port
            except ValueError:
                port = -1
            if (parts.scheme not in ("http", "https") or not parts.hostname or port == -1
                    or (self.url.startswith("https:") and parts.scheme == "http")):
                raise SkipSample(UNREADABLE_SHARD, f"{self.url}: refused to follow a redirect to {target!r} "
                                                   "(http(s) with a host only, never from https to http)")
            connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            self._conn = connection_class(parts.hostname, port, timeout=self.options.timeout_s)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            self._conn.request("GET", path, headers={"Range": f"bytes={self.position}-"} if self.position else {})
            self.requests += 1
            response = self._conn.getresponse()
            location = response.getheader("Location")
            if response.status in (301, 302, 303, 307, 308) and location:
                self._drop_connection()
                target = urljoin(target, location)
                continue
            break
        self._response = response
        status = response.status
        if status == 206:
            content_range = response.getheader("Content-Range", "")
            match = re.match(r"bytes (\d+)-", content_range)
            if match is None or int(match.group(1)) != self.position:
                raise SkipSample(UNREADABLE_SHARD, f"{self.url}: asked for bytes {self.position}- and got "
                                                   f"Content-Range {content_range!r}")
            self.ranged_requests += 1
        elif status == 416 and self.position:  # the range starts at the end: nothing is left to read
            response.read()
            response.length = 0
        elif status == 200:
            self._discard(self.position)  # the server ignores ranges: read past what was already handed on
        elif status in (404, 410):
            raise SkipSample(SHARD_NOT_FOUND, f"{self.url}: HTTP {status} {response.reason}")
        elif status in (408, 429) or status >= 500:
            raise _RetryableStatus(f"HTTP {status} {response.reason}")
        else:
            raise SkipSample(UNREADABLE_SHARD, f"{self.url}: HTTP {status} {response.reason}")

    def _discard(self, n_bytes: int) -> None:
        left = n_bytes
        while left:
            chunk = self._response.read(min(left, _READ_BUFFER_BYTES))
            if not chunk:
                raise ConnectionError(f"body ended {left} bytes before byte {n_bytes} while skipping to it")
            left -= len(chunk)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._response = None

    def close(self) -> None:
        self._drop_connection()


# ---- the tar format -------------------------------------------------------------------------------------------------
# Python's tarfile in stream mode spends about 43 us of Python per member (TarInfo.frombuf and its file object), this
# reader about 10 us: with four members per 28 x 28 Fashion-MNIST sample that is a sixth of a loader worker's time
# per sample (docs/PERFORMANCE.md, "Reading tar shards"). It parses what a WebDataset shard needs (name, size, type)
# from ustar, GNU (long names, base-256 sizes) and pax (path, size) headers, checks every header's checksum, and
# reads gzip, bzip2 and xz compressed tars through the standard library's decompressors. Sparse members (GNU's old
# type S and pax GNU.sparse records) are refused: a shard writer has no reason to write them.

_BLOCK = 512
_END_BLOCK = bytes(_BLOCK)
_REGULAR_TYPES = (b"0", b"\0", b"7")
_DATALESS_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs: no data blocks
_GNU_MAGIC = b"ustar  \x00"
_SKIP_CHUNK_BYTES = 1 << 20
# What reading a damaged tar can raise: the format's errors and the decompressors'.
TAR_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


def _compression(head: bytes):
    """The decompressor class for a stream starting with ``head`` (gzip, bzip2, xz, by their magic bytes), else None."""
    if head[:3] == b"\x1f\x8b\x08":
        return lambda f: gzip.GzipFile(fileobj=f, mode="rb")
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and head[4:10] == b"1AY&SY":
        return bz2.BZ2File
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile
    return None


class TarReadError(OSError):
    """The stream is not a tar, or breaks off or turns to garbage at a byte the message names."""


@dataclass(frozen=True)
class TarMember:
    """One member: ``offset`` is the byte of its first header block (pax and GNU long-name headers included) in the
    uncompressed tar, so a reader started there reads it again."""

    name: str
    size: int
    offset: int
    is_file: bool


class _Prepended:
    """``head`` and then the rest of ``stream``, for a decompressor given bytes already read to detect it."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self.head = head
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        if self.head:
            data = self.head if size < 0 or size >= len(self.head) else self.head[:size]
            self.head = self.head[len(data):]
            return data
        return self.stream.read(size)


class TarReader:
    """The members of a tar stream, in order: ``for member in reader`` and, for the current member,
    ``reader.read()`` (its data, once; data not read is skipped at the next member). ``compressed`` tells a gzip,
    bzip2 or xz tar (detected from its first bytes) from a plain one. The first header is read at construction, so a
    stream that is empty or not a tar raises TarReadError there. A tar may end at a block boundary without its
    end-of-archive blocks (as tarfile accepts); a stream that ends inside a header or a member's data, or a header
    whose checksum is wrong, raises TarReadError naming the byte. At the end-of-archive block the rest of the stream
    (the record padding) is read, so a ``pipe:`` command runs to its end."""

    def __init__(self, stream: IO[bytes]):
        self._raw = self._stream = stream
        self.compressed = False
        self.position = 0  # bytes of the (uncompressed) tar read so far
        self._left = 0  # data and padding bytes of the current member not read yet
        self._size = -1  # the current member's size, -1 once its data was read
        head = self._read_exact(_BLOCK)
        opener = None if _is_header(head) else _compression(head)  # a tar header first: a name may start "BZh"
        if opener is not None:
            self._stream = opener(_Prepended(head, stream))
            self.compressed = True
            self.position = 0
            head = self._read_exact(_BLOCK)
        if not head:
            raise TarReadError("empty file")
        self._first = self._check_header(head, 0)

    def _read_header(self) -> bytes | None:
        at = self.position
        return self._check_header(self._read_exact(_BLOCK), at)

    def __iter__(self) -> Iterator[TarMember]:
        global_pax: dict[str, str] = {}
        header, self._first = self._first, None
        while True:
            if header is None:
                self._skip(self._left)
                header = self._read_header()
            if header is None or header == _END_BLOCK:
                self._read_rest()
                return
            start = self.position - _BLOCK
            pax: dict[str, str] = dict(global_pax)
            long_name = None
            while header[156:157] in (b"x", b"X", b"L", b"K"):  # extended headers of the member that follows
                kind, data = header[156:157], self._read_data(header, start)
                if kind in (b"x", b"X"):  # pax (X: Solaris's older spelling)
                    pax.update(_parse_pax(data, self.position))
                elif kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                header = self._read_header()
                if header is None or header == _END_BLOCK:
                    raise TarReadError(f"the tar ends after an extended header at byte {start}")
            kind = header[156:157]
            if kind == b"g":  # pax global header: defaults for every later member
                global_pax.update(_parse_pax(self._read_data(header, start), self.position))
                header = None
                continue
            if kind == b"S" or any(key.startswith("GNU.sparse.") for key in pax):
                raise TarReadError(f"GNU sparse member at byte {start}: not supported")
            size = _pax_size(pax["size"], start) if "size" in pax else _number(header[124:136], start)
            if size < 0:
                raise TarReadError(f"negative member size {size} in the header at byte {start}")
            name = pax.get("path") or long_name or _ustar_name(header)
            if name.endswith("/") and kind in (b"\0", b"5"):  # a directory (old tars: a regular type and a '/')
                kind, name = b"5", name.rstrip("/")
            self._size = size
            self._left = 0 if kind in _DATALESS_TYPES else -(-size // _BLOCK) * _BLOCK
            if kind in _DATALESS_TYPES:
                self._size = 0
            header = None
            yield TarMember(name, size, start, kind in _REGULAR_TYPES)

    def read(self) -> bytes:
        """The current member's data (only once per member)."""
        if self._size < 0:
            raise RuntimeError("TarReader.read: the current member's data was already read")
        size, self._size = self._size, -1
        data = self._read_exact(size)
        if len(data) < size:
            raise TarReadError(f"unexpected end of data at byte {self.position} ({size - len(data)} bytes missing)")
        self._left -= size
        return data

    def _read_data(self, header: bytes, start: int) -> bytes:
        size = _number(header[124:136], start)
        padded = -(-size // _BLOCK) * _BLOCK
        data = self._read_exact(padded)
        if len(data) < padded:
            raise TarReadError(f"unexpected end of data at byte {self.position} (an extended header at byte {start})")
        return data[:size]

    def _read_exact(self, n: int) -> bytes:
        """``n`` bytes, fewer only at the end of the stream (pipes and http return short reads)."""
        data = self._stream.read(n)
        if len(data) < n and data:
            parts = [data]
            got = len(data)
            while got < n:
                chunk = self._stream.read(n - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            data = b"".join(parts)
        self.position += len(data)
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            chunk = self._read_exact(min(n, _SKIP_CHUNK_BYTES))
            if not chunk:
                raise TarReadError(f"unexpected end of data at byte {self.position} ({n} bytes missing)")
            n -= len(chunk)
        self._left = 0
        self._size = -1

    def _read_rest(self) -> None:
        """The raw stream to its end (not the decompressor's: gzip refuses trailing bytes that tarfile never reads)."""
        while self._raw.read(_SKIP_CHUNK_BYTES):
            pass

    @staticmethod
    def _check_header(block: bytes, at: int) -> bytes | None:
        """The header block read at byte ``at``; None at the end of the stream (a block boundary)."""
        if not block:
            return None
        if len(block) < _BLOCK:
            if at and not any(block):  # cut inside the end-of-archive blocks: every member is whole
                return _END_BLOCK
            raise TarReadError(f"the tar ends inside a header at byte {at} ({len(block)} of {_BLOCK} bytes)")
        if block != _END_BLOCK and not _is_header(block):
            raise TarReadError(f"bad header checksum at byte {at} (not a tar, or damaged there)")
        return block


def _is_header(block: bytes) -> bool:
    """Whether ``block`` is a whole tar header block whose checksum (unsigned or signed bytes, as tarfile accepts)
    is right."""
    if len(block) < _BLOCK:
        return False
    try:
        stored = _number(block[148:156], 0)
    except TarReadError:
        return False
    return stored in (256 + sum(block) - sum(block[148:156]), 256 + sum(struct.unpack_from("148b8x356b", block)))


def _pax_size(value: str, at: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise TarReadError(f"bad pax size {value!r} for the member at byte {at}") from None


def _number(field: bytes, at: int) -> int:
    """A header's numeric field: octal text, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field[0] in (0x80, 0xFF):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0xFF else n
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarReadError(f"bad number {field!r} in the header at byte {at} (not a tar, or damaged there)") from None


def _ustar_name(header: bytes) -> str:
    """The name, with the ustar prefix field (bytes 345-500) before it, except in GNU headers (which keep access and
    change times there)."""
    name = header[:100].split(b"\0", 1)[0]
    if header[257:265] != _GNU_MAGIC:
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes, at: int) -> dict[str, str]:
    """pax records ``"<length> <key>=<value>\\n"``."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
            key, value = data[space + 1:pos + length - 1].split(b"=", 1)
        except ValueError:
            raise TarReadError(f"bad pax header record before byte {at}") from None
        if length <= 0:
            raise TarReadError(f"bad pax header record before byte {at}")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def open_url(url: str, *, offset_bytes: int = 0, remote: RemoteOptions = DEFAULT_REMOTE) -> IO[bytes]:
    """Open a shard for reading from byte ``offset_bytes``: a local path, ``file:PATH``, ``http(s)://...`` or
    ``pipe:COMMAND`` (e.g. ``pipe:aws s3 cp s3://b/x.tar -``; it cannot start at an offset). ``remote``: timeouts and
    retries of http(s) and pipe: reads. Raises SkipSample (``unreadable_shard``, ``shard_not_found``, ...)."""
    if url.startswith("pipe:"):
        if offset_bytes:
            raise ValueError(f"{url}: a pipe: command cannot start at byte {offset_bytes}")
        return _PipeStream(url[len("pipe:"):], remote.timeout_s)  # type: ignore[return-value]
    if url.startswith(_REMOTE_SCHEMES):
        return _HttpStream(url, offset_bytes, remote)  # type: ignore[return-value]
    path = url[len("file:"):] if url.startswith("file:") else url
    try:
        stream = open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise SkipSample(UNREADABLE_SHARD, f"{url}: {e}") from e
    if offset_bytes:
        stream.seek(offset_bytes)
    return stream


def iter_tar_samples(url: str, *, skip_samples: int = 0, max_samples: int | None = None,
                     check_end: bool = False, start_offset_bytes: int = 0,
                     remote: RemoteOptions = DEFAULT_REMOTE) -> Iterator[dict]:
    """Yield the samples of the tar shard at ``url`` (plain, or gzip, bzip2 or xz compressed), in tar order.

    ``skip_samples`` samples are read past without being yielded (used to resume); at most ``max_samples`` are
    yielded after them. With ``check_end`` the rest of the tar is still read after the last yielded sample, so a
    truncation there is reported. ``start_offset_bytes`` starts reading an uncompressed local or http(s) tar at
    that byte (a sample boundary that an earlier read reported). Each sample carries ``__next_offset__``: the byte
    offset of the next sample in an uncompressed local or http(s) tar, else None (gzip, ``pipe:``). ``remote``:
    timeouts and retries of http(s) and pipe: reads. Raises SkipSample (``unreadable_shard``, ``truncated_tar``,
    ``shard_not_found``, ``shard_timeout``, ``shard_connection_lost``) after the last good sample.
    """
    stream = open_url(url, offset_bytes=start_offset_bytes, remote=remote)
    seekable = not isinstance(stream, _PipeStream)
    n_seen = 0  # samples completed, including skipped ones
    limit = None if max_samples is None else skip_samples + max_samples
    current: dict | None = None
    try:
        try:
            tar = TarReader(stream)
        except TAR_READ_ERRORS as e:
            raise SkipSample(UNREADABLE_SHARD, f"{url}: cannot read a tar header: {e}{_exit_status(stream)}") from e
        try:
            for member in tar:
                if not member.is_file:
                    continue
                parts = split_key_ext(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if current is not None and current["__key__"] != key:
                    if n_seen >= skip_samples and (limit is None or n_seen < limit):  # max_samples=0: none
                        plain = seekable and not tar.compressed
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
                    current[ext] = tar.read()
            if current is not None and (limit is None or n_seen < limit):
                if n_seen >= skip_samples:
                    current["__next_offset__"] = None
                    yield current
            if isinstance(stream, _PipeStream):
                status = stream.close()
                if status != 0:
                    raise SkipSample(UNREADABLE_SHARD, f"{url}: command exited with status {status}")
        except TAR_READ_ERRORS as e:
            cut = current["__key__"] if current is not None else None
            raise SkipSample(TRUNCATED_TAR, f"{url}: {type(e).__name__}: {e} (sample cut: {cut})") from e
    finally:
        stream.close()


def _drain(tar: TarReader, url: str) -> None:
    """Read the remaining members (raising on a truncated tar); more samples than expected are only logged."""
    extra = sum(1 for m in tar if m.is_file)
    if extra:
        log.warning("%s: %d members after the expected number of samples (stale manifest?); not read", url, extra)


def _exit_status(stream: IO[bytes]) -> str:
    """", command exited with status N" for a failed pipe: command (curl --fail on a 404 says nothing else)."""
    if isinstance(stream, _PipeStream):
        status = stream.close()
        return f", command exited with status {status}" if status else ""
    return ""


def scan_shard(url: str, remote: RemoteOptions = DEFAULT_REMOTE) -> tuple[int, SkipSample | None]:
    """Read a shard's tar headers only (nothing is decoded): (complete samples, the SkipSample that ended the read
    early, or None when the whole shard was read)."""
    n, problem, _ = _scan(url, remote)
    return n, problem


def count_tar_samples(url: str, remote: RemoteOptions = DEFAULT_REMOTE) -> int:
    """Count the complete samples in a shard by reading its tar headers only (nothing is decoded). A truncated or
    empty tar counts the samples before the break; a shard that cannot be opened (missing file, HTTP 404) or whose
    remote read fails after its retries raises that SkipSample."""
    n, problem, tar_format = _scan(url, remote)
    if problem is not None and not tar_format:
        raise problem
    return n


def _scan(url: str, remote: RemoteOptions) -> tuple[int, SkipSample | None, bool]:
    """(complete samples, the problem, whether the problem is the tar's own format rather than opening/reading)."""
    n = 0
    last_key = None
    try:
        stream = open_url(url, remote=remote)
    except SkipSample as e:
        return 0, e, False
    try:
        for member in TarReader(stream):
            parts = split_key_ext(member.name) if member.is_file else None
            if parts is not None and parts[0] != last_key:
                n += 1
                last_key = parts[0]
        status = _exit_status(stream)
        return n, (SkipSample(UNREADABLE_SHARD, f"{url}{status}") if status else None), False
    except TAR_READ_ERRORS as e:
        status = _exit_status(stream)
        reason = TRUNCATED_TAR if last_key is not None else UNREADABLE_SHARD
        return max(n - 1, 0), SkipSample(reason, f"{url}: {type(e).__name__}: {e}{status}"), not status
    except SkipSample as e:  # a remote read that failed after its retries: the sample in progress is not complete
        return max(n - 1, 0), e, False
    finally:
        stream.close()
