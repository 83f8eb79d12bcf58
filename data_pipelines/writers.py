"""Shard writers: turn a raw source into WebDataset tar shards plus a ``manifest.json``.

Writing happens in three steps:

1. **list** the input (``list_imagefolder``, ``list_imagenet22k``, ``list_webdataset``, ``list_table``,
   ``list_idx``): a list of
   :class:`InputSample` (key + where each part's bytes are; nothing is read yet except small metadata);
2. **plan** shards (:func:`plan_shards`): consecutive samples, at most ``samples_per_shard`` and, by input size,
   ``max_shard_bytes`` per shard, so the plan is known before anything is written and is the same on every run;
3. **write** each planned shard (:func:`write_shard`, in parallel worker processes): to ``NAME.tmp``, then renamed,
   so a finished shard is never partial. Re-running the same write keeps finished shards (resume).

Output members are ``KEY.EXT`` with the image as ``.jpg`` (or the source's own ``.png``/``.webp``...), the label
as ``.cls`` (decimal text), the caption as ``.txt`` and metadata as ``.json``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import struct
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from PIL import Image

from data_pipelines.decode import decode_image, image_format
from data_pipelines.errors import SkipSample
from data_pipelines.manifest import ShardRecord, sha256_file, write_manifest
from data_pipelines.tario import count_tar_samples, expand_urls, split_key_ext

log = logging.getLogger("data_pipelines")

TAR_BLOCK_BYTES = 512
IMAGE_FILE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp",
                         ".gif": "gif", ".tif": "tiff", ".tiff": "tiff"}
IMAGE_PART_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
WRITE_CONFIG_NAME = "write_config.json"


@dataclass
class PartRef:
    """Where the bytes of one sample part are: a file, a byte range in a file (tar member), or inline."""

    path: str | None = None
    offset_bytes: int = 0
    size_bytes: int = -1
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            if self.offset_bytes:
                f.seek(self.offset_bytes)
            return f.read(self.size_bytes)

    def estimated_bytes(self) -> int:
        size = len(self.data) if self.data is not None else self.size_bytes
        if size < 0:
            size = os.path.getsize(self.path)
        return TAR_BLOCK_BYTES + -(-size // TAR_BLOCK_BYTES) * TAR_BLOCK_BYTES


@dataclass
class InputSample:
    """One sample to write: its key (no dots) and its parts by extension."""

    key: str
    parts: dict[str, PartRef] = field(default_factory=dict)

    def estimated_bytes(self) -> int:
        return sum(p.estimated_bytes() for p in self.parts.values())


@dataclass
class WriteOptions:
    """How to write: shard limits (samples_per_shard, max_shard_bytes), optional resize on write to
    ``resize_max_side_px`` re-encoded as JPEG at ``jpeg_quality``, parallel ``num_workers``, progress bar.
    ``shuffle_seed`` shuffles the sample order across all shards before planning (None keeps the input order):
    the loader mixes only a few shards at a time, so class-sorted input (ImageNet folders) must be shuffled here."""

    samples_per_shard: int = 1000
    shuffle_seed: int | None = 0
    max_shard_bytes: int = 1 << 30
    resize_max_side_px: int | None = None
    jpeg_quality: int = 95
    num_workers: int = 1
    progress: bool = True
    prefix: str = "shard"
    source_name: str = "data"


# ---- class maps ------------------------------------------------------------------------------------------------

def load_class_map(path: str) -> dict[str, int]:
    """Read a class map: one class id per line (line number = index, blank lines ignored) or JSON {id: index}."""
    with open(path) as f:
        text = f.read()
    if path.endswith(".json") or text.lstrip().startswith("{"):
        return {str(k): int(v) for k, v in json.loads(text).items()}
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate class ids")
    return {class_id: index for index, class_id in enumerate(ids)}


def _label_index(class_map: dict[str, int], class_id: str, where: str) -> int:
    if class_id not in class_map:
        raise ValueError(f"{where}: class id {class_id!r} is not in the class map ({len(class_map)} classes)")
    return class_map[class_id]


# ---- listing inputs --------------------------------------------------------------------------------------------

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: dots and unusual characters become '_' (a dot would split the extension)."""
    return _KEY_UNSAFE.sub("_", text)


def _labelled_sample(key: str, image_path: str, class_id: str, index: int, extra: dict | None = None) -> InputSample:
    ext = IMAGE_FILE_EXTENSIONS[os.path.splitext(image_path)[1].lower()]
    meta = {"class_id": class_id, "source_path": image_path, **(extra or {})}
    return InputSample(key, {ext: PartRef(path=image_path), "cls": PartRef(data=str(index).encode()),
                             "json": PartRef(data=json.dumps(meta, sort_keys=True).encode())})


