"""The shard manifest (``manifest.json`` next to the shards) and its verification.

Layout::

    {"format": "data_pipelines.manifest/1",
     "kind": "imagefolder", "options": {...},            # how the shards were written
     "shards": [{"name": "in1k-000000.tar", "source": "in1k", "samples": 100, "bytes": 1234, "sha256": "..."}],
     "sources": {"in1k": {"shards": 2, "samples": 200, "bytes": 2468}},
     "totals": {"shards": 2, "samples": 200, "bytes": 2468},
     "class_map": {"n01440764": 0, ...}}                  # only for labelled data
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from data_pipelines.tario import count_tar_samples, is_remote

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "data_pipelines.manifest/1"


@dataclass
class ShardRecord:
    """One written shard: file name (relative to the manifest), source name, sample count, size and checksum."""

    name: str
    source: str
    samples: int
    bytes: int
    sha256: str


def sha256_file(path: str, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(out_dir: str, records: list[ShardRecord], *, kind: str, options: dict,
                   class_map: dict[str, int] | None = None) -> dict:
    """Write ``out_dir/manifest.json`` atomically from shard ``records`` (sorted by name); returns the dict."""
    records = sorted(records, key=lambda r: r.name)
    sources: dict[str, dict[str, int]] = {}
    for r in records:
        s = sources.setdefault(r.source, {"shards": 0, "samples": 0, "bytes": 0})
        s["shards"] += 1
        s["samples"] += r.samples
        s["bytes"] += r.bytes
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "options": options,
        "shards": [asdict(r) for r in records],
        "sources": sources,
        "totals": {"shards": len(records), "samples": sum(r.samples for r in records),
                   "bytes": sum(r.bytes for r in records)},
    }
    if class_map is not None:
        manifest["class_map"] = class_map
    tmp = os.path.join(out_dir, MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MANIFEST_NAME))
    return manifest


def read_manifest(path: str) -> dict:
    """Load a manifest: ``path`` is the shard folder (reads ``path/manifest.json``) or the manifest file itself.
    Raises FileNotFoundError, or ValueError for a foreign format."""
    file_path = os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path
    with open(file_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{file_path}: unknown format {manifest.get('format')!r}")
    return manifest


def manifest_sample_counts(urls: list[str]) -> dict[str, int]:
    """Sample counts for the local shard ``urls`` that a manifest in their directory lists (others are absent)."""
    counts: dict[str, int] = {}
    by_dir: dict[str, dict[str, int] | None] = {}
    for url in urls:
        path = url[len("file:"):] if url.startswith("file:") else url
        if is_remote(path):
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if directory not in by_dir:
            try:
                by_dir[directory] = {s["name"]: s["samples"] for s in read_manifest(directory)["shards"]}
            except (FileNotFoundError, ValueError, KeyError):
                by_dir[directory] = None
        listing = by_dir[directory]
        if listing is not None and os.path.basename(path) in listing:
            counts[url] = listing[os.path.basename(path)]
    return counts


def verify_manifest(out_dir: str, *, recount: bool = True) -> list[str]:
    """Re-read every shard listed in ``out_dir``'s manifest and compare bytes, sha256 and (if ``recount``) the
    sample count. Returns a list of human-readable problems (empty when everything matches)."""
    manifest = read_manifest(out_dir)
    problems: list[str] = []
    for shard in manifest["shards"]:
        path = os.path.join(out_dir, shard["name"])
        if not os.path.exists(path):
            problems.append(f"{shard['name']}: missing")
            continue
        size_bytes = os.path.getsize(path)
        if size_bytes != shard["bytes"]:
            problems.append(f"{shard['name']}: {size_bytes} bytes, manifest says {shard['bytes']}")
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from the manifest")
        if recount:
            n = count_tar_samples(path)
            if n != shard["samples"]:
                problems.append(f"{shard['name']}: {n} samples, manifest says {shard['samples']}")
    listed = {s["name"] for s in manifest["shards"]}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".tar") and name not in listed:
            problems.append(f"{name}: shard not in the manifest")
    totals = manifest["totals"]
    if totals["samples"] != sum(s["samples"] for s in manifest["shards"]):
        problems.append("totals.samples does not match the sum over shards")
    return problems
