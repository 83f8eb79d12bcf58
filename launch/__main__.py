"""``python -m launch``: submitting stages and cascades to Slurm (Submitit) or running them on this machine.

Not built yet (issue 7): this entry point exists so that the layout is fixed; it says what is missing instead of
pretending. Until then, run stages on one machine with ``torchrun ... -m pretrain train``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print("python -m launch: no launch commands are implemented yet (see issue 7)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
