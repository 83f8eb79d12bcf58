"""DCNv3 operator: ``dcnv3_core`` (functional), ``DCNv3`` (module) and the official layout helpers."""

from pretrain.ops.function import BACKENDS, dcnv3_core, resolve_backend
from pretrain.ops.modules import (
    CORE_OPS,
    DCNv3,
    DCNv3_pytorch,
    build_act_layer,
    build_norm_layer,
    to_channels_first,
    to_channels_last,
)
from pretrain.ops.reference import dcnv3_core_pytorch, output_size

__all__ = [
    "BACKENDS", "CORE_OPS", "DCNv3", "DCNv3_pytorch", "build_act_layer", "build_norm_layer", "dcnv3_core",
    "dcnv3_core_pytorch", "output_size", "resolve_backend", "to_channels_first", "to_channels_last",
]
