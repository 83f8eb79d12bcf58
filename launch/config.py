"""Typed launch configs: the resources of a stage, a stage (a training config plus resources) and a cascade.

A stage file (``configs/launch/*.yaml``)::

    name: supervised_tiny                      # default: the file's stem
    train_config: configs/stage/supervised_tiny.yaml
    overrides: [schedule.total_steps=20]       # key.sub=value, as on `python -m pretrain train`'s command line
    runs_root: runs/launch                     # run folders are made under it
    resources: {nodes: 1, tasks_per_node: 2, timeout_min: 30, ...}   # see Resources

A cascade file (``configs/cascade/*.yaml``) has ``name``, ``runs_root``, ``resources`` (defaults for every stage)
and ``stages``: a list of stage entries (``name``, ``train_config``, ``overrides``, ``resources`` merged key by key
over the defaults, ``init_from``: an earlier stage's name, by default the previous stage, ``null`` for none;
``init_weights``: ``raw`` (default) or ``ema``, which of its final weights; ``ema`` needs that stage's EMA on).

Relative paths are relative to the current directory (the repository root, where the commands are run). Every error
is a :class:`LaunchConfigError` naming the file and the dotted key, raised before anything is submitted; the training
config of each stage is loaded and validated too (``pretrain.config.load_config``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pretrain.config import ConfigError, build_dataclass, read_yaml

__all__ = ['LaunchConfigError', 'Resources', 'StageSpec', 'CascadeSpec', 'load_stage', 'load_cascade',
           'load_any', 'RESERVED_SBATCH_KEYS', 'PREVIOUS']

PREVIOUS = '<previous>'  # init_from default in a cascade: the stage before
# sbatch options that the typed keys (or launch itself) set; extra sbatch_args may not set them a second time.
RESERVED_SBATCH_KEYS = {
    'nodes': 'nodes', 'N': 'nodes', 'ntasks-per-node': 'tasks_per_node', 'ntasks': 'tasks_per_node',
    'n': 'tasks_per_node', 'cpus-per-task': 'cpus_per_task', 'c': 'cpus_per_task', 'gpus-per-node': 'gpus_per_node',
    'gres': 'gpus_per_node', 'mem': 'mem_gb', 'time': 'timeout_min', 't': 'timeout_min', 'partition': 'partition',
    'p': 'partition', 'account': 'account', 'A': 'account', 'qos': 'qos', 'q': 'qos', 'constraint': 'constraint',
    'C': 'constraint', 'exclusive': 'exclusive', 'signal': 'signal_delay_s', 'output': '(the run folder)',
    'o': '(the run folder)', 'error': '(the run folder)', 'e': '(the run folder)', 'job-name': 'name',
    'J': 'name', 'dependency': '(the cascade)', 'd': '(the cascade)', 'requeue': 'max_requeues',
    'no-requeue': 'max_requeues', 'open-mode': '(launch: append, so requeued jobs keep their logs)',
}
SIGNALS = ('USR2', 'TERM', 'INT')  # USR1 is left out on purpose: NCCL installs its own USR1 handler


class LaunchConfigError(ConfigError):
    """A launch config value that cannot work; the message names the file and the dotted key."""


@dataclass
class Resources:
    """What one stage asks Slurm for. Memory is per node, time in minutes."""
    nodes: int = 1
    tasks_per_node: int = 1  # ranks per node: one per GPU on GPU nodes
    gpus_per_node: int = 0
    cpus_per_task: int = 1  # data-loader workers + 1 is a good start
    mem_gb: float | None = None  # per node; None: the partition's default
    timeout_min: int = 60  # the job's time limit; a requeued job gets it again
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    sbatch_args: dict[str, Any] = field(default_factory=dict)  # extra `#SBATCH --key=value` (true: a bare flag)
    max_requeues: int = 3  # preemptions / time limits this stage may be requeued after (SLURM_RESTART_COUNT)
    signal_delay_s: int = 120  # Slurm sends a requeue signal this long before the time limit
    requeue_signals: list[str] = field(default_factory=lambda: ['USR2'])  # save-and-requeue on these

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass
class StageSpec:
    name: str = ''
    train_config: str = ''
    overrides: list[str] = field(default_factory=list)
    runs_root: str = 'runs/launch'
    resources: Resources = field(default_factory=Resources)
    init_from: str | None = None  # cascade only: the stage whose final weights initialise this one
    init_weights: Literal['raw', 'ema'] = 'raw'  # cascade only: which of init_from's final weights


@dataclass
class CascadeSpec:
    name: str = ''
    runs_root: str = 'runs/launch'
    resources: Resources = field(default_factory=Resources)  # defaults for every stage
    stages: list[StageSpec] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------------


def _build(cls: type, data: Any, prefix: str, where: str, skip: tuple[str, ...] = ()):
    """``data`` as the dataclass ``cls`` through the training config's reader (one type checker for every config),
    raising LaunchConfigError."""
    try:
        return build_dataclass(cls, data, prefix, where, skip)
    except LaunchConfigError:
        raise
    except ConfigError as e:
        raise LaunchConfigError(str(e)) from None


def validate_resources(r: Resources, where: str, prefix: str = 'resources') -> None:
    def fail(key: str, msg: str):
        raise LaunchConfigError(f'{where}: {prefix}.{key}: {msg}')

    for key in ('nodes', 'tasks_per_node', 'cpus_per_task', 'timeout_min'):
        if getattr(r, key) < 1:
            fail(key, f'must be >= 1, got {getattr(r, key)}')
    if r.gpus_per_node < 0:
        fail('gpus_per_node', f'must be >= 0, got {r.gpus_per_node}')
    if r.gpus_per_node and r.tasks_per_node != r.gpus_per_node:
        fail('tasks_per_node', f'one rank per GPU: set it to gpus_per_node ({r.gpus_per_node}), got '
             f'{r.tasks_per_node}')
    if r.mem_gb is not None and r.mem_gb <= 0:
        fail('mem_gb', f'must be > 0 (or null for the partition default), got {r.mem_gb}')
    if r.max_requeues < 0:
        fail('max_requeues', f'must be >= 0, got {r.max_requeues}')
    if r.signal_delay_s < 0 or r.signal_delay_s >= r.timeout_min * 60:
        fail('signal_delay_s', f'must be in [0, timeout_min * 60 = {r.timeout_min * 60}), got {r.signal_delay_s}')
    for i, s in enumerate(r.requeue_signals):
        if s not in SIGNALS:
            fail(f'requeue_signals[{i}]', f'must be one of {list(SIGNALS)} (USR1 belongs to NCCL), got {s!r}')
    for key, value in r.sbatch_args.items():
        bare = key.lstrip('-')
        if bare in RESERVED_SBATCH_KEYS:
            fail(f'sbatch_args.{key}', f'set by {RESERVED_SBATCH_KEYS[bare]}, not by sbatch_args')
        if value is False or value is None or isinstance(value, (list, dict)):
            fail(f'sbatch_args.{key}', f'must be a string, a number or true (a bare flag), got {value!r}')


def _check_stage(st: StageSpec, where: str, prefix: str, earlier: list[str]):
    def fail(key: str, msg: str):
        raise LaunchConfigError(f'{where}: {prefix}{key}: {msg}')

    if not st.name or not all(c.isalnum() or c in '-_.' for c in st.name):
        fail('name', f'must be a non-empty name of letters, digits, -, _ or ., got {st.name!r}')
    if st.name in earlier:
        fail('name', f'{st.name!r} is used by an earlier stage')
    if not st.train_config:
        fail('train_config', 'is empty (a configs/stage/*.yaml file)')
    if not Path(st.train_config).is_file():
        fail('train_config', f'{st.train_config} does not exist (relative paths are relative to {Path.cwd()})')
    for i, o in enumerate(st.overrides):
        if o.split('=', 1)[0].strip() == 'run.output_dir':
            fail(f'overrides[{i}]', 'run.output_dir is set by launch (<run folder>/stages/<stage>/out)')
    if st.init_from is not None and st.init_from not in earlier:
        fail('init_from', f'{st.init_from!r} is not an earlier stage (earlier: {earlier})')
    if st.init_weights == 'ema' and st.init_from is None:
        fail('init_weights', 'ema weights of which stage? init_from is null')
    validate_resources(st.resources, where, f'{prefix}resources')
    # The training config must load with launch's own overrides too (output_dir, init weights).
    from pretrain.config import ConfigError, load_config
    extra = ['run.output_dir=/nonexistent/out']
    if st.init_from is not None:
        extra.append('model.init_from=/nonexistent/init.pt')
    try:
        return load_config(st.train_config, list(st.overrides) + extra)  # the stage's TrainConfig
    except ConfigError as e:
        raise LaunchConfigError(f'{where}: {prefix}train_config/overrides: {e}') from e


def _read_yaml(path: str | Path) -> dict:
    try:
        return read_yaml(path)
    except ConfigError as e:
        raise LaunchConfigError(str(e)) from None


def is_cascade(raw: dict) -> bool:
    return 'stages' in raw


def load_stage(path: str | Path) -> StageSpec:
    """A stage file -> validated :class:`StageSpec` (``init_from`` is not allowed in a single stage)."""
    where = str(path)
    raw = _read_yaml(path)
    if is_cascade(raw):
        raise LaunchConfigError(f'{where}: stages: this is a cascade file; use `python -m launch cascade`')
    st = _build(StageSpec, raw, '', where, skip=('init_from', 'init_weights'))
    st.name = st.name or Path(path).stem
    _check_stage(st, where, '', [])
    return st


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_cascade(path: str | Path) -> CascadeSpec:
    """A cascade file -> validated :class:`CascadeSpec`; each stage's resources are the defaults merged with its own."""
    where = str(path)
    raw = _read_yaml(path)
    if not is_cascade(raw):
        raise LaunchConfigError(f'{where}: stages: missing (a cascade lists its stages; for one stage use '
                                '`python -m launch submit`)')
    stages_raw = raw.get('stages')
    if not isinstance(stages_raw, list) or not stages_raw:
        raise LaunchConfigError(f'{where}: stages: expected a non-empty list of stages')
    top = _build(CascadeSpec, {k: v for k, v in raw.items() if k != 'stages'}, '', where)
    top.name = top.name or Path(path).stem
    defaults = raw.get('resources') or {}
    train_cfgs: dict = {}  # stage name -> its validated TrainConfig, in stage order
    for i, entry in enumerate(stages_raw):
        prefix = f'stages[{i}].'
        if not isinstance(entry, dict):
            raise LaunchConfigError(f'{where}: stages[{i}]: expected a mapping, got {entry!r}')
        if 'runs_root' in entry:
            raise LaunchConfigError(f'{where}: {prefix}runs_root: set once at the top of a cascade')
        entry = dict(entry)
        if not isinstance(entry.get('resources', {}), dict):
            raise LaunchConfigError(f'{where}: {prefix}resources: expected a mapping')
        entry['resources'] = _merge(defaults, entry.get('resources') or {})
        init_given = 'init_from' in entry
        st = _build(StageSpec, entry, f'stages[{i}]', where)
        if not init_given:
            st.init_from = next(reversed(train_cfgs), None)
        st.runs_root = top.runs_root
        train_cfgs[st.name] = _check_stage(st, where, prefix, list(train_cfgs))
        if st.init_weights == 'ema' and not train_cfgs[st.init_from].ema.enabled:
            raise LaunchConfigError(f'{where}: {prefix}init_weights: ema, but stage {st.init_from!r} trains without '
                                    f'an EMA (ema.enabled is false)')
        top.stages.append(st)
    return top


def load_any(path: str | Path) -> CascadeSpec:
    """A stage or a cascade file as a cascade (one stage for a stage file)."""
    raw = _read_yaml(path)
    if is_cascade(raw):
        return load_cascade(path)
    st = load_stage(path)
    return CascadeSpec(name=st.name, runs_root=st.runs_root, resources=st.resources, stages=[st])


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
