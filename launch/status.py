"""``python -m launch status RUN``: each stage's job, state, step, last checkpoint, and why a stage never started."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from launch.run import Run

__all__ = ['collect', 'format_table', 'TERMINAL', 'is_finished']

TERMINAL = {'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'OUT_OF_MEMORY', 'BOOT_FAIL', 'DEADLINE',
            'PREEMPTED'}


def _read_jsonl(f: Path) -> list[dict]:
    """The records of a JSON-lines file in order ([] when absent)."""
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return out


def _events(stage_dir: Path) -> list[dict]:
    return _read_jsonl(stage_dir / 'events.jsonl')


def _last_step(out_dir: Path) -> int | None:
    f = out_dir / 'metrics.jsonl'
    step = None
    if f.is_file():
        for line in f.read_text().splitlines()[-50:]:
            try:
                step = int(json.loads(line).get('step', step))
            except (json.JSONDecodeError, TypeError, ValueError):
                continue
    return step


def _last_checkpoint(out_dir: Path) -> tuple[int, str] | None:
    """``(step, folder)`` of the newest committed checkpoint, by the engine's own folder names and commit marker."""
    from pretrain.engine.folders import find_complete_checkpoints  # no torch: status stays quick

    found = find_complete_checkpoints(str(out_dir / 'checkpoints'))
    return found[-1] if found else None


def _state_from_events(events: list[dict]) -> str | None:
    ends = [e for e in events if e['event'] == 'end']
    starts = [e for e in events if e['event'] == 'start']
    if ends and (not starts or ends[-1]['time'] >= starts[-1]['time']):
        return {'completed': 'COMPLETED', 'failed': 'FAILED', 'requeued': 'REQUEUED'}.get(ends[-1]['status'],
                                                                                          'UNKNOWN')
    if starts:
        return 'RUNNING'
    return None


def collect(run: Run, query: bool = True) -> list[dict]:
    """One dict per stage: name, job_id, state, reason, step, last_checkpoint, restarts, why (a sentence when the
    stage waits or will never start), logs. ``query=False`` skips Slurm (local runs)."""
    from launch.slurm import query_job

    rows: list[dict] = []
    by_job: dict[str, dict] = {}
    for s in run.meta['stages']:
        sdir = run.stage_dir(s['name'])
        events = _events(sdir)
        job_id = s['job_ids'][-1] if s['job_ids'] else None
        info = query_job(job_id) if (query and job_id and run.meta['mode'] != 'local') else None
        state = info['state'] if info else (_state_from_events(events) or ('NOT SUBMITTED' if not job_id
                                                                              else 'UNKNOWN'))
        ck = _last_checkpoint(sdir / 'out')
        starts = [e for e in events if e['event'] == 'start']
        ends = [e for e in events if e['event'] == 'end']
        row = {'stage': s['name'], 'job_id': job_id, 'state': state,
               'reason': info['reason'] if info else None, 'dependency': info['dependency'] if info else None,
               'exit_code': info['exit_code'] if info else (ends[-1].get('exit_code') if ends else None),
               'restarts': (info['restarts'] if info and info['restarts'] is not None
                            else max([e.get('restart_count', 0) for e in starts], default=0)),
               'starts': len(starts), 'step': _last_step(sdir / 'out'),
               'last_checkpoint': ck[1] if ck else None, 'checkpoint_step': ck[0] if ck else None,
               'error': next((e.get('error') for e in reversed(ends) if e.get('error')), None),
               'logs': str(sdir / 'logs'), 'why': None}
        rows.append(row)
        if job_id:
            by_job[job_id] = row
    for row in rows:
        row['why'] = _why(row, by_job)
    return rows


