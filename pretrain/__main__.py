"""``python -m pretrain COMMAND ...``: the pipeline's command line. Each command lives in its own module with a
``main(argv) -> int``; add new ones to COMMANDS."""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ops": ("pretrain.ops.__main__", "DCNv3 backends: `check` which work here and why not, `build` them ahead of time"),
    "demo": ("pretrain.demo", "run the bundled demo on the real data in ../shared/data/real"),
    "train": ("pretrain.engine.cli", "train a stage: CONFIG.yaml [key.sub=value ...] (torchrun/Slurm aware)"),
    "plan": ("pretrain.engine.plan", "per-GPU memory of a config: CONFIG --world-size N --gpu-mem GB; a cascade "
             "at full scale (time, GPU-hours, checkpoints, preemption): --cascade FILE --gpus N"),
    "export": ("pretrain.export", "weights of a checkpoint as official / timm / safetensors / backbone files"),
    "scale": ("pretrain.scale", "InternImage's compound scaling: model kwargs, params, MACs for --phi F or --params N"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: python -m pretrain COMMAND [ARGS ...]   (python -m pretrain COMMAND --help for its options)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"python -m pretrain: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
