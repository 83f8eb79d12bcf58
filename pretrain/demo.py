"""The bundled demo (``make demo``): the whole pipeline learns Fashion-MNIST, on this machine, in about 5 minutes.

1. checks the DCNv3 backends (the fused CPU kernel is built on first use);
2. writes the real data in ../shared/data/real into WebDataset shards with our tools (``python -m data_pipelines
   write``) and verifies them: Fashion-MNIST's IDX files (60,000 training images with captions from varied templates,
   10,000 test images), the 32 CC12M image-text pairs and the 200 ImageNet-1K photos;
3. runs the demo cascade ``configs/cascade/demo.yaml`` locally, 2 CPU ranks per stage: M3I-style pretraining
   (image-text contrastive + masked image modelling with an EMA teacher, on captioned Fashion-MNIST and the CC12M
   pairs; zero-shot eval on the test images) -> an ImageNet-22K-style stage on the photos (ZeRO-3) -> supervised
   Fashion-MNIST fine-tuning from the pretrained backbone;
4. exports the last stage's EMA weights in every format (official .pth, timm folder, safetensors, backbone for
   detection/segmentation), loads the timm export with ``timm.create_model`` and classifies the test images with it;
5. plots the learning curves and ends with each stage's accuracy beside its goal and the published figures.

Everything goes under ``runs/`` (shards: ``runs/demo/data``; the cascade's run folder: ``runs/launch/demo-<time>``;
exports: ``<run folder>/export``; plot: ``<run folder>/learning_curves.png``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "real"
DEMO_DATA = Path("runs") / "demo" / "data"  # relative to the repository root: the demo stage configs name it
CASCADE = Path("configs") / "cascade" / "demo.yaml"
FASHION_CONFIGS = Path("configs") / "fashion_mnist"
# Each stage's result line: (stage, eval key path, what it measures, goal in % or None).
GOALS = {"pretrain": (("raw", "zero_shot", "top1"), "zero-shot top-1 on the 10,000 test images", 60.0),
         "finetune_22k": (("ema", "top1"), "top-1 on the 200 photos it was fitted to (no benchmark)", None),
         "finetune": (("ema", "top1"), "top-1 (EMA weights) on the 10,000 test images", 90.0)}
PUBLISHED_SHOWN = ("2 conv + pooling", "ResNet18")  # rows of the data set's published table quoted in the summary


def _say(step: str, text: str) -> None:
    print(f"[demo] {step}: {text}", flush=True)


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"[demo] failed: {' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def fashion_mnist_jobs(real: Path = REAL_DATA, prefix: str = "") -> dict[str, list[str]]:
    """``write idx`` arguments of Fashion-MNIST's training (with template captions) and test shards, by output
    folder name (``{prefix}train``, ``{prefix}test``)."""
    jobs = {}
    for split, stem, per_shard in (("train", "train", 5000), ("test", "t10k", 2500)):
        fashion = real / "fashion-mnist"
        jobs[f"{prefix}{split}"] = [
            "idx", str(fashion / f"{stem}-images-idx3-ubyte.gz"),
            "--labels", str(fashion / f"{stem}-labels-idx1-ubyte.gz"),
            "--class-names", str(REPO / FASHION_CONFIGS / "classnames.txt"),
            "--caption-templates", str(REPO / FASHION_CONFIGS / "caption_templates.txt"),
            "--samples-per-shard", str(per_shard), "--workers", "2"]
    return jobs


def write_verified_shards(jobs: dict[str, list[str]], out: Path) -> dict[str, Path]:
    """Run ``python -m data_pipelines write KIND INPUT out/NAME ARGS...`` for each ``NAME: [KIND, INPUT, ARGS...]``
    whose folder has no manifest yet, then ``verify`` every folder; returns {NAME: folder}."""
    folders = {}
    for name, (kind, src, *options) in jobs.items():
        folder = out / name
        if not (folder / "manifest.json").is_file():
            _run([sys.executable, "-m", "data_pipelines", "write", kind, src, str(folder), *options,
                  "--prefix", "shard", "--no-progress"])
        _run([sys.executable, "-m", "data_pipelines", "verify", str(folder)])
        folders[name] = folder
    return folders


def write_demo_shards(real: Path = REAL_DATA, out: Path = REPO / DEMO_DATA) -> dict[str, Path]:
    """The demo's shards under ``out`` (written once; verified every time): ``cc12m``, ``in1k``,
    ``fashion_mnist/train`` and ``fashion_mnist/test``."""
    jobs = {
        "cc12m": ["webdataset", str(real / "cc12m-train-0000.tar"), "--samples-per-shard", "8",
                  "--require-caption"],
        "in1k": ["imagefolder", str(real / "imagenet-1k-samples"), "--label-from", "filename-prefix",
                 "--class-map", str(real / "imagenet-1k-wnids.txt"), "--samples-per-shard", "25"],
        **fashion_mnist_jobs(real, prefix="fashion_mnist/"),
    }
    return write_verified_shards(jobs, out)


def published_accuracies(readme: Path = REAL_DATA / "fashion-mnist" / "README.md") -> dict[str, float]:
    """The data set's published table from its README: {classifier: test top-1 in %}."""
    table = {}
    for line in readme.read_text().splitlines():
        row = re.fullmatch(r"\|\s*(.+?)\s*\|\s*(0\.\d+)\s*\|", line.strip())
        if row:
            table[row.group(1)] = round(100 * float(row.group(2)), 1)
    if not table:
        raise ValueError(f"{readme}: no '| classifier | accuracy |' rows found")
    return table


