"""data_pipelines.tario.TarReader against Python's tarfile: the same members, data and offsets for every tar format
and compression tarfile writes, and a clear TarReadError (never wrong data) for every cut or damaged byte."""

import io
import random
import re
import tarfile

import pytest

from data_pipelines.errors import SkipSample
from data_pipelines.tario import TAR_READ_ERRORS, TarReader, TarReadError, iter_tar_samples
from tests.data_helpers import write_tar

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def _members(fmt: int) -> list[tarfile.TarInfo]:
    """Names and types that exercise each format: a long name (ustar prefix, GNU 'L', pax path), a name over 100
    bytes with no '/' to split at (GNU and pax only), non-ASCII (GNU and pax), a directory, a symlink, empty and
    block-sized files."""
    members = []

    def add(name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "a/target.jpg"
        info.size = len(data) if data is not None else 0
        members.append((info, data))

    add("dir", kind=tarfile.DIRTYPE)
    add("dir/000001.jpg", bytes(range(256)) * 7)
    add("dir/000001.txt", b"a caption")
    add("dir/000002.cls", b"")
    add("dir/000002.json", b"x" * 512)
    add("link.jpg", kind=tarfile.SYMTYPE)
    add("/".join(["deep" * 10] * 3) + "/000003.png", b"\x89PNG" + bytes(3000))
    if fmt != tarfile.USTAR_FORMAT:
        add("n" * 120 + ".txt", b"no slash to split at")
        add("caf\u00e9/000004.txt", "un caf\u00e9".encode())
    return members


def _tar_bytes(fmt: int, mode: str = "w", pax_headers: dict | None = None) -> bytes:
    out = io.BytesIO()
    kwargs = {"pax_headers": pax_headers} if pax_headers else {}
    with tarfile.open(fileobj=out, mode=mode, format=fmt, **kwargs) as tar:
        for info, data in _members(fmt):
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


class _Trickle(io.RawIOBase):
    """A stream that returns 1 to 7 bytes per read, as a pipe or a socket may."""

    def __init__(self, data: bytes, seed: int = 0):
        self.data, self.pos, self.rng = data, 0, random.Random(seed)

    def read(self, size: int = -1) -> bytes:
        n = self.rng.randint(1, 7) if size < 0 else min(size, self.rng.randint(1, 7))
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk


def _read_ours(data: bytes, stream=io.BytesIO) -> list[tuple]:
    reader = TarReader(stream(data))
    return [(m.name, m.size, m.offset, m.is_file, reader.read() if m.is_file else None) for m in reader]


def _read_tarfile(data: bytes) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, m.size, m.offset, m.isfile(), tar.extractfile(m).read() if m.isfile() else None)
                for m in tar]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_members_data_and_offsets_equal_tarfiles(fmt, mode):
    data = _tar_bytes(FORMATS[fmt], mode)
    ours = _read_ours(data)
    assert ours == _read_tarfile(data) == _read_ours(data, _Trickle)
    assert len(ours) == len(_members(FORMATS[fmt]))
    assert TarReader(io.BytesIO(data)).compressed == (mode != "w")


def test_pax_global_header_and_base256_size():
    data = _tar_bytes(tarfile.PAX_FORMAT, pax_headers={"comment": "written by a test"})
    assert _read_ours(data) == _read_tarfile(data)
    # A GNU header with its size in base-256 (what GNU tar writes for members over 8 GiB), checksum recomputed.
    header = bytearray(tarfile.TarInfo("big.bin").tobuf(tarfile.GNU_FORMAT))
    header[124:136] = b"\x80" + (700).to_bytes(11, "big")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    tar = bytes(header) + bytes(range(256)) * 2 + bytes(188) + bytes(324) + bytes(1024)
    assert _read_ours(tar) == _read_tarfile(tar) == [("big.bin", 700, 0, True, (bytes(range(256)) * 2 + bytes(188)))]