def _why(row: dict, by_job: dict[str, dict]) -> str | None:
    state, reason = row['state'], row['reason'] or ''
    if state == 'PENDING' or (state == 'CANCELLED' and reason.startswith('Dependency')):
        deps = re.findall(r'(\w+):(\d+)(?:\((\w+)\))?', row['dependency'] or '')
        blockers = []
        for kind, job, dstate in deps:
            pred = by_job.get(job)
            who = f"stage {pred['stage']!r} (job {job})" if pred else f'job {job}'
            pstate = pred['state'] if pred else (dstate or '?')
            blockers.append((kind, who, pstate, pred))
        if reason == 'DependencyNeverSatisfied':
            failed = [b for b in blockers if b[2] not in ('COMPLETED', 'RUNNING', 'PENDING')] or blockers
            parts = []
            for _kind, who, pstate, pred in failed:
                detail = f': {pred["error"]}' if pred and pred.get('error') else ''
                parts.append(f'{who} ended {pstate}{detail} (logs: {pred["logs"] if pred else "?"})')
            return ('will never start: its dependency cannot be satisfied -- ' + '; '.join(parts)
                    + '. Fix the cause and resubmit, or scancel ' + str(row['job_id']))
        if reason == 'Dependency':
            return 'waits for ' + ', '.join(f'{who} to end OK ({kind}); now {pstate}'
                                            for kind, who, pstate, _ in blockers)
        if reason and reason != 'None':
            return f'pending: {reason}'
    if state == 'FAILED' and row['error']:
        return f'failed: {row["error"]}'
    return None


def is_finished(rows: list[dict]) -> bool:
    """Every stage ended, or waits on a dependency that can never be satisfied."""
    return all(r['state'] in TERMINAL or (r['state'] == 'PENDING' and r['reason'] == 'DependencyNeverSatisfied')
               for r in rows)


def format_table(run: Run, rows: list[dict]) -> str:
    lines = [f'run {run.root}  ({run.meta["kind"]}, {run.meta["mode"]}, created '
             f'{time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(run.meta["created"]))})',
             f'{"stage":<16} {"job":<10} {"state":<13} {"step":>7} {"ckpt":>7} {"restarts":>8}  last checkpoint']
    for r in rows:
        lines.append(f'{r["stage"]:<16} {str(r["job_id"] or "-"):<10} {r["state"]:<13} '
                     f'{"-" if r["step"] is None else r["step"]:>7} '
                     f'{"-" if r["checkpoint_step"] is None else r["checkpoint_step"]:>7} {r["restarts"]:>8}  '
                     f'{r["last_checkpoint"] or "-"}')
        if r['why']:
            lines.append(f'{"":<16} why: {r["why"]}')
    return '\n'.join(lines)


def write_summary(run: Run, rows: list[dict]) -> Path:
    f = run.root / 'summary.json'
    f.write_text(json.dumps({'run': str(run.root), 'time': time.time(), 'stages': rows}, indent=1))
    return f


# ---- learning curves (python -m launch status RUN --plot) ----------------------------------------------------------

def read_metrics(out_dir: Path) -> list[dict]:
    """The records of ``out_dir/metrics.jsonl`` in file order ([] when absent); a line being written is skipped."""
    return _read_jsonl(Path(out_dir) / 'metrics.jsonl')


def _flatten(values: dict, prefix: str = '') -> dict[str, float]:
    out: dict[str, float] = {}
    for key, v in values.items():
        name = f'{prefix}{key}'
        if isinstance(v, dict):
            out.update(_flatten(v, name + ' '))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    return out


