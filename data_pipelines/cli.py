"""Command line: ``python -m data_pipelines {write,verify,check} ...`` (see ``--help`` of each subcommand)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from data_pipelines.decode import DEFAULT_MAX_IMAGE_PIXELS
from data_pipelines.tario import DEFAULT_REMOTE, RemoteOptions


def _parse_bytes(text: str) -> int:
    """'512MB', '1GiB', '1000000' -> bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(lowered)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines",
                                     description="Write, verify and check WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("write", help="write shards + manifest.json from a raw source")
    w.add_argument("kind", choices=["imagefolder", "imagenet22k", "img2dataset", "webdataset", "table", "idx"],
                   help="imagefolder: class folders or flat files; imagenet22k: one <wnid>.tar per synset; "
                        "img2dataset/webdataset: existing shards (re-shard, filter, resize); table: CSV/parquet; "
                        "idx: an MNIST-style IDX images file (gzip or not) with --labels and --class-names")
    w.add_argument("input", help="input folder, shard folder / brace pattern, table file, or IDX images file")
    w.add_argument("output", help="output folder for the shards and manifest.json")
    w.add_argument("--samples-per-shard", type=int, default=1000)
    w.add_argument("--shuffle-seed", type=int, default=0,
                   help="seed of the sample order shuffle across shards (default 0); see --no-shuffle")
    w.add_argument("--no-shuffle", action="store_true", help="keep the input order (e.g. an already shuffled source)")
    w.add_argument("--max-shard-bytes", type=_parse_bytes, default=1 << 30, help="e.g. 1GiB, 500MB (default 1GiB)")
    w.add_argument("--resize-max-side", type=int, default=None, metavar="PX",
                   help="re-encode images whose longer side exceeds PX as JPEG of that size")
    w.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEGs (default 95)")
    w.add_argument("--class-map", default=None,
                   help="class ids, one per line (line number = index) or JSON {id: index}")
    w.add_argument("--label-from", choices=["folder", "filename-prefix"], default="folder",
                   help="imagefolder: class id from the parent folder or the file name up to the first '_'")
    w.add_argument("--prefix", default=None, help="shard file name prefix (default: the output folder's name)")
    w.add_argument("--source-name", default=None, help="source name in the manifest (default: the prefix)")
    w.add_argument("--min-image-side", type=int, default=None, metavar="PX",
                   help="img2dataset: drop samples whose .json width/height has a shorter side below PX")
    w.add_argument("--require-caption", action="store_true", help="img2dataset/table: drop samples without .txt")
    w.add_argument("--image-column", default="image", help="table: image path or bytes column")
    w.add_argument("--caption-column", default="caption", help="table: caption column")
    w.add_argument("--label-column", default=None, help="table: integer label column")
    w.add_argument("--labels", default=None, help="idx: the IDX labels file matching the images file")
    w.add_argument("--class-names", default=None,
                   help="idx: class names in label order, a file (one per line) or a comma-separated list")
    w.add_argument("--caption-templates", default=None,
                   help="idx: a file of caption templates, one per line, each with {class}: every sample gets a "
                        ".txt caption from one of them (seeded by --shuffle-seed)")
    w.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")

    v = sub.add_parser("verify", help="re-read every shard and compare with manifest.json")
    v.add_argument("output", help="folder with manifest.json")
    v.add_argument("--no-recount", action="store_true", help="check bytes and sha256 only, not sample counts")

    c = sub.add_parser("check", help="decode every sample through the training path and count the skipped ones; "
                                     "exit status 1 when anything (a sample or a whole shard) was skipped")
    c.add_argument("urls", help="shard URLs (brace pattern, '::'-joined; local, http(s):// or pipe:)")
    c.add_argument("--json", action="store_true",
                   help='print {"good": N, "skipped": {reason: count}, "skipped_shards": [{"url", "reason", '
                        '"detail"}]}')
    c.add_argument("--img-size", type=int, default=224)
    c.add_argument("--require-caption", action="store_true", help="count samples without a caption as bad")
    c.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    c.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    defaults = RemoteOptions()
    c.add_argument("--timeout-s", type=float, default=defaults.timeout_s,
                   help=f"http(s)/pipe: wait for the next bytes (default {defaults.timeout_s})")
    c.add_argument("--retries", type=int, default=defaults.retries,
                   help=f"http(s): reconnections in a row without new bytes (default {defaults.retries})")
    c.add_argument("--backoff-s", type=float, default=defaults.backoff_s,
                   help=f"http(s): first retry wait, doubled each time (default {defaults.backoff_s})")
    return parser


