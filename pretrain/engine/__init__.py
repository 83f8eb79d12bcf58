"""Training engine on DeepSpeed, one component per file (see docs/ENGINE.md):

``dist`` (environment from torchrun/Slurm), ``ds_config`` (DeepSpeed JSON from our config), ``optim`` (parameter
groups, lr schedule), ``checkpoint`` (the one owner of checkpoint atomicity), ``metrics``, ``data`` (loaders,
rank-agreed batch stream) and ``trainer`` (the loop: ``from pretrain.engine.trainer import Trainer``). The weight
average and the cosine ramp live below the engine and the objectives, in :mod:`pretrain.common`.

Nothing is imported here, so that small modules (``preemption``, the checkpoint folder names) import without the
trainer, DeepSpeed or the objectives.
"""
