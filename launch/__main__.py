"""``python -m launch COMMAND``: run training stages and cascades on Slurm (Submitit or plain sbatch) or here.

  submit  STAGE.yaml [--local] [--no-snapshot]   one stage: Submitit on Slurm, or --local on this machine
  cascade CASCADE.yaml [--local] [--sbatch]      stages chained with afterok; each starts from its predecessor's weights
  sbatch  CONFIG.yaml [--submit]                 write plain batch scripts (stage or cascade); --submit runs sbatch
  status  RUN [--json] [--wait S] [--plot]       each stage's job, state, step, last checkpoint and why it waits;
                                               --plot: learning_curves.png
  check   CONFIG.yaml                            validate a stage or cascade file, its training configs and the
                                               paths its jobs read

Every config is validated (launch keys and the training config) before anything is submitted; errors name the file
and key. Every local path a job reads (shards, init weights, class index and names, manifests) must exist as the job
sees it (relative to the directory you submit from, where the job runs); a missing one names the stage and key.
A run folder is made under runs_root (default runs/launch): see launch/run.py and docs/LAUNCH.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ['main']


def _load(path: str, want: str):
    from launch.config import load_any, load_cascade, load_stage
    if want == 'stage':
        st = load_stage(path)
        from launch.config import CascadeSpec
        return CascadeSpec(name=st.name, runs_root=st.runs_root, resources=st.resources, stages=[st])
    if want == 'cascade':
        return load_cascade(path)
    return load_any(path)


def _launch(args, kind: str) -> int:
    from launch.run import create_run

    spec = _load(args.config, kind if kind != 'any' else 'any')
    if args.local:
        from launch.local import run_local
        run = create_run(spec, 'local', kind, snapshot=not args.no_snapshot)
        print(f'run folder: {run.root}', flush=True)
        code = run_local(run)
        _print_status(run)
        return code
    mode = 'sbatch' if getattr(args, 'sbatch', False) else 'slurm'
    run = create_run(spec, mode, kind, snapshot=not args.no_snapshot)
    from launch.slurm import submit_sbatch, submit_submitit
    ids = submit_sbatch(run) if mode == 'sbatch' else submit_submitit(run)
    for s, job in zip(run.meta['stages'], ids):
        dep = f' (after {s["dependency"]})' if s['dependency'] else ''
        print(f'stage {s["name"]}: job {job}{dep}')
    print(f'run folder: {run.root}\nwatch: python -m launch status {run.root}')
    return 0


def _print_status(run, as_json: bool = False) -> list[dict]:
    from launch.status import collect, format_table, write_summary
    rows = collect(run)
    write_summary(run, rows)
    print(json.dumps(rows, indent=1) if as_json else format_table(run, rows), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m launch', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    for name, help_ in (('submit', 'one stage (configs/launch/*.yaml)'),
                        ('cascade', 'a cascade (configs/cascade/*.yaml)')):
        p = sub.add_parser(name, help=help_)
        p.add_argument('config')
        p.add_argument('--local', action='store_true', help='run on this machine instead of Slurm (blocks)')
        p.add_argument('--no-snapshot', action='store_true',
                       help="run the repository's live code instead of a copy taken now")
        if name == 'cascade':
            p.add_argument('--sbatch', action='store_true', help='submit plain batch scripts instead of Submitit')
    p = sub.add_parser('sbatch', help='write plain sbatch scripts for a stage or cascade file')
    p.add_argument('config')
    p.add_argument('--submit', action='store_true', help='also submit them (chained with afterok)')
    p.add_argument('--no-snapshot', action='store_true', help="the scripts run the repository's live code")
    p = sub.add_parser('status', help='state of a run folder')
    p.add_argument('run')
    p.add_argument('--json', action='store_true')
    p.add_argument('--wait', type=float, default=0, help='poll until every stage has ended (at most this many s)')
    p.add_argument('--plot', action='store_true',
                   help='also write learning_curves.png (loss parts, lr, eval top-1 against step, per stage) into '
                        'the run folder; RUN may also be one `pretrain train` output folder')
    p = sub.add_parser('check', help='validate a config file, submit nothing')
    p.add_argument('config')
    args = parser.parse_args(argv)

    from launch.config import LaunchConfigError
    try:
        if args.command == 'submit':
            return _launch(args, 'stage')
        if args.command == 'cascade':
            return _launch(args, 'cascade')
        if args.command == 'check':
            from pathlib import Path

            from launch.run import check_job_paths
            spec = _load(args.config, 'any')
            check_job_paths(spec, Path.cwd())  # as submit would: the paths each job reads, from here
            print(f'{args.config}: OK ({len(spec.stages)} stage(s): {", ".join(s.name for s in spec.stages)})')
            return 0
        if args.command == 'sbatch':
            import yaml

            from launch.config import is_cascade
            from launch.run import create_run
            from launch.slurm import sbatch_script, submit_sbatch
            spec = _load(args.config, 'any')
            kind = 'cascade' if is_cascade(yaml.safe_load(open(args.config)) or {}) else 'stage'
            run = create_run(spec, 'sbatch', kind, snapshot=not args.no_snapshot)
            if args.submit:
                for s, job in zip(run.meta['stages'], submit_sbatch(run)):
                    print(f'stage {s["name"]}: job {job}')
            else:
                for i, s in enumerate(run.meta['stages']):
                    path = run.stage_dir(s['name']) / 'job.sbatch'
                    path.write_text(sbatch_script(run, s['name']))
                    prev = run.meta['stages'][i - 1]['name'] if i else None
                    print(f'{path}' + (f'   (sbatch --dependency=afterok:<job of {prev}> ...)' if prev else ''))
            print(f'run folder: {run.root}')
            return 0
        if args.command == 'status':
            from launch.run import open_run
            if args.plot:
                from pathlib import Path

                from launch.status import plot_run
                print(f'plot: {plot_run(args.run)}')
                if (Path(args.run) / 'metrics.jsonl').is_file():  # a single training output folder, not a run
                    return 0
            from launch.status import is_finished
            run = open_run(args.run)
            deadline = time.time() + args.wait
            if args.wait:
                from launch.status import collect
                while not is_finished(collect(run)) and time.time() < deadline:
                    time.sleep(5)
            rows = _print_status(run, args.json)
            return 0 if all(r['state'] == 'COMPLETED' for r in rows) else 1
    except LaunchConfigError as e:
        print(f'config error: {e}', file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 2


if __name__ == '__main__':
    sys.exit(main())