def list_imagefolder(root: str, *, label_from: str = "folder",
                     class_map: dict[str, int] | None = None) -> tuple[list[InputSample], dict[str, int]]:
    """List images under ``root`` with labels; returns (samples sorted by path, class map used).

    ``label_from="folder"``: ``root/<class_id>/**/<image>`` (ImageNet train/val layout).
    ``label_from="filename-prefix"``: the class id is the file name up to the first '_' (``n01440764_tench.JPEG``).
    Without ``class_map`` the sorted class ids get indices 0..N-1.
    """
    found: list[tuple[str, str]] = []  # (relative path, class id)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if os.path.splitext(name)[1].lower() not in IMAGE_FILE_EXTENSIONS:
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if label_from == "folder":
                if os.sep not in rel:
                    raise ValueError(f"{rel}: not inside a class folder (use --label-from filename-prefix?)")
                class_id = rel.split(os.sep)[0]
            elif label_from == "filename-prefix":
                class_id = name.split("_", 1)[0]
            else:
                raise ValueError(f"label_from must be 'folder' or 'filename-prefix', not {label_from!r}")
            found.append((rel, class_id))
    if not found:
        raise ValueError(f"{root}: no images found")
    found.sort()
    if class_map is None:
        class_map = {c: i for i, c in enumerate(sorted({c for _, c in found}))}
    samples = []
    for rel, class_id in found:
        index = _label_index(class_map, class_id, os.path.join(root, rel))
        key = sanitize_key(os.path.splitext(rel)[0].replace(os.sep, "/"))
        samples.append(_labelled_sample(key, os.path.join(root, rel), class_id, index))
    return samples, class_map


def list_imagenet22k(root: str, *,
                     class_map: dict[str, int] | None = None) -> tuple[list[InputSample], dict[str, int]]:
    """List the images of a winter21-style ImageNet-22K folder: one ``<wnid>.tar`` of JPEGs per synset.
    Returns (samples sorted by synset then member, class map used; default: sorted wnids)."""
    tars = sorted(name for name in os.listdir(root) if name.endswith(".tar"))
    if not tars:
        raise ValueError(f"{root}: no <wnid>.tar files")
    wnids = [name[:-4] for name in tars]
    if class_map is None:
        class_map = {w: i for i, w in enumerate(sorted(wnids))}
    samples = []
    for name, wnid in zip(tars, wnids):
        path = os.path.join(root, name)
        index = _label_index(class_map, wnid, path)
        with tarfile.open(path, "r:") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            ext = IMAGE_FILE_EXTENSIONS.get(os.path.splitext(m.name)[1].lower())
            if ext is None:
                continue
            key = sanitize_key(f"{wnid}/{os.path.splitext(os.path.basename(m.name))[0]}")
            meta = {"class_id": wnid, "source_path": f"{path}:{m.name}"}
            samples.append(InputSample(key, {
                ext: PartRef(path=path, offset_bytes=m.offset_data, size_bytes=m.size),
                "cls": PartRef(data=str(index).encode()),
                "json": PartRef(data=json.dumps(meta, sort_keys=True).encode())}))
    return samples, class_map


def list_webdataset(pattern: str, *, min_image_side_px: int | None = None,
                    require_caption: bool = False) -> tuple[list[InputSample], Counter]:
    """List the samples of existing WebDataset / img2dataset shards (a directory of tars or a brace pattern).

    Every part is kept (.jpg/.png, .txt, .json, .cls ...). Uncompressed tars are referenced by byte range;
    compressed ones (.tgz, .tar.gz) are read into memory. ``min_image_side_px`` (from the img2dataset .json
    width/height) and ``require_caption`` drop samples while listing. Returns (samples, dropped per reason).
    """
    if os.path.isdir(pattern):
        urls = sorted(os.path.join(pattern, n) for n in os.listdir(pattern)
                      if n.endswith((".tar", ".tgz", ".tar.gz")))
    else:
        urls = expand_urls(pattern)
    dropped: Counter = Counter()
    samples: list[InputSample] = []
    for url in urls:
        compressed = url.endswith((".tgz", ".gz"))
        by_key: dict[str, InputSample] = {}
        with tarfile.open(url, "r:*") as tar:
            for m in tar:
                parts = split_key_ext(m.name) if m.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                ref = (PartRef(data=tar.extractfile(m).read()) if compressed
                       else PartRef(path=url, offset_bytes=m.offset_data, size_bytes=m.size))
                by_key.setdefault(key, InputSample(sanitize_key(key))).parts[ext] = ref
        for sample in by_key.values():
            if not any(ext in sample.parts for ext in IMAGE_PART_EXTENSIONS):
                dropped["missing_image"] += 1
                continue
            if require_caption and "txt" not in sample.parts:
                dropped["missing_caption"] += 1
                continue
            if min_image_side_px is not None and "json" in sample.parts:
                meta = json.loads(sample.parts["json"].read())
                width, height = meta.get("width"), meta.get("height")
                if isinstance(width, int) and isinstance(height, int) and min(width, height) < min_image_side_px:
                    dropped["filter:min_image_side"] += 1
                    continue
            samples.append(sample)
    return samples, dropped


