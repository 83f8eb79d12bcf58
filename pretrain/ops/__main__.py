"""``python -m pretrain.ops {check,build}``: which DCNv3 backends work here and why not; build them ahead of time."""

from __future__ import annotations

import argparse
import sys

import torch

from pretrain.ops import build


def _check_kernel(kind: str) -> str:
    """Runs a tiny problem through the kernel and compares it with the reference."""
    from pretrain.ops import dcnv3_core, dcnv3_core_pytorch

    device = "cuda" if kind == "cuda" else "cpu"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 8, generator=gen).to(device)
    offset = (torch.randn(2, 6, 5, 2 * 9 * 2, generator=gen) * 2).to(device)
    mask = torch.rand(2, 6, 5, 2 * 9, generator=gen).to(device)
    args = (3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False)
    err = (dcnv3_core(x, offset, mask, *args, backend=kind) - dcnv3_core_pytorch(x, offset, mask, *args)).abs().max()
    return f"matches the reference (max abs error {err.item():.1e})"


def cmd_check(args) -> int:
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
          f"CPU ISA: {build.cpu_isa()}, cache: {build.cache_root()}")
    print("pytorch: available (grid_sample reference)")
    status = 0
    for kind, load in (("cpu", build.load_cpu), ("cuda", build.load_cuda)):
        if kind == "cuda" and not (torch.cuda.is_available() or args.build_cuda):
            print("cuda: not checked (no CUDA device; --build-cuda compiles it anyway)")
            continue
        module = load()
        if module is None:
            print(f"{kind}: UNAVAILABLE - {build.failure(kind)}")
            status = 1
        elif kind == "cuda" and not torch.cuda.is_available():
            print(f"cuda: built ({module.__file__}) for {build.cuda_arch_list()}; no device here to run it")
        else:
            print(f"{kind}: available ({module.__file__}), {_check_kernel(kind)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from pretrain.ops import resolve_backend

    print(f"backend='auto' on {device} tensors runs: {resolve_backend('auto', torch.device(device))}")
    return status


def cmd_build(args) -> int:
    kinds = ["cpu"] + (["cuda"] if args.cuda else [])
    status = 0
    for kind in kinds:
        module = build.load_cpu(force=True) if kind == "cpu" else build.load_cuda(force=True)
        if module is None:
            print(f"{kind}: build FAILED - {build.failure(kind)}", file=sys.stderr)
            status = 1
        else:
            print(f"{kind}: built {module.__file__}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="report which DCNv3 backends are available and why not")
    check.add_argument("--build-cuda", action="store_true", help="also build the CUDA kernel without a device")
    check.set_defaults(func=cmd_check)
    b = sub.add_parser("build", help="compile the extensions into the cache now (the cpu one; --cuda adds CUDA)")
    b.add_argument("--cuda", action="store_true", help="also build the CUDA kernel (needs nvcc; DCNV3_CUDA_ARCH_LIST)")
    b.set_defaults(func=cmd_build)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
