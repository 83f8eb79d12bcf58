"""Model families registered with timm on import: InternImage (``internimage_t`` ... ``internimage_g``), PeLK
(``pelk_t``, ``pelk_s``, ``pelk_b``), RepLKNet (``replknet_31b``, ``replknet_31l``, ``replknet_xl``), SLaK
(``slak_t``, ``slak_s``, ``slak_b``); timm's own ConvNeXt V1/V2 are used as they are. Build any of them with
:func:`create_backbone` (or :func:`backbone_from_config`); initial weights load through
:mod:`pretrain.models.weights`."""
from pretrain.models.factory import (
    backbone_from_config,
    checkpointable_blocks,
    create_backbone,
    output_stride,
    set_grad_checkpointing,
)
from pretrain.models.internimage import MODEL_ARGS as INTERNIMAGE_ARGS
from pretrain.models.internimage import InternImage
from pretrain.models.pelk import MODEL_ARGS as PELK_ARGS
from pretrain.models.pelk import PeLK
from pretrain.models.replknet import MODEL_ARGS as REPLKNET_ARGS
from pretrain.models.replknet import RepLKNet
from pretrain.models.slak import MODEL_ARGS as SLAK_ARGS
from pretrain.models.slak import SLaK
from pretrain.models.weights import LoadReport, convert_state_dict, load_checkpoint, read_class_index

__all__ = [
    'InternImage', 'INTERNIMAGE_ARGS', 'PeLK', 'PELK_ARGS', 'RepLKNet', 'REPLKNET_ARGS', 'SLaK', 'SLAK_ARGS',
    'LoadReport', 'load_checkpoint', 'convert_state_dict',
    'read_class_index',
    'create_backbone', 'backbone_from_config', 'set_grad_checkpointing', 'checkpointable_blocks', 'output_stride',
]
