"""Decode + RandomResizedCrop(224) + horizontal flip + normalise: images per second per worker core.

Compares, in the same run and the same process (one thread, as one data-loader worker), on the real CC12M JPEGs
in ``../shared/data/real/cc12m-train-0000.tar``:

* ``baseline``: Pillow decode of the full image -> RGB, then torchvision RandomResizedCrop(224, bilinear) ->
  RandomHorizontalFlip -> ToTensor -> Normalize (the plain "decode, then crop" pipeline);
* ``ours``: ``data_pipelines.transforms.build_train_transform(224, color_jitter=None).from_encoded`` (crop box
  sampled from the JPEG header, simplejpeg decode at the smallest DCT scale that keeps the crop >= 224 px, then an
  antialiased uint8 resize of the crop in torch, flip and one fused normalise), plus the loader's pixel-limit
  header check.

``--fashion-mnist N`` adds rows for the first N Fashion-MNIST training images, 28 x 28 greyscale PNGs as the IDX
writer stores them, cropped to 32 px (the demo's and the convergence benchmark's input): no JPEG header to crop
from, so ``ours`` is Pillow's decode and then the same uint8 tensor route, against the PIL route.

Passes alternate between the two paths so that load from other processes on a shared machine hits both alike; the
median over passes is reported. Usage::

    python benchmarks/data.py [--passes 15] [--upscale 2] [--fashion-mnist 2000] [--json]

``--upscale N`` adds rows for the same photos re-encoded at N times the size (JPEG q=90), i.e. larger sources as
in unresized LAION/ImageNet originals.

``--remote`` measures the whole loader instead (``build_loader``, resampled mode, ``--workers`` worker processes,
the same transform): images/s reading the same shards from local files and from a ThreadingHTTPServer on loopback
(tests/shard_server.py, Range support) in this process, passes alternating, median reported (timed from the first
batch on)::

    python benchmarks/data.py --remote [--workers 2] [--passes 7] [--samples 256]

``--tar`` measures reading the tar shards alone (every member's header and data, nothing decoded), in one process:
Python's ``tarfile`` in stream mode (what ``data_pipelines.tario`` used until 2026-11-27) against
``tario.TarReader``, passes alternating, median reported, on the 10,000 Fashion-MNIST test images written by our
IDX writer into one shard (png, cls, txt, json: four small members per sample) and on the real CC12M shard (jpg, txt,
json)::

    python benchmarks/data.py --tar [--passes 15]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import tarfile
import time

import torch
from PIL import Image, features
from torchvision import transforms as T

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from data_pipelines.decode import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_limit  # noqa: E402
from data_pipelines.loader import SourceSpec, build_loader  # noqa: E402
from data_pipelines.transforms import build_train_transform  # noqa: E402

CC12M_TAR = os.path.join(REPO_ROOT, "..", "shared", "data", "real", "cc12m-train-0000.tar")
FASHION_MNIST = os.path.join(REPO_ROOT, "..", "shared", "data", "real", "fashion-mnist",
                             "train-images-idx3-ubyte.gz")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_jpegs(path: str) -> list[bytes]:
    with tarfile.open(path) as tar:
        return [tar.extractfile(m).read() for m in sorted(tar.getmembers(), key=lambda m: m.name)
                if m.name.endswith(".jpg")]


def upscale(jpegs: list[bytes], factor: int) -> list[bytes]:
    out = []
    for data in jpegs:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        buffer = io.BytesIO()
        img.resize((img.width * factor, img.height * factor), Image.Resampling.BICUBIC).save(buffer, "JPEG",
                                                                                            quality=90)
        out.append(buffer.getvalue())
    return out


def fashion_mnist_pngs(n: int) -> list[bytes]:
    """The first ``n`` Fashion-MNIST training images as our IDX writer stores them (greyscale PNG)."""
    from data_pipelines.writers import IDX_IMAGES_MAGIC, idx_image_png, read_idx

    (_, height, width), pixels = read_idx(FASHION_MNIST, IDX_IMAGES_MAGIC)
    return [idx_image_png(pixels, i, height, width) for i in range(n)]


def baseline_path(size: int = 224):
    transform = T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BILINEAR),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])

    def run(data: bytes) -> torch.Tensor:
        return transform(Image.open(io.BytesIO(data)).convert("RGB"))

    return run


def our_path(size: int = 224):
    transform = build_train_transform(size, color_jitter=None, interpolation="bilinear")

    def run(data: bytes) -> torch.Tensor:
        check_pixel_limit(data, DEFAULT_MAX_IMAGE_PIXELS)
        return transform.from_encoded(data)

    return run


def images_per_second(run, images: list[bytes], size: int = 224) -> float:
    start = time.perf_counter()
    for data in images:
        out = run(data)
    assert out.shape == (3, size, size)
    return len(images) / (time.perf_counter() - start)


def measure(images: list[bytes], passes: int, size: int = 224) -> dict[str, float]:
    paths = {"baseline": baseline_path(size), "ours": our_path(size)}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for run in paths.values():  # warm-up
        images_per_second(run, images[:4], size)
    for _ in range(passes):
        for name, run in paths.items():
            rates[name].append(images_per_second(run, images, size))
    return {name: statistics.median(r) for name, r in rates.items()}


def loader_images_per_second(urls: list[str], *, workers: int, samples: int) -> float:
    """One pass of ``samples`` images through the loader -> images/s after the first batch (worker start excluded:
    it is the same for both sources and would hide the reading)."""
    loader = build_loader(SourceSpec("cc12m", urls), batch_size=16, num_workers=workers, mode="resampled", seed=0,
                          samples_per_epoch=samples, transform=build_train_transform(224, color_jitter=None))
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    n_images = sum(len(batch["key"]) for batch in batches)
    return n_images / (time.perf_counter() - start)


def measure_remote(args: argparse.Namespace) -> None:
    """Local files against loopback HTTP, the same shards, passes alternating."""
    import tempfile

    from data_pipelines.writers import WriteOptions, list_webdataset, write_shards
    from tests.shard_server import ShardServer

    with tempfile.TemporaryDirectory() as tmp:
        samples, _ = list_webdataset(CC12M_TAR)
        write_shards(samples, tmp, WriteOptions(samples_per_shard=8, progress=False, prefix="cc12m"),
                     kind="img2dataset", input_desc=CC12M_TAR)
        names = sorted(n for n in os.listdir(tmp) if n.endswith(".tar"))
        with ShardServer(tmp) as server:
            sources = {"local files": [os.path.join(tmp, n) for n in names],
                       "HTTP on loopback": [server.url(n) for n in names]}
            for urls in sources.values():  # warm-up: page cache, forkserver start
                loader_images_per_second(urls, workers=args.workers, samples=32)
            rates: dict[str, list[float]] = {label: [] for label in sources}
            for _ in range(args.passes):
                for label, urls in sources.items():
                    rates[label].append(loader_images_per_second(urls, workers=args.workers, samples=args.samples))
            n_requests = len(server.requests)
    medians = {label: statistics.median(r) for label, r in rates.items()}
    ratio = medians["HTTP on loopback"] / medians["local files"]
    env = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "workers": args.workers, "samples_per_pass": args.samples,
           "passes": args.passes, "http_requests": n_requests, "load_average": os.getloadavg()}
    if args.json:
        print(json.dumps({"env": env, "img_per_s": medians, "http_over_local": ratio}, indent=1))
        return
    print(f"env: {env}")
    print("| shards read from | images/s (median) |")
    print("|---|---|")
    for label, rate in medians.items():
        print(f"| {label} | {rate:.1f} |")
    print(f"HTTP / local: {ratio:.2f}")


def read_tar_with_tarfile(path: str) -> int:
    """The baseline: tarfile's stream mode, as tario read shards before TarReader."""
    n = 0
    with open(path, "rb", buffering=1 << 20) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                tar.extractfile(member).read()
                n += 1
    return n