def _write(args: argparse.Namespace) -> int:
    from data_pipelines import writers

    prefix = args.prefix or os.path.basename(os.path.normpath(args.output)) or "shard"
    options = writers.WriteOptions(samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
                                   shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
                                   resize_max_side_px=args.resize_max_side, jpeg_quality=args.jpeg_quality,
                                   num_workers=args.workers, progress=not args.no_progress, prefix=prefix,
                                   source_name=args.source_name or prefix)
    class_map = writers.load_class_map(args.class_map) if args.class_map else None
    dropped = None
    if args.kind == "imagefolder":
        samples, class_map = writers.list_imagefolder(args.input, label_from=args.label_from, class_map=class_map)
    elif args.kind == "imagenet22k":
        samples, class_map = writers.list_imagenet22k(args.input, class_map=class_map)
    elif args.kind in ("img2dataset", "webdataset"):
        samples, dropped = writers.list_webdataset(args.input, min_image_side_px=args.min_image_side,
                                                   require_caption=args.require_caption)
        class_map = None
    elif args.kind == "idx":
        if not args.labels or not args.class_names:
            raise SystemExit("write idx: --labels and --class-names are required")
        templates = writers.load_caption_templates(args.caption_templates) if args.caption_templates else []
        samples, class_map = writers.list_idx(args.input, args.labels, writers.load_class_names(args.class_names),
                                              caption_templates=templates, caption_seed=args.shuffle_seed)
    else:
        samples = writers.list_table(args.input, image_column=args.image_column,
                                     caption_column=args.caption_column, label_column=args.label_column)
        if args.require_caption:
            samples = [s for s in samples if "txt" in s.parts]
    manifest = writers.write_shards(samples, args.output, options, kind=args.kind, input_desc=args.input,
                                    class_map=class_map, listing_dropped=dropped)
    totals = manifest["totals"]
    print(f"wrote {totals['samples']} samples in {totals['shards']} shards ({totals['bytes']} bytes) "
          f"to {args.output}; dropped: {manifest['options']['dropped'] or 'none'}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from data_pipelines.manifest import read_manifest, verify_manifest

    problems = verify_manifest(args.output, recount=not args.no_recount)
    for problem in problems:
        print(problem)
    totals = read_manifest(args.output)["totals"]
    print(f"{'FAILED' if problems else 'OK'}: {totals['shards']} shards, {totals['samples']} samples, "
          f"{len(problems)} problems")
    return 1 if problems else 0


def check_shards(urls: str, *, img_size: int = 224, require_caption: bool = False,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, num_workers: int = 0,
                 remote: RemoteOptions = DEFAULT_REMOTE) -> dict:
    """Decode every sample of ``urls`` through the training path.

    Every shard's tar headers are read first: a shard that cannot be opened or read (missing file, HTTP 404, a
    timeout, a connection lost after the retries) is left out of the decode pass and counted once under its reason;
    a truncated one is decoded up to the break (the loader counts ``truncated_tar``). Returns {"good": N,
    "skipped": {reason: n}, "skipped_shards": [{"url", "reason", "detail"}]} (the shards left out or cut short)."""
    from data_pipelines.errors import TRUNCATED_TAR, SkipCounter
    from data_pipelines.loader import SourceSpec, build_loader
    from data_pipelines.tario import expand_urls, scan_shard
    from data_pipelines.transforms import build_train_transform

    readable: list[str] = []
    skipped_shards: list[dict] = []
    left_out = SkipCounter()  # the shards kept out of the decode pass, counted and logged like the loader's skips
    for url in expand_urls(urls):
        _, problem = scan_shard(url, remote)
        if problem is not None:
            skipped_shards.append({"url": url, "reason": problem.reason, "detail": problem.detail})
        if problem is None or problem.reason == TRUNCATED_TAR:
            readable.append(url)
        else:
            left_out.skip(problem, shard=url, key=None)
    good, skipped = 0, left_out.state_dict()
    if readable:
        loader = build_loader(SourceSpec("check", readable, remote=remote), batch_size=1,
                              num_workers=min(num_workers, len(readable)), mode="epoch",
                              transform=build_train_transform(img_size, max_image_pixels=max_image_pixels),
                              caption_required=require_caption, max_image_pixels=max_image_pixels)
        good = sum(len(batch["key"]) for batch in loader)
        for reason, n in loader.skip_counts().items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {"good": good, "skipped": dict(sorted(skipped.items())), "skipped_shards": skipped_shards}


def _check(args: argparse.Namespace) -> int:
    report = check_shards(args.urls, img_size=args.img_size, require_caption=args.require_caption,
                          max_image_pixels=args.max_image_pixels, num_workers=args.workers,
                          remote=RemoteOptions(args.timeout_s, args.retries, args.backoff_s))
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(f"good: {report['good']}")
        for reason, n in report["skipped"].items():
            print(f"skipped ({reason}): {n}")
        for shard in report["skipped_shards"]:
            print(f"shard {shard['url']}: {shard['reason']}: {shard['detail']}")
    return 1 if report["skipped"] else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (1 when ``verify`` finds problems or ``check`` skipped
    anything)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return {"write": _write, "verify": _verify, "check": _check}[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