def list_table(path: str, *, image_column: str = "image", caption_column: str | None = "caption",
               label_column: str | None = None, key_column: str | None = None) -> list[InputSample]:
    """List samples from a CSV or parquet table: the image column holds a file path (relative to the table's
    folder) or the image bytes (parquet; also HF-style {"bytes": ...}); optional caption and label columns."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise RuntimeError("reading parquet needs pyarrow (pip install pyarrow), or convert the table to CSV") \
                from e
        rows: Iterable[dict] = pq.read_table(path).to_pylist()
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    base = os.path.dirname(os.path.abspath(path))
    samples = []
    for i, row in enumerate(rows):
        if image_column not in row:
            raise ValueError(f"{path}: no column {image_column!r} (columns: {sorted(row)})")
        value = row[image_column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes | bytearray):
            data = bytes(value)
            ext = {"jpeg": "jpg"}.get(image_format(data) or "jpeg", image_format(data) or "jpg")
            image_ref = PartRef(data=data)
            source = f"{path}#{i}"
        else:
            image_path = value if os.path.isabs(value) else os.path.join(base, value)
            ext = IMAGE_FILE_EXTENSIONS.get(os.path.splitext(image_path)[1].lower(), "jpg")
            image_ref = PartRef(path=image_path)
            source = image_path
        key = sanitize_key(str(row[key_column])) if key_column else f"{i:09d}"
        sample = InputSample(key, {ext: image_ref})
        if caption_column and row.get(caption_column) is not None:
            sample.parts["txt"] = PartRef(data=str(row[caption_column]).encode("utf-8"))
        if label_column and row.get(label_column) not in (None, ""):
            sample.parts["cls"] = PartRef(data=str(int(row[label_column])).encode())
        sample.parts["json"] = PartRef(data=json.dumps({"source_path": source}).encode())
        samples.append(sample)
    return samples


IDX_IMAGES_MAGIC = 2051  # uint8 pixels, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 2049  # uint8 labels, 1 dimension (count)
GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str, expected_magic: int) -> tuple[tuple[int, ...], bytes]:
    """Read an IDX file (MNIST / Fashion-MNIST layout; gzip-compressed or not) of unsigned bytes.

    Returns (dimensions, payload): dimensions as stored after the magic number (count first), payload the raw
    uint8 values, row-major. Raises ValueError naming ``path`` for a wrong magic number or a truncated/overlong file.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    (magic,) = struct.unpack(">i", raw[:4])
    if magic != expected_magic:
        raise ValueError(f"{path}: IDX magic number {magic}, expected {expected_magic} "
                         f"({'images' if expected_magic == IDX_IMAGES_MAGIC else 'labels'} file)")
    n_dims = expected_magic & 0xFF
    header_bytes = 4 + 4 * n_dims
    if len(raw) < header_bytes:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{n_dims}i", raw[4:header_bytes])
    payload_bytes = 1
    for d in dims:
        payload_bytes *= d
    if len(raw) - header_bytes != payload_bytes:
        raise ValueError(f"{path}: header says {' x '.join(map(str, dims))} = {payload_bytes} values, "
                         f"the file holds {len(raw) - header_bytes}")
    return dims, raw[header_bytes:]


def idx_image_png(pixels: bytes, index: int, height: int, width: int) -> bytes:
    """Image ``index`` of an IDX images payload (``read_idx``'s) as the lossless greyscale PNG the shards hold."""
    size = height * width
    png = io.BytesIO()
    Image.frombytes("L", (width, height), pixels[index * size:(index + 1) * size]).save(png, "PNG")
    return png.getvalue()


def load_class_names(spec: str) -> list[str]:
    """Class names in label order: a file with one name per line, or a comma-separated list."""
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [name.strip() for name in spec.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"class names {spec!r}: duplicate names")
    return names


