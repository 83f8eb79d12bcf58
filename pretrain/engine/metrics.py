"""Training metrics: JSON lines (``metrics.jsonl``), TensorBoard when installed, a progress line with ETA on rank 0.

Only rank 0 writes; values are plain floats computed by the trainer (already reduced across ranks where needed).
:class:`LossWindow` keeps the losses between two log lines on the device.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

__all__ = ['LossWindow', 'MetricsLogger', 'peak_memory_mib']


def peak_memory_mib() -> float:
    """Peak memory of this process in MiB: CUDA max allocated on GPU, else the peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return '?'
    seconds = int(seconds)
    return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class MetricsLogger:
    """``log(step, {...})`` appends a JSON line and TensorBoard scalars; ``progress(step, total, ...)`` prints a
    progress line with images/s and ETA. Everything is a no-op off rank 0."""

    def __init__(self, output_dir: str, *, enabled: bool, tensorboard: bool = True, progress: bool = True):
        self.enabled, self.show_progress = enabled, progress and enabled
        self.path = os.path.join(output_dir, 'metrics.jsonl')
        self.tb = None
        self._start_time: float | None = None
        self._start_step = 0
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(output_dir, 'tensorboard'))
            except ImportError:  # tensorboard is optional; JSON lines always work
                self.tb = None

    def log(self, step: int, values: dict[str, float | int | str | dict], prefix: str = 'train') -> None:
        if not self.enabled:
            return
        record = {'step': step, 'split': prefix, 'time': time.time(), **values}
        with open(self.path, 'a') as f:
            f.write(json.dumps(record, default=float) + '\n')
        if self.tb is not None:
            for key, v in _flatten(values).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f'{prefix}/{key}', v, step)
            self.tb.flush()

    def progress(self, step: int, total_steps: int, text: str) -> None:
        """``[step/total pct] text  eta H:MM:SS`` on stderr, ETA from the steps done since the first call."""
        if not self.show_progress:
            return
        now = time.time()
        if self._start_time is None:
            self._start_time, self._start_step = now, step
        done = step - self._start_step
        rate = done / (now - self._start_time) if done > 0 and now > self._start_time else float('nan')
        eta = (total_steps - step) / rate if rate and math.isfinite(rate) and rate > 0 else float('nan')
        print(f'[{step}/{total_steps} {100 * step / max(total_steps, 1):5.1f}%] {text}  eta {_fmt_time(eta)}',
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class LossWindow:
    """The loss of the optimizer steps since the last log line, summed as device tensors (no host read per step).
    Owns the logging interval (:meth:`due`); :meth:`means` reads the sums once, averaged over steps and ranks."""

    def __init__(self, interval_steps: int, total_steps: int, samples_seen: int):
        self.interval_steps, self.total_steps = interval_steps, total_steps
        self.reset(samples_seen)

    def reset(self, samples_seen: int) -> None:
        """Empty; the next window's images/s counts from ``samples_seen`` and now."""
        self.loss_sum: torch.Tensor | None = None
        self.part_sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.samples_seen, self.start_time = samples_seen, time.time()

    def add(self, step_result) -> None:
        """One step's ``loss_mean`` and ``part_means`` (device tensors, a trainer StepResult)."""
        loss = step_result.loss_mean.detach().double()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        for k, v in step_result.part_means.items():
            v = v.detach().double()
            self.part_sums[k] = self.part_sums[k] + v if k in self.part_sums else v
        self.steps += 1

    def due(self, step: int) -> bool:
        """Whether to log after optimizer step ``step``: every ``interval_steps``, and at the last step."""
        return step % self.interval_steps == 0 or step == self.total_steps

    def means(self) -> dict[str, float]:
        """Collective: ``{'total': loss, part: ...}`` averaged over this window's steps and every rank (the parts
        are the same on every rank). One all-reduce, one host read."""
        if self.loss_sum is None:
            return {'total': float('nan')}
        names = sorted(self.part_sums)
        sums = torch.stack([self.loss_sum, *(self.part_sums[k] for k in names)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            sums /= dist.get_world_size()
        means = (sums / self.steps).tolist()
        return {'total': means[0], **dict(zip(names, means[1:]))}


def _flatten(values: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}/'))
        else:
            out[f'{prefix}{k}'] = v
    return out
