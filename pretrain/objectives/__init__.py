"""Training objectives: supervised classification and the multi-objective composition (``objective.kind: multi``,
M3I-style: image-text contrastive, supervised, FCMAE, masked image modelling with an EMA teacher). Each kind owns
the module DeepSpeed trains (:func:`build_model`) and its loss (:func:`build_objective_step`). See
docs/OBJECTIVES.md."""
from pretrain.objectives.m3i import M3IModel
from pretrain.objectives.steps import M3IStep, SupervisedStep, build_model, build_objective_step

__all__ = ['M3IModel', 'M3IStep', 'SupervisedStep', 'build_model', 'build_objective_step']
