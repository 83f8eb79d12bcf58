"""The bundled demo (``make demo``): what the pipeline can do so far, on the real data in ../shared/data/real.

1. checks the DCNv3 backends (the fused CPU kernel is built on first use);
2. writes the 200 real ImageNet-1K photos into WebDataset shards with the standard class map and verifies them;
3. reads a batch back through the resumable loader with the eval transform;
4. runs InternImage-T (official configuration, random init) on it with the fused kernel and with the PyTorch
   reference, and compares logits and time;
5. takes one training step with and without per-block activation checkpointing and compares the gradients.

It grows into the demo cascade (pretrain -> IN-22K -> IN-1K) when the engine and stages land.
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


def _say(step: str, text: str) -> None:
    print(f"[demo] {step}: {text}", flush=True)


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"[demo] failed: {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REAL_DATA, help="the real data folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="output folder (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    samples = args.data / "imagenet-1k-samples"
    if not samples.is_dir():
        raise SystemExit(f"[demo] real data not found: {samples} (expected ../shared/data/real beside the repo)")

    from pretrain.ops import build, resolve_backend

    backend = resolve_backend("auto", torch.device("cpu"))
    _say("1/5 DCNv3", f"backend 'auto' on CPU runs {backend!r}"
         + (f" ({build.failure('cpu')})" if backend == "pytorch" else f" ({build.cpu_extension_name()})"))

    shards = args.out / "shards" / "imagenet-1k-samples"
    _run([sys.executable, "-m", "data_pipelines", "write", "imagefolder", str(samples), str(shards),
          "--label-from", "filename-prefix", "--class-map", str(args.data / "imagenet-1k-wnids.txt"),
          "--samples-per-shard", "50", "--no-progress"])
    _run([sys.executable, "-m", "data_pipelines", "verify", str(shards)])
    tars = sorted(shards.glob("*.tar"))
    _say("2/5 shards", f"wrote and verified {len(tars)} shards in {shards}")

    from data_pipelines.loader import SourceSpec, build_loader
    from data_pipelines.transforms import build_eval_transform

    loader = build_loader(SourceSpec("imagenet-1k-samples", [str(t) for t in tars]), batch_size=args.batch_size,
                          num_workers=0, mode="epoch", transform=build_eval_transform(224, crop_pct=1.0))
    batch = next(iter(loader))
    images, labels = batch["image"], batch["label"]
    _say("3/5 loader", f"batch of {tuple(images.shape)} images, labels {labels.tolist()}")

    from pretrain.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("internimage_t").eval()
    reference = create_backbone("internimage_t", core_op="DCNv3_pytorch").eval()
    reference.load_state_dict(model.state_dict())
    timings = {}
    with torch.no_grad():
        for name, m in (("fused", model), ("reference", reference)):
            m(images[:2])  # warm-up
            start = time.perf_counter()
            logits = m(images)
            timings[name] = (time.perf_counter() - start, logits)
    diff = (timings["fused"][1] - timings["reference"][1]).abs().max().item()
    _say("4/5 InternImage-T", f"{sum(p.numel() for p in model.parameters()):,} parameters; forward of "
         f"{len(images)} images: fused {timings['fused'][0]:.2f} s, reference {timings['reference'][0]:.2f} s "
         f"({timings['reference'][0] / timings['fused'][0]:.1f}x); max logit difference {diff:.1e}")

    model.train()
    grads = {}
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(1)  # the same drop-path draws in both runs
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    rel = ((grads[True] - grads[False]).norm() / grads[False].norm()).item()
    _say("5/5 training step", f"loss {loss.item():.3f}; gradients with per-block checkpointing equal those "
         f"without to {rel:.1e} (relative)")
    print(f"[demo] done. Shards: {shards}. Next: python -m pretrain ops check; the tests: make test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
