"""Data-loader worker start cost per epoch: fork vs forkserver vs spawn, and persistent workers.

The trainer builds a new iterator (non-persistent workers) at every epoch. This measures, in one process and one run,
the wall-clock time from ``iter(loader)`` to the first batch (the workers' start: process creation, imports, the
dataset unpickled, the first shard opened and one batch decoded) and the time of a whole pass, for

* ``fork``: the old default, unsafe in a process with threads (the epoch-boundary hang of issue 19);
* ``forkserver``: the default now: workers fork from a clean server that imported the loader once;
* ``spawn``: a fresh interpreter per worker per epoch;
* ``persistent``: forkserver workers kept across epochs (``persistent_workers=True``), not used (docs/DATA.md).

Methods alternate epoch by epoch so that load from other processes hits them alike; medians over epochs (the first
epoch, which starts the forkserver, is reported apart). The main process runs ``--threads`` torch threads plus a few
idle Python threads, as a trainer has. The shards are the real ImageNet photos in ``../shared/data/real``. Usage::

    python benchmarks/loader_start.py [--epochs 8] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from data_pipelines.loader import SourceSpec, WebDatasetLoader, build_loader  # noqa: E402
from data_pipelines.transforms import build_train_transform  # noqa: E402
from data_pipelines.writers import WriteOptions, list_imagefolder, write_shards  # noqa: E402

PHOTOS = os.path.join(REPO_ROOT, "..", "shared", "data", "real", "imagenet-1k-samples")
METHODS = ("fork", "forkserver", "spawn", "persistent")


def write_shards_once(out: str, count: int, per_shard: int) -> str:
    samples, class_map = list_imagefolder(PHOTOS, label_from="filename-prefix")
    write_shards(samples[:count], out, WriteOptions(samples_per_shard=per_shard, resize_max_side_px=128,
                                                    progress=False, prefix="bench"),
                 kind="imagefolder", input_desc="benchmark", class_map=class_map)
    return os.path.join(out, f"bench-{{000000..{(count + per_shard - 1) // per_shard - 1:06d}}}.tar")


def make_loader(method: str, urls: str, workers: int, batch: int) -> WebDatasetLoader:
    loader = build_loader(SourceSpec("in1k", urls), batch_size=batch, num_workers=workers, drop_last=True,
                          transform=build_train_transform(64, auto_augment=None, re_prob=0.0, color_jitter=None),
                          worker_start_method="forkserver" if method == "persistent" else method)
    if method != "persistent":
        return loader
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return WebDatasetLoader(loader.dataset, batch_size=batch, num_workers=workers, persistent_workers=True,
                                drop_last=True, snapshot_every_n_steps=1,
                                multiprocessing_context=loader.multiprocessing_context)


def one_epoch(loader: WebDatasetLoader, epoch: int) -> tuple[float, float]:
    """(seconds to the first batch, seconds for the whole pass)."""
    loader.set_epoch(epoch)
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    for _ in it:
        pass
    return first, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the main process")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    stop = threading.Event()
    idle = [threading.Thread(target=stop.wait, daemon=True) for _ in range(3)]  # a trainer's extra threads
    for t in idle:
        t.start()
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards_once(tmp, count=96, per_shard=8)
        loaders = {m: make_loader(m, urls, args.workers, args.batch) for m in METHODS}
        rows: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
        for epoch in range(args.epochs):
            for m in METHODS:
                rows[m].append(one_epoch(loaders[m], epoch))
        loaders.clear()
    stop.set()
    fork_first = statistics.median(r[0] for r in rows["fork"][1:])
    fork_pass = statistics.median(r[1] for r in rows["fork"][1:])
    result = {
        "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0], "main_process_threads": threading.active_count(),
        "torch_threads": args.threads, "workers": args.workers, "epochs": args.epochs, "batch": args.batch,
        "methods": {m: {"first_epoch_first_batch_s": rows[m][0][0],
                        "first_batch_s": statistics.median(r[0] for r in rows[m][1:]),
                        "pass_s": statistics.median(r[1] for r in rows[m][1:])} for m in METHODS},
    }
    for m in METHODS:
        r = result["methods"][m]
        r["first_batch_vs_fork"] = r["first_batch_s"] / fork_first
        r["pass_vs_fork"] = r["pass_s"] / fork_pass
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"python {result['python']}, torch {result['torch']}, {result['cpus']} CPUs, "
          f"load {result['load_average']:.1f}; main process: {result['main_process_threads']} Python threads, "
          f"{args.threads} torch thread(s); "
          f"{args.workers} workers, batch {args.batch}, 96 samples, {args.epochs} epochs (medians over epochs 2..)")
    print("| start method | 1st epoch: first batch (s) | first batch (s) | vs fork | pass (s) | vs fork |")
    print("|---|---|---|---|---|---|")
    for m in METHODS:
        r = result["methods"][m]
        print(f"| {m} | {r['first_epoch_first_batch_s']:.2f} | {r['first_batch_s']:.3f} | "
              f"{r['first_batch_vs_fork']:.2f}x | {r['pass_s']:.3f} | {r['pass_vs_fork']:.2f}x |")


if __name__ == "__main__":
    main()