def read_tar_with_ours(path: str) -> int:
    from data_pipelines.tario import TarReader

    n = 0
    with open(path, "rb", buffering=1 << 20) as f:
        reader = TarReader(f)
        for member in reader:
            if member.is_file:
                reader.read()
                n += 1
    return n


def measure_tar(args: argparse.Namespace) -> None:
    """Members per second read by tarfile and by TarReader, the same shards, passes alternating."""
    import tempfile

    from data_pipelines.writers import WriteOptions, list_idx, load_caption_templates, load_class_names, write_shards

    fashion = os.path.dirname(FASHION_MNIST)
    with tempfile.TemporaryDirectory() as tmp:
        templates = load_caption_templates(os.path.join(REPO_ROOT, "configs", "fashion_mnist", "caption_templates.txt"))
        samples, class_map = list_idx(os.path.join(fashion, "t10k-images-idx3-ubyte.gz"),
                                      os.path.join(fashion, "t10k-labels-idx1-ubyte.gz"),
                                      load_class_names(os.path.join(REPO_ROOT, "configs", "fashion_mnist",
                                                                    "classnames.txt")),
                                      caption_templates=templates)
        write_shards(samples, tmp, WriteOptions(samples_per_shard=len(samples), progress=False, prefix="fm"),
                     kind="idx", input_desc="t10k", class_map=class_map)
        shards = {"Fashion-MNIST test (10,000 samples)": os.path.join(tmp, "fm-000000.tar"),
                  "CC12M (real)": CC12M_TAR}
        readers = {"tarfile": read_tar_with_tarfile, "TarReader": read_tar_with_ours}
        results = {}
        for label, path in shards.items():
            counts = {name: read(path) for name, read in readers.items()}  # warm-up (page cache), and a check
            assert len(set(counts.values())) == 1, counts
            rates: dict[str, list[float]] = {name: [] for name in readers}
            for _ in range(args.passes):
                for name, read in readers.items():
                    start = time.perf_counter()
                    read(path)
                    rates[name].append(counts[name] / (time.perf_counter() - start))
            medians = {name: statistics.median(r) for name, r in rates.items()}
            results[label] = {"members": counts["tarfile"], "bytes": os.path.getsize(path),
                              "tarfile_members_per_s": round(medians["tarfile"]),
                              "ours_members_per_s": round(medians["TarReader"]),
                              "speedup": round(medians["TarReader"] / medians["tarfile"], 2)}
    env = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "passes": args.passes, "load_average": os.getloadavg()}
    if args.json:
        print(json.dumps({"env": env, "results": results}, indent=1))
        return
    print(f"env: {env}")
    print("| shard | members | tarfile (members/s) | TarReader (members/s) | speed-up |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['members']} | {r['tarfile_members_per_s']} | {r['ours_members_per_s']} | "
              f"{r['speedup']}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=15)
    parser.add_argument("--upscale", type=int, default=0, help="also measure photos re-encoded N times larger")
    parser.add_argument("--fashion-mnist", type=int, default=0, metavar="N",
                        help="also measure the first N Fashion-MNIST images (28 px greyscale PNG) cropped to 32 px")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--remote", action="store_true", help="the loader from loopback HTTP against local files")
    parser.add_argument("--workers", type=int, default=2, help="--remote: data-loader worker processes")
    parser.add_argument("--samples", type=int, default=256, help="--remote: images per pass")
    parser.add_argument("--tar", action="store_true", help="reading tar shards alone: tarfile against TarReader")
    args = parser.parse_args()
    if args.tar:
        measure_tar(args)
        return
    if args.remote:
        measure_remote(args)
        return
    torch.set_num_threads(1)  # one data-loader worker = one core
    random.seed(0)
    torch.manual_seed(0)
    sets = {"CC12M (real)": (load_jpegs(CC12M_TAR), 224)}
    if args.upscale > 1:
        sets[f"CC12M x{args.upscale} (re-encoded q=90)"] = (upscale(sets["CC12M (real)"][0], args.upscale), 224)
    if args.fashion_mnist:
        sets["Fashion-MNIST PNG, to 32 px"] = (fashion_mnist_pngs(args.fashion_mnist), 32)
    results = {}
    for label, (images, size) in sets.items():
        sizes = [Image.open(io.BytesIO(d)).size for d in images]
        mean_w = sum(w for w, _ in sizes) / len(sizes)
        mean_h = sum(h for _, h in sizes) / len(sizes)
        rates = measure(images, args.passes, size)
        results[label] = {"images": len(images), "mean_size": f"{mean_w:.0f}x{mean_h:.0f}", "out_size": size,
                          "baseline_img_per_s": round(rates["baseline"], 1), "ours_img_per_s": round(rates["ours"], 1),
                          "speedup": round(rates["ours"] / rates["baseline"], 2)}
    env = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "pillow": Image.__version__,
           "pillow_libjpeg_turbo": features.check_feature("libjpeg_turbo"), "passes": args.passes}
    if args.json:
        print(json.dumps({"env": env, "results": results}, indent=1))
        return
    print(f"env: {env}")
    print("| images | mean size (WxH) | crop to | baseline: PIL decode, then crop (img/s/core) | ours (img/s/core) "
          "| speed-up |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label}, {r['images']} | {r['mean_size']} | {r['out_size']} | {r['baseline_img_per_s']} | "
              f"{r['ours_img_per_s']} | {r['speedup']}x |")


if __name__ == "__main__":
    main()
