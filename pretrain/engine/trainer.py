"""The training loop on DeepSpeed, for any objective (pretrain/objectives: supervised classification or M3I).

``Trainer(cfg).train()`` runs a whole stage: resume from the newest complete checkpoint, then
``while step < total: train_step(); log window; evaluator.maybe_eval(); checkpoints.maybe_save()``, where
``train_step`` is ``lr -> micro-batches (objective loss, backward) -> optimizer step -> callbacks (sparsity masks)
-> EMA, teacher``.
Components live in their own files (optim, ema, checkpoint, metrics, data, dist, ds_config, the objective steps);
this file only wires them.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.common import dist as edist
from pretrain.common.ema import EMA
from pretrain.config import TrainConfig, config_to_dict
from pretrain.engine import preemption, watchdog
from pretrain.engine.checkpoint import CheckpointManager, LoaderPosition, RNGStreams, TrainState
from pretrain.engine.cpu_bf16 import products_context, use_fp32_products
from pretrain.engine.data import BatchStream, build_train_loader, build_val_loader, steps_per_epoch
from pretrain.engine.ds_config import build_deepspeed_config
from pretrain.engine.metrics import LossWindow, MetricsLogger, peak_memory_mib
from pretrain.engine.optim import CosineWarmupSchedule, build_param_groups, describe_groups, scaled_lr
from pretrain.engine.run_lock import acquire_run_lock, describe_holder
from pretrain.models.factory import uses_grad_checkpointing
from pretrain.objectives import build_model, build_objective_step
from pretrain.ops.modules import align_convolutions

__all__ = ['Trainer', 'Evaluator', 'NonFiniteError', 'StepResult', 'build_model', 'total_steps_of']


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class StepResult:
    """What one optimizer step did. The losses stay device tensors, read on the host only when logged."""
    loss_mean: torch.Tensor  # this rank's mean over the step's (finite) micro-batches
    part_means: dict[str, torch.Tensor]  # the objective's loss parts, the same mean
    grad_norm: torch.Tensor | float | None  # DeepSpeed's global norm (inf when the step was skipped), None if unknown
    skipped: bool  # the optimizer did not step (non-finite gradient, or an fp16 loss-scale overflow)

    @property
    def loss(self) -> float:
        """``loss_mean`` on the host (a device sync)."""
        return float(self.loss_mean)

    @property
    def parts(self) -> dict[str, float]:
        """``part_means`` on the host (a device sync)."""
        return {k: float(v) for k, v in self.part_means.items()}


def total_steps_of(cfg: TrainConfig, world_size: int) -> tuple[int, int | None, int]:
    """``(total_steps, steps_per_epoch or None, warmup_steps)`` in optimizer steps."""
    s = cfg.schedule
    spe = None
    if s.epochs is not None or s.warmup_epochs is not None:
        spe = steps_per_epoch(cfg, world_size)
    total = s.total_steps if s.total_steps is not None else max(int(round(s.epochs * spe)), 1)
    warmup = s.warmup_steps if s.warmup_steps is not None else int(round((s.warmup_epochs or 0) * (spe or 0)))
    if warmup >= total and warmup > 0:
        raise ValueError(f'schedule: {warmup} warmup steps >= {total} total steps')
    return total, spe, warmup


class Trainer:
    """Builds the model, DeepSpeed engine, schedule, EMA, loaders, checkpoints and metrics from one config."""

    def __init__(self, cfg: TrainConfig, env: edist.DistEnv | None = None, *, build_data: bool = True):
        self.cfg = cfg
        self.env = edist.init_distributed(env)
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self.device = self.env.device
        self.out_dir = cfg.run.output_dir
        # one run per output folder, before anything in it is read or written (RunLockedError names the holder)
        self.run_lock = acquire_run_lock(self.out_dir, self.rank)
        if self.run_lock is not None and self.run_lock.took_over:
            self.log(f'took the lock of {self.out_dir} over from {describe_holder(self.run_lock.took_over)} '
                     '(the same Slurm job, requeued)')
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        if cfg.deepspeed.precision == 'fp16' and not torch.cuda.is_available():
            raise ValueError('deepspeed.precision: fp16 needs a GPU (DeepSpeed\'s CPU accelerator runs bf16 and fp32)')

        self.global_batch_size = cfg.global_batch_size(self.world_size)
        self.total_steps, self.steps_per_epoch, warmup = total_steps_of(cfg, self.world_size)
        scale = dict(global_batch_size=self.global_batch_size, base_batch_size=cfg.optim.lr_base_batch_size,
                     enabled=cfg.schedule.lr_scale_by_batch)
        self.lr_peak = scaled_lr(cfg.optim.lr_base, **scale)
        self.schedule = CosineWarmupSchedule(lr_peak=self.lr_peak, total_steps=self.total_steps, warmup_steps=warmup,
                                             lr_warmup_init=scaled_lr(cfg.schedule.lr_warmup_init, **scale),
                                             lr_min=scaled_lr(cfg.schedule.lr_min, **scale))

        ck = cfg.checkpoint
        self.ckpt = CheckpointManager(os.path.join(self.out_dir, 'checkpoints'), keep_last=ck.keep_last,
                                      rank=self.rank, world_size=self.world_size, interval_steps=ck.interval_steps,
                                      save_at_end=ck.save_at_end, total_steps=self.total_steps,
                                      config=config_to_dict(cfg), log=self.log)
        resume = cfg.checkpoint.resume
        if resume == 'none' and preemption.restart_count() > 0:
            # 'none' means a fresh start for the job, not for each of its attempts: a requeued job (preemption,
            # watchdog, lost node) goes on from what its own earlier attempt saved.
            resume = 'auto'
            self.log(f'checkpoint.resume=none, but this is restart {preemption.restart_count()} of the job: resuming '
                     'from its newest complete checkpoint (auto)')
        self.resume_plan = self.ckpt.plan_resume(resume, cfg.checkpoint.on_world_size_change)
        if self.resume_plan is not None:
            self.ckpt.prepare_universal(self.resume_plan)

        self.ds_config = build_deepspeed_config(
            cfg, world_size=self.world_size, lr_peak=self.lr_peak,
            load_universal=self.resume_plan is not None and self.resume_plan.mode == 'universal')
        # Same seed on every rank for the weights (ZeRO-3 partitions each rank's own copy), then per-rank streams.
        torch.manual_seed(cfg.run.seed)
        if cfg.deepspeed.zero_init:
            from pretrain.engine.zero_init import build_partitioned
            model = build_partitioned(lambda: build_model(cfg), self.ds_config, rank=self.rank, device=self.device)
        else:
            model = build_model(cfg)
        align_convolutions(model)  # DeepSpeed's flat buffers can hand cuDNN misaligned weights
        if cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.stage3_leaf_blocks:
            if cfg.run.compile:  # inductor fails on the leaf blocks' graphs (docs/ENGINE.md): per-module hooks
                self.log('ZeRO-3 with run.compile: deepspeed.stage3_leaf_blocks is not applied (per-module fetches)')
            else:
                from pretrain.engine.zero_leaf import mark_leaf_blocks
                self.log(f'ZeRO-3: {mark_leaf_blocks(model)} blocks fetch their parameters as one '
                         '(stage3_leaf_blocks)')
        if getattr(model, 'load_report', None) is not None:
            self.log(f'initial weights from {cfg.model.init_from}:\n{model.load_report}')
        groups = build_param_groups(model, weight_decay=cfg.optim.weight_decay, layer_decay=cfg.optim.layer_decay,
                                    dcn_lr_mul=cfg.optim.dcn_lr_mul, no_weight_decay=cfg.optim.no_weight_decay)
        self.log('parameter groups:\n' + describe_groups(groups))
        for g in groups:
            g.pop('param_names')
        import deepspeed

        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                                                 config=self.ds_config, dist_init_required=False)
        if cfg.run.compile:
            # DeepSpeed's compile is the module's own in-place compile (nn.Module.compile): the engine keeps the model
            # object, so state_dict keys, checkpoints and exports carry no '_orig_mod.' (docs/ENGINE.md "Compile").
            self.engine.compile()
            self.log('model compiled (torch.compile, inductor); the first steps and the first evaluation compile')
        self._compile_pending = {'train', 'eval'} if cfg.run.compile else set()
        self.dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[cfg.deepspeed.precision]
        # bf16 on a CPU without bf16 instructions: the products in fp32 (pretrain/engine/cpu_bf16.py)
        self.fp32_products = use_fp32_products(
            cfg.deepspeed.cpu_bf16_products, device=torch.device(self.device), dtype=self.dtype,
            compiled=cfg.run.compile, checkpointing=uses_grad_checkpointing(self.engine.module))
        if self.fp32_products:
            self.log('bf16 on a CPU: linear, convolution and matmul run in fp32 and round to bf16 '
                     '(deepspeed.cpu_bf16_products)')
        self.ema = EMA(self.engine.module, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
        self.objective = build_objective_step(cfg, self.engine, world_size=self.world_size, rank=self.rank,
                                              device=self.device, dtype=self.dtype, total_steps=self.total_steps)
        self.callbacks: list = []  # objects with after_step(trainer), called after every optimizer step
        _seed_rank_streams(cfg.run.seed, self.rank, step=0)

        self.state = TrainState()
        self.train_loader = (build_train_loader(cfg, self.rank, self.world_size, tokenize=self.objective.needs_text)
                             if build_data else None)
        self.val_loader = build_val_loader(cfg, self.rank, self.world_size) if build_data else None
        self.metrics = MetricsLogger(self.out_dir, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard,
                                     progress=cfg.logging.progress)
        self._nonfinite_in_a_row = 0
        self.sparsity = None
        if cfg.sparsity.enabled:  # masks now, unless a resume brings them (SNIP is a whole forward+backward)
            from pretrain.engine.sparsity import DynamicSparsity
            self.sparsity = DynamicSparsity(cfg.sparsity, self, draw=self.resume_plan is None)
            self.callbacks.append(self.sparsity)
        self._register_checkpoint_parts()
        self.resume_report: dict | None = None
        if self.resume_plan is not None:
            self.resume_report = self.ckpt.load(self.resume_plan)
            self.log(f'resumed from {self.resume_plan.step_dir} at step {self.state.step} '
                     f'({self.resume_plan.mode}); not restored: {self.resume_report["not_restored"] or "nothing"}')
            self.metrics.log(self.state.step, {'resume': self.resume_report}, prefix='event')
            if self.sparsity is not None and not self.sparsity.masks:  # a checkpoint saved without sparsity
                self.sparsity.draw(self)

    def _register_checkpoint_parts(self) -> None:
        # Load order: the train state first (the loader and RNG parts read its step and epoch at another world size).
        ckpt = self.ckpt
        ckpt.register_engine(self.engine)
        ckpt.register('train_state', self.state)
        ckpt.register('scheduler', self.schedule)
        if self.train_loader is not None:
            ckpt.register('loader', LoaderPosition(self.train_loader, self.state), scope='per_rank')
        ckpt.register('rng', RNGStreams(lambda: _seed_rank_streams(self.cfg.run.seed, self.rank, self.state.step)),
                      scope='per_rank')
        for name, average in self.averages.items():
            if average is not None:
                ckpt.register(name, average, scope='average')
        if self.sparsity is not None:
            ckpt.register('sparsity', self.sparsity)

    @property
    def last_checkpoint(self) -> str | None:
        """The newest checkpoint folder this run committed or resumed from (None before either)."""
        return self.ckpt.last_committed

    # --------------------------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f'[pretrain] {msg}', flush=True)

    @property
    def averages(self) -> dict:
        """Every weight average the checkpoint holds: the evaluation EMA and the objective's (the MIM teacher)."""
        return {'ema': self.ema, **self.objective.averages}

    def train_step(self, next_micro_batch: Callable[[], dict]) -> StepResult:
        """One optimizer step: ``grad_accum_steps`` finite micro-batches from ``next_micro_batch()`` -> a loader batch
        (``image`` [B,3,H,W], ``label`` [B], ``key``; ``text``, ``has_text`` for image-text objectives;
        ``global_counts`` from :class:`BatchStream`), costed by the objective step. A micro-batch whose loss is not
        finite on any rank is dropped on every rank (no backward) and the next one takes its place; raises
        :class:`NonFiniteError` after ``run.max_nonfinite_in_a_row`` in a row.

        Host syncs: one per micro-batch (the ranks agree the loss is finite before the backward, whose ZeRO
        collectives they must all join); the loss values stay on the device."""
        self.schedule.step_to(self.state.step, self.engine.optimizer.param_groups)
        loss_sum, parts_sum, consumed, finite = None, {}, 0, 0
        while True:
            batch = next_micro_batch()
            watchdog.beat()  # progress for the per-rank hang watchdog (pretrain/engine/watchdog.py)
            consumed += 1
            images = batch['image'].shape[0] * self.world_size
            self.state.samples_seen += images
            self.state.epoch_samples += images
            with products_context(self.fp32_products):
                loss, parts = self.objective.loss(batch, self.state.step, consumed - 1)
            if _on_any_rank(~torch.isfinite(loss.detach())):
                self._count_nonfinite('loss')
                continue
            self.engine.backward(loss)
            finite += 1
            boundary = self.engine.is_gradient_accumulation_boundary()
            own_norm, own_skip = self._plain_optimizer_grad_norm() if boundary else (None, False)
            # DeepSpeed's step() runs the optimizer only at the accumulation boundary; before it, it only counts the
            # micro-batch (the gradients keep accumulating). A non-finite norm found above skips the optimizer.
            with _optimizer_step_skipped(self.engine.optimizer, own_skip):
                self.engine.step()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            for k, v in parts.items():
                parts_sum[k] = parts_sum[k] + v if k in parts_sum else v
            if boundary:
                break
        self._sync_buffers()
        grad_norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
        # DeepSpeed's wrappers set overflow when they skipped the step; the plain optimizer's skip is ours
        skipped = own_skip or bool(getattr(self.engine.optimizer, 'overflow', False))
        if skipped and self.cfg.deepspeed.precision == 'fp16':
            # fp16: DeepSpeed's dynamic loss scaler skipped the step and lowered the scale (it starts high on
            # purpose, so a run begins with several of these). Counted apart; DeepSpeed stops the run itself if the
            # scale reaches its minimum. A non-finite loss is still a non-finite step (above).
            self.state.loss_scale_skips += 1
            self.log(f'step {self.state.step}: fp16 gradient overflow, skipped; loss scale now '
                     f'{self._loss_scale():g}')
        elif skipped:
            self._count_nonfinite('grad_norm')
        else:
            self._nonfinite_in_a_row = 0
        self.state.step += 1
        for cb in self.callbacks:  # before the averages, which must see what the callbacks made of the weights
            cb.after_step(self)     # (the sparsity masks: SLaK updates its EMA after applying them)
        if not skipped:
            if self.ema is not None and self.state.step % self.cfg.ema.every_steps == 0:
                self.ema.update()
            self.objective.after_step(self.state.step)
        return StepResult(loss_sum / finite, {k: v / finite for k, v in parts_sum.items()}, grad_norm, skipped)

    @torch.no_grad()
    def _plain_optimizer_grad_norm(self) -> tuple[torch.Tensor | None, bool]:
        """``(global gradient norm as a 0-d tensor, skip)`` under the plain torch optimizer (ZeRO-0 fp32), at the
        accumulation boundary, before the optimizer step; skip (norm inf) when it is not finite on any rank.
        ``(None, False)`` under DeepSpeed's wrappers (bf16, fp16, ZeRO 1-3): they check the same norm and skip the
        step themselves, setting ``optimizer.overflow``; the plain one would apply a NaN.

        The gradients are already all-reduced here, so every rank sees the same norm; the flag is still reduced so
        that the ranks cannot disagree."""
        if hasattr(self.engine.optimizer, 'overflow'):
            return None, False
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None, False
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if _on_any_rank(~torch.isfinite(norm)):
            return torch.tensor(float('inf')), True
        return norm, False

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        # BatchNorm running stats come from each rank's own micro-batches; average them every step so that every
        # rank evaluates and checkpoints the same buffers (timm's distribute_bn, but always on).
        if self.world_size == 1:
            return
        bufs = [b for b in self.engine.module.buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = torch.cat([b.reshape(-1).float() for b in bufs])
        dist.all_reduce(flat)  # where the buffers live: nccl on the GPU, gloo on the CPU; no host round trip
        flat /= self.world_size
        for b, mean in zip(bufs, flat.split([b.numel() for b in bufs])):
            b.copy_(mean.view_as(b))

    def _loss_scale(self) -> float:
        """The current fp16 loss scale (1.0 in bf16 and fp32)."""
        return float(getattr(self.engine.optimizer, 'loss_scale', None) or 1.0)

    def _count_nonfinite(self, what: str) -> None:
        self.state.nonfinite_total += 1
        self._nonfinite_in_a_row += 1
        self.log(f'step {self.state.step}: non-finite {what}, skipped ({self._nonfinite_in_a_row} in a row)')
        if self._nonfinite_in_a_row >= self.cfg.run.max_nonfinite_in_a_row:
            raise NonFiniteError(
                f'{self._nonfinite_in_a_row} non-finite steps in a row (last: {what}) while computing step '
                f'{self.state.step + 1}; last good checkpoint: {self.last_checkpoint or "none"}')

    # --------------------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run the stage from ``state.step`` to ``total_steps`` (or ``run.stop_after_steps`` more); returns the
        summary (also written to ``summary.json``). Each component owns its decision after a step: the loss window
        when to log, the evaluator when to evaluate, the checkpoint manager when to save. Raises
        :class:`NonFiniteError` and :class:`preemption.Preempted`; the metrics are closed (flushed) on every exit."""
        cfg = self.cfg
        stream = BatchStream(self.train_loader, self.state, counts_of=self.objective.batch_counts)
        window = LossWindow(cfg.logging.interval_steps, self.total_steps, self.state.samples_seen)
        evaluator = Evaluator(self.evaluate, self.metrics, self.log, interval_steps=cfg.run.eval_interval_steps,
                              total_steps=self.total_steps)
        stop_at = self.total_steps
        if cfg.run.stop_after_steps is not None:
            stop_at = min(stop_at, self.state.step + cfg.run.stop_after_steps)
        self.log(f'training {cfg.model.name} for {self.total_steps} steps from step {self.state.step}; '
                 f'{self.world_size} ranks, global batch {self.global_batch_size}, lr peak {self.lr_peak:.3g}, '
                 f'ZeRO-{cfg.deepspeed.zero_stage} {cfg.deepspeed.precision}')
        self.engine.train()
        try:
            while self.state.step < stop_at:
                with self._first_compiled_call('train'):
                    res = self.train_step(stream.next_batch)
                self._stop_if_preempted()
                window.add(res)
                if window.due(self.state.step):
                    self._log_train(self.state.step, res, window)
                # eval before the save: the checkpoint's RNG state then includes whatever the evaluation drew
                evaluator.maybe_eval(self.state.step)
                self.ckpt.maybe_save(self.state.step)
            if self.state.step < self.total_steps:
                self.save()
                self.log(f'stopping after {cfg.run.stop_after_steps} steps in this run (run.stop_after_steps)')
                return {'step': self.state.step, 'samples_seen': self.state.samples_seen, 'stopped_early': True,
                        'last_checkpoint': self.last_checkpoint}
            summary = {'step': self.state.step, 'samples_seen': self.state.samples_seen,
                       'nonfinite_total': self.state.nonfinite_total, 'loss_scale_skips': self.state.loss_scale_skips,
                       'last_checkpoint': self.last_checkpoint, 'eval': evaluator.final(self.state.step),
                       'world_size': self.world_size}
            if self.rank == 0:
                with open(os.path.join(self.out_dir, 'summary.json'), 'w') as f:
                    json.dump(summary, f, indent=1)
            return summary
        finally:
            self.metrics.close()

    def _first_compiled_call(self, mode: str):
        """``watchdog.paused()`` around the first train step or evaluation of a compiled model (compiling can outlast
        run.watchdog_min on a small CPU; the collective timeout still bounds it), else a no-op context."""
        if mode not in self._compile_pending:
            return contextlib.nullcontext()
        self._compile_pending.discard(mode)
        return watchdog.paused()

    def _stop_if_preempted(self) -> None:
        """Collective: when a requeue signal reached any rank, every rank saves and raises ``Preempted``."""
        if preemption.installed() and preemption.agreed():
            self.save()
            raise preemption.Preempted(self.state.step, self.last_checkpoint, preemption.signal_name())

    def save(self) -> str:
        """Collective: commit a checkpoint of the current step now; returns its folder."""
        return self.ckpt.save(self.state.step)

    def _log_train(self, step: int, res: StepResult, window: LossWindow) -> None:
        """Collective: one metrics line for the steps of ``window`` (then emptied); ``res`` is the last step's."""
        now = time.time()
        images = self.state.samples_seen - window.samples_seen
        grad_norm = float(res.grad_norm) if res.grad_norm is not None else float('nan')
        values = {
            'loss': window.means(),
            'lr': self.schedule.lr_at(step - 1),
            'grad_norm': grad_norm,
            'images_per_s': images / max(now - window.start_time, 1e-9),
            'samples_seen': self.state.samples_seen,
            'epoch': self.state.epoch,
            'peak_memory_mib': edist.all_reduce_max(peak_memory_mib()),
            'nonfinite_total': self.state.nonfinite_total,
            'data_skips': self._data_skips(),
        }
        if self.cfg.deepspeed.precision == 'fp16':
            values.update(loss_scale=self._loss_scale(), loss_scale_skips=self.state.loss_scale_skips)
        self.metrics.log(step, values)
        self.metrics.progress(step, self.total_steps,
                              f'loss {values["loss"]["total"]:.4f} lr {values["lr"]:.3g} '
                              f'gnorm {grad_norm:.3g} {values["images_per_s"]:.1f} img/s')
        window.reset(self.state.samples_seen)

    def _data_skips(self) -> dict[str, int]:
        mine = self.train_loader.skip_counts() if self.train_loader is not None else {}
        if not dist.is_initialized() or self.world_size == 1:
            return mine
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        total: dict[str, int] = {}
        for counts in everyone:
            for k, v in counts.items():
                total[k] = total.get(k, 0) + v
        return dict(sorted(total.items()))

    # --------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Collective: the objective's metrics (top-1/top-5, zero-shot) of the raw weights and the EMA's, summed over
        every rank's share of the val set ({} without one)."""
        loader = self.val_loader
        if loader is None:
            return {}
        self.engine.eval()
        try:
            with products_context(self.fp32_products):
                with self._first_compiled_call('eval'):
                    out = {'raw': self.objective.evaluate(loader)}
                if self.ema is not None:
                    with self.ema.swapped_in():
                        out['ema'] = self.objective.evaluate(loader)
        finally:
            self.engine.train()
        return out


class Evaluator:
    """Owns when a stage evaluates: every ``interval_steps`` before the last step (:meth:`maybe_eval`; 0 = never),
    and once at the end (:meth:`final`). ``evaluate() -> {...}`` is collective; non-empty results go to the
    metrics as ``eval`` lines."""

    def __init__(self, evaluate: Callable[[], dict], metrics: MetricsLogger, log: Callable[[str], None], *,
                 interval_steps: int | None, total_steps: int):
        self.evaluate, self.metrics, self.log = evaluate, metrics, log
        self.interval_steps, self.total_steps = interval_steps, total_steps

    def maybe_eval(self, step: int) -> dict | None:
        """After optimizer step ``step``: the results when it is an interval step (the last one is :meth:`final`'s)."""
        if not self.interval_steps or step % self.interval_steps or step >= self.total_steps:
            return None
        return self._run(step)

    def final(self, step: int) -> dict:
        """The end-of-stage evaluation ({} without a val set), also printed."""
        result = self._run(step)
        if result:
            self.log(f'eval at step {step}: {result}')
        return result

    def _run(self, step: int) -> dict:
        result = self.evaluate()
        if result:
            self.metrics.log(step, result, prefix='eval')
        return result


def _on_any_rank(flag: torch.Tensor) -> bool:
    """Collective: whether a 0-d bool tensor is true on any rank (reduced where it lives; one host read)."""
    flag = flag.to(torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@contextlib.contextmanager
def _optimizer_step_skipped(optimizer, skip: bool):
    """Within: ``optimizer.step()`` does nothing when ``skip`` (weights, moments and step counts stay as they are);
    DeepSpeed still counts the step and zeroes the gradients."""
    if not skip:
        yield
        return
    optimizer.step = lambda *args, **kwargs: None  # the instance attribute shadows the class's step
    try:
        yield
    finally:
        del optimizer.step


def _seed_rank_streams(seed: int, rank: int, step: int) -> None:
    # Drop path, Mixup draws: a different stream per rank (and per restart point when RNG states are not restored).
    import random

    import numpy as np

    s = (seed * 1_000_003 + rank * 10_007 + step) % 2 ** 31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
