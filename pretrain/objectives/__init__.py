"""Training objectives: supervised classification and the M3I composition (image-text contrastive, supervised, FCMAE,
masked image modelling with an EMA teacher). See docs/OBJECTIVES.md."""
from pretrain.objectives.m3i import M3IModel
from pretrain.objectives.steps import M3IStep, SupervisedStep, build_objective_step

__all__ = ['M3IModel', 'M3IStep', 'SupervisedStep', 'build_objective_step']