def learning_curves_figure(stages: list[tuple[str, Path]], *, title: str,
                           references: dict[str, float] | None = None):
    """A matplotlib Figure of a run's learning curves, three panels: loss parts (log scale), learning rate and eval
    top-1 (%) against the step, the stages one after another on a common step axis with their boundaries marked.

    ``stages``: (stage name, its ``pretrain train`` output folder holding ``metrics.jsonl``), in run order.
    ``references``: horizontal lines on the accuracy panel, {label: top-1 in %} (e.g. a published figure)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(15, 4.6), layout='constrained')
    ax_loss, ax_lr, ax_acc = fig.subplots(1, 3, sharex=True)
    offset = 0
    boundaries: list[tuple[int, str]] = []
    for stage, out_dir in stages:
        records = read_metrics(out_dir)
        train = [r for r in records if r.get('split') == 'train' and isinstance(r.get('loss'), dict)]
        evals = [r for r in records if r.get('split') == 'eval']
        if not records:  # not started yet: no boundary on top of the next stage's
            continue
        boundaries.append((offset, stage))
        parts = sorted({k for r in train for k in r['loss']})
        if len(parts) == 2 and 'total' in parts:  # one part: its total is the same curve
            parts.remove('total')
        for part in parts:
            points = [(offset + r['step'], r['loss'][part]) for r in train if part in r['loss']]
            ax_loss.plot(*zip(*points), label=f'{stage}: {part}', lw=1.2 if part == 'total' else 0.9,
                         ls='-' if part == 'total' or len(parts) == 1 else '--')
        if train:
            ax_lr.plot([offset + r['step'] for r in train], [r['lr'] for r in train], label=stage)
        accuracy_keys = sorted({k for r in evals for k in _flatten(r) if k.endswith('top1')})
        for key in accuracy_keys:
            points = [(offset + r['step'], _flatten(r)[key]) for r in evals if key in _flatten(r)]
            xs, ys = zip(*points)
            ax_acc.plot(xs, ys, marker='o', ms=3, label=f'{stage}: {key}')
            ax_acc.annotate(f'{ys[-1]:.1f}', (xs[-1], ys[-1]), textcoords='offset points', xytext=(3, 3), fontsize=8)
        last_step = max([r['step'] for r in records if isinstance(r.get('step'), int)], default=0)
        offset += last_step
    for i, (label, value) in enumerate(sorted((references or {}).items(), key=lambda item: item[1])):
        ax_acc.axhline(value, color='grey', ls=':', lw=1)
        # Alternately below and above the line: published figures are often a few points apart.
        ax_acc.annotate(label, (0.99, value), xycoords=('axes fraction', 'data'), textcoords='offset points',
                        xytext=(0, -9 if i % 2 == 0 else 2), ha='right', fontsize=8, color='grey')
    for ax, ylabel in ((ax_loss, 'training loss (log)'), (ax_lr, 'learning rate'), (ax_acc, 'eval top-1 (%)')):
        for i, (start, stage) in enumerate(boundaries):
            ax.axvline(start, color='black', lw=0.8, alpha=0.5)
            # Stepped down one line per stage: a short stage's label would overlap the next one's.
            ax.annotate(stage, (start, 1), xycoords=('data', 'axes fraction'), xytext=(2, -10 - 10 * i),
                        textcoords='offset points', fontsize=8)
        ax.set_xlabel('optimizer step (stages one after another)')
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc='best')
    ax_loss.set_yscale('log')
    ax_acc.set_ylim(0, 100)
    fig.suptitle(title)
    return fig


def plot_run(run_or_output_dir: str | Path, *, references: dict[str, float] | None = None) -> Path:
    """Plot a launch run folder (every stage, in order) or one ``pretrain train`` output folder (holding
    ``metrics.jsonl``); writes and returns ``<folder>/learning_curves.png``."""
    folder = Path(run_or_output_dir)
    if (folder / 'metrics.jsonl').is_file():
        stages = [(folder.name, folder)]
    else:
        from launch.run import open_run
        run = open_run(str(folder))
        stages = [(s['name'], run.stage_dir(s['name']) / 'out') for s in run.meta['stages']]
    if not any(read_metrics(out) for _, out in stages):
        raise FileNotFoundError(f'{folder}: no metrics.jsonl with records (looked in {[str(o) for _, o in stages]})')
    png = folder / 'learning_curves.png'
    learning_curves_figure(stages, title=str(folder), references=references).savefig(png, dpi=110)
    return png
