"""The IDX source (``write idx``): Fashion-MNIST's real files become shards whose pixels and labels equal the IDX
payload, read back with plain tarfile; crafted bad files fail with the file named."""

from __future__ import annotations

import gzip
import io
import os
import re
import struct

import numpy as np
import pytest
from PIL import Image

from data_pipelines.cli import main
from data_pipelines.manifest import read_manifest, verify_manifest
from data_pipelines.writers import list_idx, load_caption_templates, load_class_names, read_idx
from tests.data_helpers import REAL_DATA, REPO_ROOT, read_tar

FASHION = os.path.join(REAL_DATA, "fashion-mnist")
TEST_IMAGES = os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")
TEST_LABELS = os.path.join(FASHION, "t10k-labels-idx1-ubyte.gz")
CLASS_NAMES = os.path.join(REPO_ROOT, "configs", "fashion_mnist", "classnames.txt")
TEMPLATES = os.path.join(REPO_ROOT, "configs", "fashion_mnist", "caption_templates.txt")


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(f">i{len(dims)}i", magic, *dims) + payload


def raw_idx(path: str) -> np.ndarray:
    """The file's values decoded with numpy, independently of read_idx."""
    data = gzip.open(path).read()
    n_dims = data[3]
    dims = np.frombuffer(data[4:4 + 4 * n_dims], dtype=">i4")
    return np.frombuffer(data[4 + 4 * n_dims:], dtype=np.uint8).reshape(dims)


def test_fashion_mnist_test_set_pixels_labels_and_captions_exact(tmp_path):
    out = str(tmp_path / "fm")
    assert main(["write", "idx", TEST_IMAGES, out, "--labels", TEST_LABELS, "--class-names", CLASS_NAMES,
                 "--caption-templates", TEMPLATES, "--samples-per-shard", "4000", "--no-progress"]) == 0
    manifest = read_manifest(out)
    assert [s["samples"] for s in manifest["shards"]] == [4000, 4000, 2000]
    names = load_class_names(CLASS_NAMES)
    assert manifest["class_map"] == {name: i for i, name in enumerate(names)} and len(names) == 10
    assert verify_manifest(out) == []
    samples = {}
    for shard in manifest["shards"]:
        samples.update(read_tar(os.path.join(out, shard["name"])))
    images, labels = raw_idx(TEST_IMAGES), raw_idx(TEST_LABELS)
    assert len(samples) == 10000 == len(labels)
    templates = [line.strip() for line in open(TEMPLATES) if line.strip()]
    used_templates = set()
    for key, parts in samples.items():
        i = int(key)
        assert int(parts["cls"]) == labels[i]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(parts["png"]))), images[i])  # lossless
        caption = parts["txt"].decode()
        matching = [t for t in templates if t.replace("{class}", names[labels[i]]) == caption]
        assert matching, caption
        used_templates.update(matching)
    assert used_templates == set(templates)  # varied, not one template
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10


def test_uncompressed_idx_and_comma_separated_names(tmp_path):
    pixels = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    (tmp_path / "img").write_bytes(idx_bytes(2051, (3, 4, 5), pixels.tobytes()))
    (tmp_path / "lab").write_bytes(idx_bytes(2049, (3,), bytes([1, 0, 1])))
    samples, class_map = list_idx(str(tmp_path / "img"), str(tmp_path / "lab"), load_class_names("cat, dog"))
    assert class_map == {"cat": 0, "dog": 1}
    assert [int(s.parts["cls"].read()) for s in samples] == [1, 0, 1]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(samples[2].parts["png"].read()))), pixels[2])
    assert "txt" not in samples[0].parts


def test_bad_idx_files_fail_naming_the_file(tmp_path):
    images = tmp_path / "images.gz"
    labels = tmp_path / "labels"
    images.write_bytes(gzip.compress(idx_bytes(2051, (5, 2, 2), bytes(20))))
    labels.write_bytes(idx_bytes(2049, (4,), bytes(4)))
    with pytest.raises(ValueError, match=rf"{images} holds 5 images but {labels} holds 4 labels"):
        list_idx(str(images), str(labels), ["a"])
    with pytest.raises(ValueError, match=rf"{labels}: IDX magic number 2049, expected 2051"):
        list_idx(str(labels), str(images), ["a"])  # the two files swapped
    truncated = tmp_path / "truncated"
    truncated.write_bytes(idx_bytes(2051, (5, 2, 2), bytes(19)))
    with pytest.raises(ValueError, match=rf"{truncated}: header says 5 x 2 x 2 = 20 values, the file holds 19"):
        read_idx(str(truncated), 2051)
    labels.write_bytes(idx_bytes(2049, (5,), bytes([0, 1, 2, 0, 0])))
    with pytest.raises(ValueError, match=rf"{labels}: label 2 of sample 2 has no class name \(2 names\)"):
        list_idx(str(images), str(labels), ["a", "b"])
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="--labels and --class-names are required"):
        main(["write", "idx", str(images), str(out), "--no-progress"])


def test_caption_template_files_fail_naming_the_file(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a photo of a {class}\n\n  a {class}, product photo  \n")
    assert load_caption_templates(str(good)) == ["a photo of a {class}", "a {class}, product photo"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {class}\na photo of a thing\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}: 'a photo of a thing' has no {{class}} placeholder")):
        load_caption_templates(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: no templates")):
        load_caption_templates(str(empty))
