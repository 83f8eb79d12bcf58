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


def _events(stage_dir: Path) -> list[dict]:
    f = stage_dir / 'events.jsonl'
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return out


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
    # pretrain.engine.checkpoint.find_complete_checkpoints without importing torch (status is polled): a step_NNNNNNNN
    # folder with the COMPLETE commit marker.
    root = out_dir / 'checkpoints'
    found = sorted((int(p.name[5:]), str(p)) for p in root.glob('step_*')
                   if re.fullmatch(r'step_\d{8}', p.name) and (p / 'COMPLETE').is_file()) if root.is_dir() else []
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