@pytest.mark.parametrize("stream", [io.BytesIO, _Trickle])
def test_every_cut_yields_whole_members_then_an_error_naming_the_byte(stream):
    data = _tar_bytes(tarfile.PAX_FORMAT)
    full = _read_ours(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.getmembers()
        end = tar.offset  # the first end-of-archive block
    # A cut exactly at a member's first header is the end of a shorter tar (tarfile accepts a tar without end blocks).
    ends = {m[2] for m in full} | {end}
    errors = 0
    for cut in range(1, len(data), 37):
        got = []
        try:
            reader = TarReader(stream(data[:cut]))
            for m in reader:
                got.append((m.name, m.size, m.offset, m.is_file, reader.read() if m.is_file else None))
        except TarReadError as e:
            errors += 1
            assert int(re.search(r"byte (\d+)", str(e)).group(1)) <= cut < end, (cut, e)  # names where it broke
            assert cut not in ends
        else:
            assert cut in ends or cut >= end, cut  # a cut in the end-of-archive blocks loses nothing
            assert len(got) == (len(full) if cut >= end else sum(m[2] < cut for m in full)), cut
        assert got == full[:len(got)], cut  # never a member with wrong or short data
    assert errors > len(range(1, len(data), 37)) // 2


def test_every_cut_of_a_compressed_tar_yields_whole_members_then_an_error():
    data = _tar_bytes(tarfile.PAX_FORMAT, "w:gz")
    full = _read_ours(data)
    errors = 0
    for cut in range(1, len(data), 29):
        got = []
        try:
            reader = TarReader(io.BytesIO(data[:cut]))
            for m in reader:
                got.append((m.name, m.size, m.offset, m.is_file, reader.read() if m.is_file else None))
        except TAR_READ_ERRORS:
            errors += 1
        else:  # the cut was after the end-of-archive block's compressed bytes (in the gzip trailer)
            assert got == full, cut
        assert got == full[:len(got)], cut
    assert errors > len(range(1, len(data), 29)) // 2


def test_a_cut_shard_yields_its_whole_samples_not_the_cut_one(tmp_path):
    samples = [(f"{i:06d}", {"png": bytes([i]) * (300 + 200 * i), "cls": str(i).encode(), "txt": b"t" * i})
               for i in range(6)]
    whole = tmp_path / "whole.tar"
    write_tar(str(whole), samples)
    data = whole.read_bytes()
    with tarfile.open(whole) as tar:
        starts = {m.offset for m in tar.getmembers()}
        end = tar.offset
    cut_file = tmp_path / "cut.tar"
    for cut in range(600, end, 211):
        cut_file.write_bytes(data[:cut])
        got = []
        with pytest.raises(SkipSample) as caught:
            for sample in iter_tar_samples(str(cut_file)):
                got.append(sample)
        assert cut not in starts
        assert caught.value.reason == "truncated_tar" and str(cut_file) in str(caught.value), cut
        assert [{k: v for k, v in s.items() if not k.startswith("__")} for s in got] == \
            [parts for _, parts in samples[:len(got)]], cut  # whole samples only, in order
        assert str(caught.value).endswith(f"(sample cut: {samples[len(got)][0]})"), (cut, caught.value)


def test_names_that_look_like_compression_and_trailing_bytes_after_a_gzip_tar():
    # A plain tar whose first member's name starts like a bzip2 or gzip stream is still a plain tar.
    for name in ("BZh91AY&SY.txt", "\x1f\x8b\x08.txt"):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
        assert _read_ours(out.getvalue()) == [(name, 3, 0, True, b"abc")]  # tarfile's "r|*" gives up on these
        assert not TarReader(io.BytesIO(out.getvalue())).compressed
    # Bytes after a gzip tar's end (tarfile never reads them; gzip would refuse them): every member still arrives.
    data = _tar_bytes(tarfile.PAX_FORMAT, "w:gz") + b"trailing junk"
    assert _read_ours(data) == _read_tarfile(data)


def test_a_bad_pax_size_or_a_negative_size_is_a_tar_error():
    for size in ("1x", "-1"):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("a.txt")
            info.size = 3
            info.pax_headers = {"size": size}
            tar.addfile(info, io.BytesIO(b"abc"))
        with pytest.raises(TarReadError, match="size"):
            _read_ours(out.getvalue())


def test_damaged_header_and_not_a_tar():
    data = bytearray(_tar_bytes(tarfile.USTAR_FORMAT))
    second = _read_ours(bytes(data))[1][2]
    data[second + 10] ^= 0xFF  # a byte of the second member's name
    reader = TarReader(io.BytesIO(bytes(data)))
    with pytest.raises(TarReadError, match=f"bad header checksum at byte {second}"):
        [m.name for m in reader]
    for junk, message in ((b"", "empty file"), (b"not a tar" * 100, "at byte 0"), (bytes(300), "inside a header")):
        with pytest.raises(TarReadError, match=message):
            TarReader(io.BytesIO(junk))


def test_gnu_sparse_is_refused_not_misread():
    header = bytearray(tarfile.TarInfo("sparse.bin").tobuf(tarfile.GNU_FORMAT))
    header[156:157] = b"S"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    with pytest.raises(TarReadError, match="GNU sparse member at byte 0"):
        list(TarReader(io.BytesIO(bytes(header) + bytes(1024))))
    out = io.BytesIO()  # pax sparse (GNU tar 1.14+): records on a regular member
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("sparse.bin")
        info.pax_headers = {"GNU.sparse.size": "4096", "GNU.sparse.numblocks": "0"}
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(TarReadError, match="GNU sparse member at byte 0"):
        list(TarReader(io.BytesIO(out.getvalue())))


def test_samples_resume_at_a_reported_offset_of_a_pax_tar(tmp_path):
    """__next_offset__ is the first header of the next sample, pax headers included: a read started there gives
    the rest of the samples."""
    out = tmp_path / "long.tar"
    folder = "caf\u00e9" * 30
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(4):
            for ext, payload in (("txt", f"caption {i}".encode()), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"{folder}/{i:06d}.{ext}")  # non-ASCII and long: pax headers
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    samples = list(iter_tar_samples(str(out)))
    assert [s["cls"] for s in samples] == [b"0", b"1", b"2", b"3"]
    rest = list(iter_tar_samples(str(out), start_offset_bytes=samples[1]["__next_offset__"]))
    assert [s["txt"] for s in rest] == [b"caption 2", b"caption 3"]
