"""The bundled demo (``make demo``): the whole pipeline on the real data in ../shared/data/real, on this machine.

1. checks the DCNv3 backends (the fused CPU kernel is built on first use);
2. writes the real data into WebDataset shards with our tools (``python -m data_pipelines write``): the CC12M
   image-text pairs (re-sharded, 4 x 8) and the 200 ImageNet-1K photos (8 x 25, standard class map), and verifies
   them;
3. runs the demo cascade ``configs/cascade/demo.yaml`` locally, 2 CPU ranks per stage: M3I pretraining (image-text
   contrastive + masked image modelling with an EMA teacher, zero-shot ImageNet eval) -> a "22K" fine-tune -> a 1K
   fine-tune at a higher resolution, each stage initialised from its predecessor's weights;
4. exports the last stage's EMA weights in every format (official .pth, timm folder, safetensors, backbone for
   detection/segmentation), loads the timm export with ``timm.create_model`` and classifies the photos with it.

Everything goes under ``runs/`` (shards: ``runs/demo/data``; the cascade's run folder: ``runs/launch/demo-<time>``;
exports: ``<run folder>/export``). About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "real"
DEMO_DATA = Path("runs") / "demo" / "data"  # relative to the repository root: the demo stage configs name it
CASCADE = Path("configs") / "cascade" / "demo.yaml"


def _say(step: str, text: str) -> None:
    print(f"[demo] {step}: {text}", flush=True)


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"[demo] failed: {' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def write_demo_shards(real: Path = REAL_DATA, out: Path = REPO / DEMO_DATA) -> dict[str, Path]:
    """The demo's shards under ``out`` (written once; verified every time): ``cc12m`` and ``in1k``."""
    jobs = {
        "cc12m": ["webdataset", str(real / "cc12m-train-0000.tar"), "--samples-per-shard", "8",
                  "--require-caption"],
        "in1k": ["imagefolder", str(real / "imagenet-1k-samples"), "--label-from", "filename-prefix",
                 "--class-map", str(real / "imagenet-1k-wnids.txt"), "--samples-per-shard", "25"],
    }
    folders = {}
    for name, (kind, src, *options) in jobs.items():
        folder = out / name
        if not (folder / "manifest.json").is_file():
            _run([sys.executable, "-m", "data_pipelines", "write", kind, src, str(folder), *options,
                  "--prefix", "shard", "--no-progress"])
        _run([sys.executable, "-m", "data_pipelines", "verify", str(folder)])
        folders[name] = folder
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REAL_DATA, help="the real data folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.data / "imagenet-1k-samples").is_dir() or not (args.data / "cc12m-train-0000.tar").is_file():
        raise SystemExit(f"[demo] real data not found in {args.data} (expected ../shared/data/real beside the repo)")
    t0 = time.time()

    from pretrain.ops import build, resolve_backend

    backend = resolve_backend("auto", torch.device("cpu"))
    _say("1/4 DCNv3", f"backend 'auto' on CPU runs {backend!r}"
         + (f" ({build.failure('cpu')})" if backend == "pytorch" else f" ({build.cpu_extension_name()})"))

    folders = write_demo_shards(args.data)
    _say("2/4 shards", ", ".join(f"{n}: {len(list(f.glob('*.tar')))} verified shards in {f}"
                                 for n, f in folders.items()))

    import os

    from launch.config import load_cascade
    from launch.local import run_local
    from launch.run import create_run
    from launch.status import collect, format_table

    os.chdir(REPO)  # the configs name their data relative to the repository root
    run = create_run(load_cascade(CASCADE), "local", "cascade")
    _say("3/4 cascade", f"{CASCADE}: stages {[s['name'] for s in run.meta['stages']]}, run folder {run.root}")
    code = run_local(run)
    print(format_table(run, collect(run, query=False)), flush=True)
    if code != 0:
        raise SystemExit(f"[demo] the cascade failed (status {code}); each rank's log is under {run.root}/stages/"
                         "<stage>/logs")

    import json

    for s in run.meta["stages"]:
        summary = json.loads((run.stage_dir(s["name"]) / "out" / "summary.json").read_text())
        ev = {k: {m: round(v["top1"], 1) for m, v in part.items()} if "top1" not in part else round(part["top1"], 1)
              for k, part in summary["eval"].items()}
        _say("3/4 cascade", f"{s['name']}: {summary['step']} steps, {summary['samples_seen']} samples; eval top-1 "
             f"{ev}" + (f"; started from {s['init_from']}'s weights" if s.get("init_from") else ""))

    from pretrain.export import export

    last = run.meta["stages"][-1]["name"]
    exported = export(run.stage_dir(last) / "out", "all", run.root / "export", weights="ema")
    for fmt, path in exported.files.items():
        _say("4/4 export", f"{fmt:>11s}: {path}")
    top1 = _classify_with_timm(exported.files["timm"], folders["in1k"])
    _say("done", f"{time.time() - t0:.0f} s. The timm export, loaded with timm.create_model('local-dir:...', "
         f"pretrained=True), classifies the 200 photos with top-1 {top1:.1f}% (a tiny model after a few steps on "
         f"them). Exported weights: {run.root / 'export'}; status: python -m launch status {run.root}")
    return 0


def _classify_with_timm(timm_folder: Path, in1k: Path) -> float:
    import timm

    import pretrain.models  # noqa: F401  (registers the InternImage names with timm)
    from data_pipelines.loader import SourceSpec, build_loader
    from data_pipelines.transforms import build_eval_transform
    from pretrain.objectives.steps import classification_eval

    model = timm.create_model(f"local-dir:{timm_folder}", pretrained=True).eval()
    size = model.pretrained_cfg.get("input_size", (3, 96, 96))[-1]
    loader = build_loader(SourceSpec("in1k", str(in1k / "shard-{000000..000007}.tar")), batch_size=50,
                          num_workers=0, transform=build_eval_transform(size, crop_pct=1.0))
    with torch.no_grad():
        result = classification_eval(model, loader, device=torch.device("cpu"), dtype=torch.float32, img_size=size,
                                     num_classes=model.num_classes)
    return result["top1"]


if __name__ == "__main__":
    sys.exit(main())
