"""The run folder: one per ``submit`` / ``cascade`` / ``sbatch`` / local run.

Layout::

    <runs_root>/<name>-<UTC time>/
        run.json                   what was launched: mode, stages, their job ids and dependencies, code folder
        code/                      snapshot of pretrain/ data_pipelines/ launch/ configs/ taken at submission
        stages/<stage>/
            launch.yaml            the stage's resolved launch spec (resources, train config, overrides)
            train_config.yaml      the resolved training config: what every rank of the stage reads (the cascade's
                                   init weights aside), wherever the submitted file sat
            job.sbatch             the batch script (sbatch mode)
            logs/                  each rank's stdout/stderr (Submitit: <job>_<rank>_log.out/.err; sbatch and local:
                                   <job>_<rank>.out/.err), Submitit's pickles
            events.jsonl           start / end events written by rank 0 of every (re)start
            init/                  the predecessor's consolidated weights (cascades)
            out/                   the training output: checkpoints/, metrics.jsonl, summary.json
        summary.json               written by `status`: each stage's state, step and last checkpoint
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from launch.config import CascadeSpec, LaunchConfigError, StageSpec, to_dict

__all__ = ['Run', 'create_run', 'open_run', 'check_job_paths', 'job_paths', 'SNAPSHOT_DIRS', 'REPO_ROOT']

REPO_ROOT = Path(__file__).resolve().parent.parent
# csrc/ is copied too: the DCNv3 build cache is keyed by the sources' content, so a snapshot reuses the extension
# already built from identical sources, and C++ edits after submission never reach a running or requeued job.
SNAPSHOT_DIRS = ('pretrain', 'data_pipelines', 'launch', 'configs', 'csrc')
DCNV3_CSRC = REPO_ROOT / 'csrc' / 'dcnv3'
_IGNORE = shutil.ignore_patterns('__pycache__', '*.pyc', '.pytest_cache', '*.egg-info')


@dataclass
class Run:
    root: Path
    meta: dict

    @property
    def code_dir(self) -> Path:
        return Path(self.meta['code_dir'])

    @property
    def workdir(self) -> Path:
        return Path(self.meta['workdir'])

    def stage_dir(self, name: str) -> Path:
        return self.root / 'stages' / name

    def stage_meta(self, name: str) -> dict:
        for s in self.meta['stages']:
            if s['name'] == name:
                return s
        raise KeyError(name)

    def stage_spec(self, name: str) -> StageSpec:
        from launch.config import Resources, _build
        raw = yaml.safe_load((self.stage_dir(name) / 'launch.yaml').read_text())
        st = _build(StageSpec, {k: v for k, v in raw.items() if k != 'resources'}, '', 'launch.yaml')
        st.resources = _build(Resources, raw['resources'], 'resources', 'launch.yaml')
        return st

    def job_env(self) -> dict[str, str]:
        """Variables every rank of every stage gets (besides PYTHONPATH = the code folder)."""
        return {'DCNV3_CSRC': os.environ.get('DCNV3_CSRC', self.meta.get('dcnv3_csrc', str(DCNV3_CSRC)))}

    def save(self) -> None:
        tmp = self.root / f'run.json.tmp{os.getpid()}'
        tmp.write_text(json.dumps(self.meta, indent=1))
        os.replace(tmp, self.root / 'run.json')

    def worker_argv(self, name: str) -> list[str]:
        """The arguments of ``python -m launch.worker`` for one stage (paths absolute)."""
        st = self.stage_spec(name)
        meta = self.stage_meta(name)
        argv = ['--stage-dir', str(self.stage_dir(name)), '--workdir', str(self.workdir),
                '--max-requeues', str(st.resources.max_requeues),
                '--requeue-signals', ','.join(st.resources.requeue_signals)]
        if meta.get('init_from'):
            argv += ['--init-from', str(self.stage_dir(meta['init_from']) / 'out'),
                     '--init-weights', st.init_weights]
        return argv + [meta['train_config'], *st.overrides]


def _snapshot(dest: Path, source: Path) -> None:
    dest.mkdir(parents=True)
    for d in SNAPSHOT_DIRS:
        if (source / d).is_dir():
            shutil.copytree(source / d, dest / d, ignore=_IGNORE, symlinks=True)


def job_paths(cfg, *, init_from_by_launch: bool = False) -> list[tuple[str, str, str]]:
    """The local paths a training job with config ``cfg`` (a TrainConfig) reads, as ``(dotted key, what, path)``:
    each shard pattern's first and last URL after brace expansion (``::``-joined patterns each), manifests,
    ``model.init_from`` (unless ``init_from_by_launch``: a cascade stage gets its predecessor's weights),
    ``model.head_index``, the zero-shot class names and a ``checkpoint.resume`` folder. URLs the loader fetches
    itself (``pipe:``, ``http(s)://``: ``tario.is_remote``) are left out; any other, ``s3://`` included, is a path
    the loader would open, and checked as one (use ``pipe:aws s3 cp ... -``). ``deepspeed.nvme_path`` is left out
    too (node-local scratch need not exist where one submits). Paths are as written: relative ones are relative to
    the job's working directory."""
    from data_pipelines.tario import expand_urls, is_remote
    from pretrain.config import OPEN_CLIP_IMAGENET

    out: list[tuple[str, str, str]] = []

    def local(key: str, what: str, url: str | None) -> None:
        if url and not is_remote(url):  # http(s):// and pipe: the loader fetches itself; anything else is a path
            out.append((key, what, url[len('file:'):] if url.startswith('file:') else url))

    for part in ('train', 'val'):
        for i, src in enumerate(getattr(cfg.data, part)):
            key = f'data.{part}[{i}]'
            for pattern in src.urls.split('::'):
                urls = expand_urls(pattern)
                if urls:
                    local(f'{key}.urls', 'first shard', urls[0])
                if len(urls) > 1:
                    local(f'{key}.urls', 'last shard', urls[-1])
            local(f'{key}.manifest', 'manifest', src.manifest)
    if not init_from_by_launch:
        local('model.init_from', 'init weights', cfg.model.init_from)
    local('model.head_index', 'head class index', cfg.model.head_index)
    z = cfg.objective.zero_shot
    if z.enabled and z.classnames != OPEN_CLIP_IMAGENET:  # validation: only with the text tower
        local('objective.zero_shot.classnames', 'class names', z.classnames)
    if cfg.checkpoint.resume not in ('auto', 'none'):
        local('checkpoint.resume', 'resume checkpoint', cfg.checkpoint.resume)
    return out


def check_job_paths(spec: CascadeSpec, workdir: str | Path) -> dict:
    """Load every stage's training config and check that each path its job reads (:func:`job_paths`) exists, relative
    paths resolved against ``workdir`` (the job's working directory). Returns ``{stage name: TrainConfig}``; raises
    LaunchConfigError listing every missing path with its stage and key, before anything is made or submitted."""
    from pretrain.config import ConfigError, load_config

    workdir = Path(workdir)
    cfgs, missing = {}, []
    for st in spec.stages:
        try:
            cfgs[st.name] = cfg = load_config(st.train_config, list(st.overrides))
        except ConfigError as e:
            raise LaunchConfigError(f'stage {st.name!r}: {e}') from e
        for key, what, path in job_paths(cfg, init_from_by_launch=st.init_from is not None):
            if not (workdir / path).exists():
                missing.append(f'stage {st.name!r}: {key}: {what} {path} does not exist'
                               + ('' if Path(path).is_absolute() else f' (relative to the job\'s directory {workdir})'))
    if missing:
        raise LaunchConfigError('paths the job would read are missing; nothing was submitted:\n  '
                                + '\n  '.join(missing))
    return cfgs


def create_run(spec: CascadeSpec, mode: str, kind: str, snapshot: bool = True) -> Run:
    """Make the run folder for ``spec`` (stages, resolved configs, code snapshot). ``mode``: slurm / local / sbatch;
    ``kind``: stage / cascade. Without ``snapshot`` the stages run the repository's code as it is at run time.
    Every path a job reads is checked first (:func:`check_job_paths`, LaunchConfigError); each stage's job reads
    the resolved training config written into its stage folder, wherever the submitted file was."""
    from pretrain.config import config_to_dict

    workdir = Path.cwd().resolve()
    cfgs = check_job_paths(spec, workdir)
    runs_root = Path(spec.runs_root).resolve()
    stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
    root = runs_root / f'{spec.name}-{stamp}'
    n = 1
    while root.exists():
        n += 1
        root = runs_root / f'{spec.name}-{stamp}-{n}'
    root.mkdir(parents=True)
    code_dir = root / 'code'
    if snapshot:
        _snapshot(code_dir, REPO_ROOT)
    else:
        code_dir = REPO_ROOT
    stages = []
    for st in spec.stages:
        sdir = root / 'stages' / st.name
        (sdir / 'logs').mkdir(parents=True)
        (sdir / 'launch.yaml').write_text(yaml.safe_dump(to_dict(st), sort_keys=False))
        cfg = cfgs[st.name]
        cfg.run.output_dir = str(sdir / 'out')
        # The job reads this copy, not the submitted file: that may sit where the snapshot does not reach (runs/,
        # experiments/), and later edits must not change a requeued job.
        train_config = sdir / 'train_config.yaml'
        train_config.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        stages.append({'name': st.name, 'init_from': st.init_from, 'train_config': str(train_config),
                       'submitted_config': str(Path(st.train_config).resolve()), 'job_ids': [], 'dependency': None})
    meta = {'name': spec.name, 'kind': kind, 'mode': mode, 'created': time.time(), 'code_dir': str(code_dir),
            'snapshot': snapshot, 'dcnv3_csrc': str(code_dir / 'csrc' / 'dcnv3'), 'workdir': str(workdir),
            'python': sys.executable, 'stages': stages}
    run = Run(root, meta)
    run.save()
    return run


def open_run(path: str | Path) -> Run:
    root = Path(path).resolve()
    f = root / 'run.json'
    if not f.is_file():
        raise FileNotFoundError(f'{root} is not a run folder (no run.json)')
    return Run(root, json.loads(f.read_text()))