def load_caption_templates(path: str) -> list[str]:
    """Caption templates from a file, one per line (blank lines skipped), each holding ``{class}``."""
    with open(path, encoding="utf-8") as f:
        templates = [line.strip() for line in f if line.strip()]
    if not templates:
        raise ValueError(f"caption templates {path}: no templates in the file")
    for template in templates:
        if "{class}" not in template:
            raise ValueError(f"caption templates {path}: {template!r} has no {{class}} placeholder")
    return templates


def list_idx(images_path: str, labels_path: str, class_names: Sequence[str], *,
             caption_templates: Sequence[str] = (), caption_seed: int = 0) -> tuple[list[InputSample], dict[str, int]]:
    """List the images of an IDX pair (``*-images-idx3-ubyte[.gz]``, ``*-labels-idx1-ubyte[.gz]``) as greyscale
    PNGs with ``.cls`` labels; returns (samples in file order, class map {name: index}).

    ``class_names[i]`` names label ``i``. With ``caption_templates`` (each holding ``{class}``) every sample also
    gets a ``.txt`` caption from one template drawn with ``caption_seed`` (the same draws on every run).
    """
    dims, pixels = read_idx(images_path, IDX_IMAGES_MAGIC)
    (n_labels,), labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    n_images, height, width = dims
    if n_images != n_labels:
        raise ValueError(f"{images_path} holds {n_images} images but {labels_path} holds {n_labels} labels")
    if not class_names:
        raise ValueError(f"{labels_path}: no class names given")
    if max(labels, default=0) >= len(class_names):
        index = next(i for i, label in enumerate(labels) if label >= len(class_names))
        raise ValueError(f"{labels_path}: label {labels[index]} of sample {index} has no class name "
                         f"({len(class_names)} names)")
    for template in caption_templates:
        if "{class}" not in template:
            raise ValueError(f"caption template {template!r} has no {{class}} placeholder")
    rng = random.Random(caption_seed)
    samples = []
    for i in range(n_images):
        label = labels[i]
        meta = {"class_name": class_names[label], "source_path": f"{images_path}#{i}"}
        sample = InputSample(f"{i:06d}", {"png": PartRef(data=idx_image_png(pixels, i, height, width)),
                                          "cls": PartRef(data=str(label).encode()),
                                          "json": PartRef(data=json.dumps(meta, sort_keys=True).encode())})
        if caption_templates:
            caption = rng.choice(caption_templates).replace("{class}", class_names[label])
            sample.parts["txt"] = PartRef(data=caption.encode("utf-8"))
        samples.append(sample)
    return samples, {name: index for index, name in enumerate(class_names)}


# ---- planning and writing --------------------------------------------------------------------------------------

def plan_shards(samples: Sequence[InputSample], *, samples_per_shard: int, max_shard_bytes: int,
                prefix: str) -> list[tuple[str, list[InputSample]]]:
    """Cut ``samples`` (in order) into shards named ``{prefix}-{index:06d}.tar``: a new shard starts when the
    current one has ``samples_per_shard`` samples or the next sample would take it over ``max_shard_bytes``
    (estimated from input sizes plus tar headers; a resize on write only makes shards smaller)."""
    if samples_per_shard < 1 or max_shard_bytes < 1:
        raise ValueError("samples_per_shard and max_shard_bytes must be positive")
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k, n in Counter(keys).items() if n > 1)
        raise ValueError(f"duplicate sample key {duplicate!r}: keys must be unique within a write")
    shards: list[tuple[str, list[InputSample]]] = []
    current: list[InputSample] = []
    current_bytes = 2 * TAR_BLOCK_BYTES  # end-of-archive blocks
    for sample in samples:
        sample_bytes = sample.estimated_bytes()
        if current and (len(current) >= samples_per_shard or current_bytes + sample_bytes > max_shard_bytes):
            shards.append((f"{prefix}-{len(shards):06d}.tar", current))
            current, current_bytes = [], 2 * TAR_BLOCK_BYTES
        current.append(sample)
        current_bytes += sample_bytes
    if current:
        shards.append((f"{prefix}-{len(shards):06d}.tar", current))
    return shards


def _resize_image(data: bytes, max_side_px: int, jpeg_quality: int) -> bytes | None:
    """Re-encode as JPEG if the image's longer side exceeds ``max_side_px``; None when it already fits."""
    img = decode_image(data)
    if max(img.size) <= max_side_px:
        return None
    scale = max_side_px / max(img.size)
    new_size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    out = io.BytesIO()
    img.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0).save(out, "JPEG", quality=jpeg_quality)
    return out.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # deterministic output: the same input gives byte-identical shards
    tar.addfile(info, io.BytesIO(data))