def stage_accuracy(summary: dict, key_path: tuple[str, ...]) -> float:
    """A top-1 (%) out of a stage's summary.json eval results, e.g. ('raw', 'zero_shot', 'top1')."""
    value = summary["eval"]
    for key in key_path:
        value = value[key]
    return float(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REAL_DATA, help="the real data folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.data / "fashion-mnist").is_dir() or not (args.data / "cc12m-train-0000.tar").is_file():
        raise SystemExit(f"[demo] real data not found in {args.data} (expected ../shared/data/real beside the repo)")
    t0 = time.time()

    from pretrain.ops import build, resolve_backend

    backend = resolve_backend("auto", torch.device("cpu"))
    _say("1/5 DCNv3", f"backend 'auto' on CPU runs {backend!r}"
         + (f" ({build.failure('cpu')})" if backend == "pytorch" else f" ({build.cpu_extension_name()})"))

    folders = write_demo_shards(args.data)
    _say("2/5 shards", ", ".join(f"{n}: {len(list(f.glob('*.tar')))} verified shards" for n, f in folders.items())
         + f" in {REPO / DEMO_DATA} ({time.time() - t0:.0f} s)")

    import os

    from launch.config import load_cascade
    from launch.local import run_local
    from launch.run import create_run
    from launch.status import collect, format_table, plot_run

    os.chdir(REPO)  # the configs name their data relative to the repository root
    run = create_run(load_cascade(CASCADE), "local", "cascade")
    _say("3/5 cascade", f"{CASCADE}: stages {[s['name'] for s in run.meta['stages']]}, run folder {run.root}")
    code = run_local(run)
    print(format_table(run, collect(run, query=False)), flush=True)
    if code != 0:
        raise SystemExit(f"[demo] the cascade failed (status {code}); each rank's log is under {run.root}/stages/"
                         "<stage>/logs")
    summaries = {s["name"]: json.loads((run.stage_dir(s["name"]) / "out" / "summary.json").read_text())
                 for s in run.meta["stages"]}
    for s in run.meta["stages"]:
        summary = summaries[s["name"]]
        _say("3/5 cascade", f"{s['name']}: {summary['step']} steps, {summary['samples_seen']} samples"
             + (f"; started from {s['init_from']}'s weights" if s.get("init_from") else ""))

    from pretrain.export import export

    last = run.meta["stages"][-1]["name"]
    exported = export(run.stage_dir(last) / "out", "all", run.root / "export", weights="ema")
    for fmt, path in exported.files.items():
        _say("4/5 export", f"{fmt:>11s}: {path}")
    timm_top1 = _classify_with_timm(exported.files["timm"], folders["fashion_mnist/test"])

    published = published_accuracies(args.data / "fashion-mnist" / "README.md")
    shown = {name: value for name, value in published.items() if name.startswith(PUBLISHED_SHOWN)}
    png = plot_run(run.root, references={f"published {name.split(',')[0].split(' (')[0]}": value  # short labels
                                         for name, value in shown.items()})
    _say("5/5 plot", f"learning curves: {png}")
    compare = ", ".join(f"{name} {value:.1f}%" for name, value in shown.items())
    print(f"[demo] done in {time.time() - t0:.0f} s. Fashion-MNIST (10 classes, chance 10%); the data set's published "
          f"table: {compare}", flush=True)
    for stage, (key_path, what, goal) in GOALS.items():
        top1 = stage_accuracy(summaries[stage], key_path)
        print(f"[demo] {stage:<13s} top-1 {top1:5.1f}%  {what}"
              + (f"; goal >= {goal:.0f}%" if goal is not None else ""), flush=True)
    print(f"[demo] {'timm export':<13s} top-1 {timm_top1:5.1f}%  the exported EMA weights reloaded with "
          f"timm.create_model('local-dir:...'), on the 10,000 test images", flush=True)
    print(f"[demo] plot: {png}", flush=True)
    return 0


def _classify_with_timm(timm_folder: Path, shards: Path) -> float:
    """Top-1 (%) of the timm export on every sample of the shards in ``shards`` (its manifest names them)."""
    import timm

    import pretrain.models  # noqa: F401  (registers the InternImage names with timm)

    model = timm.create_model(f"local-dir:{timm_folder}", pretrained=True)
    cfg = model.pretrained_cfg  # the export's data config: the fine-tune's eval size, crop and interpolation
    return classify_shards(model, shards, cfg["input_size"][-1], cfg["crop_pct"], cfg["interpolation"])


def classify_shards(model: torch.nn.Module, shards: Path, size: int, crop_pct: float, interpolation: str) -> float:
    """Top-1 (%) of ``model`` (fp32, this process) on every sample of the shards in ``shards`` (its manifest names
    them), with the eval transform at ``size`` px: resize to ``size / crop_pct``, centre crop, no augmentation."""
    from data_pipelines.loader import SourceSpec, build_loader
    from data_pipelines.manifest import read_manifest
    from data_pipelines.transforms import build_eval_transform
    from pretrain.objectives.steps import classification_eval

    names = [s["name"] for s in read_manifest(str(shards))["shards"]]
    loader = build_loader(SourceSpec(shards.name, "::".join(str(shards / n) for n in names)), batch_size=250,
                          num_workers=0, transform=build_eval_transform(size, crop_pct=crop_pct,
                                                                           interpolation=interpolation))
    with torch.no_grad():
        result = classification_eval(model.eval(), loader, device=torch.device("cpu"), dtype=torch.float32,
                                     img_size=size, num_classes=model.num_classes)
    return result["top1"]


if __name__ == "__main__":
    sys.exit(main())
