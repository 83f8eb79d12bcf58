"""Shard writers on the real data: counts, labels and captions exact; output readable by tar and webdataset;
manifest verification; resume of an interrupted write."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.cli import main
from data_pipelines.manifest import read_manifest, verify_manifest
from data_pipelines.writers import WriteOptions, list_webdataset, load_class_map, write_shards
from tests.data_helpers import CC12M_TAR, IMAGENET_SAMPLES, IMAGENET_WNIDS, MNIST_TGZ, REPO_ROOT, read_tar

WNIDS = [line.strip() for line in open(IMAGENET_WNIDS) if line.strip()]


def shard_samples(out_dir: str) -> dict[str, dict[str, bytes]]:
    merged: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(out_dir)["shards"]:
        merged.update(read_tar(os.path.join(out_dir, shard["name"])))
    return merged


def test_imagefolder_filename_prefix_with_standard_class_map(tmp_path):
    out = str(tmp_path / "in1k")
    assert main(["write", "imagefolder", IMAGENET_SAMPLES, out, "--label-from", "filename-prefix",
                 "--class-map", IMAGENET_WNIDS, "--samples-per-shard", "100", "--no-progress"]) == 0
    manifest = read_manifest(out)
    assert manifest["totals"]["samples"] == 200 and manifest["totals"]["shards"] == 2
    assert [s["samples"] for s in manifest["shards"]] == [100, 100]
    assert manifest["class_map"]["n01440764"] == 0 and len(manifest["class_map"]) == 1000
    samples = shard_samples(out)
    files = sorted(os.listdir(IMAGENET_SAMPLES))
    assert len(samples) == 200
    for name in files:
        key = os.path.splitext(name)[0]
        assert int(samples[key]["cls"]) == WNIDS.index(name.split("_")[0])
        with open(os.path.join(IMAGENET_SAMPLES, name), "rb") as f:
            assert samples[key]["jpg"] == f.read()  # stored unchanged
    assert verify_manifest(out) == []
    # Readable by the webdataset library itself ...
    dataset = wds.WebDataset(os.path.join(out, "in1k-{000000..000001}.tar"), shardshuffle=False)
    assert sorted(s["__key__"] for s in dataset) == sorted(os.path.splitext(n)[0] for n in files)
    # ... and by tar.
    listing = subprocess.run(["tar", "tf", os.path.join(out, "in1k-000000.tar")], capture_output=True, text=True,
                             check=True).stdout.split()
    assert len(listing) == 300 and all(n.endswith((".jpg", ".cls", ".json")) for n in listing)
    # Class-sorted input is shuffled across shards (seeded), unless --no-shuffle.
    first_sorted = {os.path.splitext(n)[0] for n in files[:100]}
    assert set(read_tar(os.path.join(out, "in1k-000000.tar"))) != first_sorted
    ordered = str(tmp_path / "ordered")
    assert main(["write", "imagefolder", IMAGENET_SAMPLES, ordered, "--label-from", "filename-prefix",
                 "--samples-per-shard", "100", "--no-shuffle", "--no-progress"]) == 0
    assert set(read_tar(os.path.join(ordered, "ordered-000000.tar"))) == first_sorted


def test_imagefolder_class_folders_json_class_map_and_unknown_class(tmp_path):
    src = tmp_path / "folders"
    chosen = sorted(os.listdir(IMAGENET_SAMPLES))[:6]
    for name in chosen:
        (src / name.split("_")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(IMAGENET_SAMPLES, name), src / name.split("_")[0] / name)
    wnids = sorted({n.split("_")[0] for n in chosen})
    class_map_path = tmp_path / "map.json"
    class_map_path.write_text(json.dumps({w: 10 + i for i, w in enumerate(reversed(wnids))}))
    out = str(tmp_path / "out")
    assert main(["write", "imagefolder", str(src), out, "--class-map", str(class_map_path), "--no-progress"]) == 0
    samples = shard_samples(out)
    expected = load_class_map(str(class_map_path))
    for key, parts in samples.items():
        assert int(parts["cls"]) == expected[key.split("/")[0]]
    bad_map = tmp_path / "bad.txt"
    bad_map.write_text("n99999999\n")
    with pytest.raises(ValueError, match="not in the class map"):
        main(["write", "imagefolder", str(src), str(tmp_path / "out2"), "--class-map", str(bad_map)])


def test_imagenet22k_per_synset_tars_with_user_class_order(tmp_path):
    src = tmp_path / "winter21"
    src.mkdir()
    names = sorted(os.listdir(IMAGENET_SAMPLES))[:9]
    by_wnid: dict[str, list[str]] = {}
    for name in names:
        by_wnid.setdefault(name.split("_")[0], []).append(name)
    for wnid, files in by_wnid.items():
        with tarfile.open(src / f"{wnid}.tar", "w") as tar:
            for name in files:
                tar.add(os.path.join(IMAGENET_SAMPLES, name), arcname=name)
    order = sorted(by_wnid, reverse=True)  # a user-given order that is not the sorted one
    (tmp_path / "order.txt").write_text("\n".join(["n00000000"] + order) + "\n")
    out = str(tmp_path / "in22k")
    assert main(["write", "imagenet22k", str(src), out, "--class-map", str(tmp_path / "order.txt"),
                 "--samples-per-shard", "4", "--no-progress"]) == 0
    samples = shard_samples(out)
    assert len(samples) == len(names)
    for key, parts in samples.items():
        wnid = key.split("/")[0]
        assert int(parts["cls"]) == 1 + order.index(wnid)
        original = next(n for n in names if os.path.splitext(n)[0] == key.split("/")[1])
        with open(os.path.join(IMAGENET_SAMPLES, original), "rb") as f:
            assert parts["jpg"] == f.read()
    assert verify_manifest(out) == []


def test_img2dataset_reshard_keeps_captions_and_metadata(tmp_path):
    out = str(tmp_path / "cc12m")
    assert main(["write", "img2dataset", CC12M_TAR, out, "--samples-per-shard", "8", "--workers", "2",
                 "--no-progress"]) == 0
    original = read_tar(CC12M_TAR)
    written = shard_samples(out)
    assert written == original  # every part byte-identical: .jpg, .txt, .json
    assert read_manifest(out)["totals"] == {"shards": 4, "samples": 32,
                                            "bytes": sum(os.path.getsize(os.path.join(out, f"cc12m-00000{i}.tar"))
                                                         for i in range(4))}


def test_img2dataset_resize_filter_and_max_shard_bytes(tmp_path):
    out = str(tmp_path / "small")
    max_shard_bytes = 400_000
    assert main(["write", "img2dataset", CC12M_TAR, out, "--resize-max-side", "128", "--jpeg-quality", "90",
                 "--min-image-side", "300", "--max-shard-bytes", str(max_shard_bytes), "--no-progress"]) == 0
    original = read_tar(CC12M_TAR)
    keep = {k for k, p in original.items() if min(json.loads(p["json"])["width"], json.loads(p["json"])["height"])
            >= 300}
    manifest = read_manifest(out)
    assert manifest["options"]["dropped"] == ({"filter:min_image_side": 32 - len(keep)} if len(keep) < 32 else {})
    written = shard_samples(out)
    assert set(written) == keep
    for key, parts in written.items():
        assert max(Image.open(io.BytesIO(parts["jpg"])).size) <= 128
        assert parts["txt"] == original[key]["txt"]
    assert all(s["bytes"] <= max_shard_bytes for s in manifest["shards"])


def test_mnist_tgz_labels_exact(tmp_path):
    out = str(tmp_path / "mnist")
    samples, dropped = list_webdataset(MNIST_TGZ)
    assert len(samples) == 90 and not dropped
    write_shards(samples, out, WriteOptions(samples_per_shard=40, progress=False, prefix="mnist"), kind="webdataset",
                 input_desc=MNIST_TGZ)
    assert [s["samples"] for s in read_manifest(out)["shards"]] == [40, 40, 10]
    original = read_tar(MNIST_TGZ)
    written = shard_samples(out)
    assert {k: p["cls"] for k, p in written.items()} == {k: p["cls"] for k, p in original.items()}
    assert verify_manifest(out) == []


def test_resume_keeps_finished_shards_and_refuses_a_different_write(tmp_path):
    out = str(tmp_path / "cc12m")
    args = ["write", "img2dataset", CC12M_TAR, out, "--samples-per-shard", "10", "--no-progress"]
    assert main(args) == 0
    first = {s["name"]: s["sha256"] for s in read_manifest(out)["shards"]}
    # Simulate an interruption: one shard never renamed into place, the manifest not yet written.
    os.remove(os.path.join(out, "cc12m-000002.tar"))
    os.remove(os.path.join(out, "manifest.json"))
    with open(os.path.join(out, "cc12m-000002.tar.tmp"), "wb") as f:
        f.write(b"partial")
    kept_mtime = os.path.getmtime(os.path.join(out, "cc12m-000000.tar"))
    assert main(args) == 0
    assert os.path.getmtime(os.path.join(out, "cc12m-000000.tar")) == kept_mtime  # not rewritten
    assert {s["name"]: s["sha256"] for s in read_manifest(out)["shards"]} == first  # byte-identical result
    assert not os.path.exists(os.path.join(out, "cc12m-000002.tar.tmp"))
    with pytest.raises(ValueError, match="different write"):
        main(["write", "img2dataset", CC12M_TAR, out, "--samples-per-shard", "7", "--no-progress"])


def test_verify_reports_corruption_and_cli_exit_status(tmp_path):
    out = str(tmp_path / "mnist")
    assert main(["write", "webdataset", MNIST_TGZ, out, "--samples-per-shard", "45", "--no-progress"]) == 0
    cli = [sys.executable, "-m", "data_pipelines", "verify", out]
    assert subprocess.run(cli, cwd=REPO_ROOT, capture_output=True).returncode == 0
    path = os.path.join(out, "mnist-000001.tar")
    data = bytearray(open(path, "rb").read())
    data[700] ^= 0xFF
    open(path, "wb").write(bytes(data))
    problems = verify_manifest(out)
    assert problems == ["mnist-000001.tar: sha256 differs from the manifest"]
    result = subprocess.run(cli, cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "sha256 differs" in result.stdout


def test_table_csv_with_paths_and_captions(tmp_path):
    names = sorted(os.listdir(IMAGENET_SAMPLES))[:5]
    rows = ["image,caption,label"] + [f"{os.path.join(IMAGENET_SAMPLES, n)},\"a photo of {n.split('_', 1)[1]}\",{i}"
                                      for i, n in enumerate(names)]
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "table")
    assert main(["write", "table", str(tmp_path / "table.csv"), out, "--label-column", "label", "--no-progress"]) == 0
    written = shard_samples(out)
    assert sorted(written) == [f"{i:09d}" for i in range(5)]
    for i, n in enumerate(names):
        assert written[f"{i:09d}"]["txt"].decode() == f"a photo of {n.split('_', 1)[1]}"
        assert int(written[f"{i:09d}"]["cls"]) == i


def test_table_parquet_needs_pyarrow_or_reads_bytes(tmp_path):
    names = sorted(os.listdir(IMAGENET_SAMPLES))[:3]
    images = [open(os.path.join(IMAGENET_SAMPLES, n), "rb").read() for n in names]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "t.parquet").write_bytes(b"PAR1")
        with pytest.raises(RuntimeError, match="needs pyarrow"):
            main(["write", "table", str(tmp_path / "t.parquet"), str(tmp_path / "out"), "--no-progress"])
        return
    pq.write_table(pa.table({"image": images, "caption": [f"c{i}" for i in range(3)]}), tmp_path / "t.parquet")
    assert main(["write", "table", str(tmp_path / "t.parquet"), str(tmp_path / "out"), "--no-progress"]) == 0
    written = shard_samples(str(tmp_path / "out"))
    assert sorted(p["jpg"] for p in written.values()) == sorted(images)