def write_shard(out_dir: str, name: str, samples: Sequence[InputSample], options: WriteOptions) -> dict:
    """Write one shard to ``out_dir/name`` (atomically) and return its record plus samples dropped per reason."""
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    dropped: Counter = Counter()
    n_written = 0
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            parts = {ext: ref.read() for ext, ref in sample.parts.items()}
            if options.resize_max_side_px:
                image_ext = next((e for e in IMAGE_PART_EXTENSIONS if e in parts), None)
                if image_ext is not None:
                    try:
                        resized = _resize_image(parts[image_ext], options.resize_max_side_px, options.jpeg_quality)
                    except SkipSample as e:
                        dropped[e.reason] += 1
                        log.warning("write: dropped %s from %s: %s", sample.key, name, e)
                        continue
                    if resized is not None:
                        del parts[image_ext]
                        parts["jpg"] = resized
            for ext in sorted(parts):
                _add_member(tar, f"{sample.key}.{ext}", parts[ext])
            n_written += 1
    os.replace(tmp, path)
    record = ShardRecord(name, options.source_name, n_written, os.path.getsize(path), sha256_file(path))
    return {"record": asdict(record), "dropped": dict(dropped)}


def _write_shard_task(args: tuple) -> dict:
    return write_shard(*args)


def _plan_fingerprint(plan: Sequence[tuple[str, list[InputSample]]], options: WriteOptions) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in asdict(options).items() if k not in ("num_workers", "progress")},
                             sort_keys=True).encode())
    for name, samples in plan:
        digest.update(name.encode())
        for s in samples:
            digest.update(s.key.encode() + b"\0")
    return digest.hexdigest()


def write_shards(samples: Sequence[InputSample], out_dir: str, options: WriteOptions, *, kind: str,
                 input_desc: str, class_map: dict[str, int] | None = None,
                 listing_dropped: Counter | None = None) -> dict:
    """Plan and write all shards of ``samples`` into ``out_dir``, then the manifest; returns the manifest dict.

    Resume: shards already finished by an earlier run of the *same* write (same input listing and options,
    checked through ``write_config.json``) are kept and not rewritten; a different write into a non-empty
    ``out_dir`` is refused.
    """
    os.makedirs(out_dir, exist_ok=True)
    if options.shuffle_seed is not None:
        samples = list(samples)
        random.Random(options.shuffle_seed).shuffle(samples)
    plan = plan_shards(samples, samples_per_shard=options.samples_per_shard,
                       max_shard_bytes=options.max_shard_bytes, prefix=options.prefix)
    config = {"kind": kind, "input": input_desc, "options": asdict(options), "plan": _plan_fingerprint(plan, options)}
    config_path = os.path.join(out_dir, WRITE_CONFIG_NAME)
    if os.path.exists(config_path):
        with open(config_path) as f:
            previous = json.load(f)
        if previous.get("plan") != config["plan"]:
            raise ValueError(f"{out_dir} holds shards of a different write (other input or options); "
                             f"use an empty output folder")
    elif any(n.endswith(".tar") for n in os.listdir(out_dir)):
        raise ValueError(f"{out_dir} already holds .tar files not written by this tool; use an empty folder")
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)

    records: list[ShardRecord] = []
    dropped: Counter = Counter(listing_dropped or {})
    todo = []
    for name, shard_samples in plan:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):  # finished by an earlier run (files appear only by atomic rename)
            records.append(ShardRecord(name, options.source_name, count_tar_samples(path), os.path.getsize(path),
                                       sha256_file(path)))
        else:
            todo.append((out_dir, name, shard_samples, options))
    if records:
        log.info("resuming: %d of %d shards already written", len(records), len(plan))
    progress = _progress_bar(sum(len(t[2]) for t in todo), options.progress)
    if options.num_workers > 1 and len(todo) > 1:
        with multiprocessing.get_context("fork").Pool(options.num_workers) as pool:
            results = pool.imap_unordered(_write_shard_task, todo)
            for task_result in results:
                _collect(task_result, records, dropped, progress)
    else:
        for task in todo:
            _collect(write_shard(*task), records, dropped, progress)
    progress.close()
    options_out = {k: v for k, v in asdict(options).items() if k not in ("num_workers", "progress")}
    manifest = write_manifest(out_dir, records, kind=kind, options={**options_out, "input": input_desc,
                                                                     "dropped": dict(dropped)},
                              class_map=class_map)
    return manifest


def _collect(result: dict, records: list[ShardRecord], dropped: Counter, progress) -> None:
    records.append(ShardRecord(**result["record"]))
    dropped.update(result["dropped"])
    progress.update(result["record"]["samples"] + sum(result["dropped"].values()))


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total_samples: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total_samples, unit="sample", desc="write")
