"""Training engine on DeepSpeed, one component per file (see docs/ENGINE.md):

``dist`` (environment from torchrun/Slurm), ``ds_config`` (DeepSpeed JSON from our config), ``optim`` (parameter
groups, lr schedule), ``ema``, ``checkpoint`` (the one owner of checkpoint atomicity), ``metrics``, ``data`` (loaders,
rank-agreed batch stream) and ``trainer`` (the loop).
"""
from pretrain.engine.trainer import NonFiniteError, Trainer

__all__ = ['Trainer', 'NonFiniteError']
