"""``python -m pretrain train CONFIG [key.sub=value ...]``: one training stage from a YAML config.

Launch one process per rank (``torchrun --nproc_per_node N -m pretrain train ...`` or ``srun python -m pretrain
train ...``); the config is validated before any process group, model or data is touched. Every rank then runs
:func:`pretrain.engine.run.run_training`, the same entry as ``python -m launch.worker``: a requeue signal
(``--requeue-signals``, USR2 by default) saves a checkpoint on every rank at the next step boundary and requeues the
Slurm job (exit status 75); the requeued job resumes from that checkpoint. Exit statuses: see
:mod:`pretrain.engine.run`.
"""
from __future__ import annotations

import argparse
import json
import sys

from pretrain.config import config_to_dict, load_config_or_report

__all__ = ['main']


def main(argv: list[str] | None = None) -> int:
    from pretrain.engine.run import DEFAULT_MAX_REQUEUES, EXIT_CONFIG

    parser = argparse.ArgumentParser(prog='python -m pretrain train', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='YAML file (configs/stage/*.yaml)')
    parser.add_argument('overrides', nargs='*', help='key.sub=value (YAML values), applied after the file')
    parser.add_argument('--print-config', action='store_true', help='print the resolved config as JSON and exit')
    parser.add_argument('--requeue-signals', default='USR2',
                        help="comma-separated signals that save a checkpoint at the next step and requeue the Slurm "
                             "job ('' = none; sbatch --signal=USR2@120 sends one before the time limit)")
    parser.add_argument('--max-requeues', type=int, default=DEFAULT_MAX_REQUEUES,
                        help='requeue at most this many times (Slurm: SLURM_RESTART_COUNT)')
    args = parser.parse_intermixed_args(argv)
    cfg = load_config_or_report(args.config, args.overrides)
    if cfg is None:
        return EXIT_CONFIG
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=1))
        return 0
    from pretrain.engine.run import run_training

    return run_training(cfg, requeue_signals=[s for s in args.requeue_signals.split(',') if s],
                        max_requeues=args.max_requeues)


if __name__ == '__main__':
    sys.exit(main())
