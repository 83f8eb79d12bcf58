"""ONNX export of a classifier (``python -m pretrain export CKPT --format onnx --out model.onnx``), two ways:

* portable (default): every DCNv3 runs as the grid_sample reference, so the graph holds only standard ONNX ops
  (GridSample needs opset >= 16; we write opset 18) and ONNX Runtime runs it anywhere;
* ``custom_op=True`` (``--onnx-custom-op``): each DCNv3 call stays one ``DCNv3`` node in the domain
  :data:`DOMAIN`, with its geometry as attributes, for runtimes with a plugin (contract in docs/EXPORT.md).

Input ``images (B, 3, img_size, img_size)`` float32 NCHW with a dynamic batch ``B``; output ``logits
(B, num_classes)``. Needs the ``onnx`` extra (onnx, onnxruntime, onnxscript).
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ['DOMAIN', 'OnnxCheck', 'export_onnx', 'check_onnx']

DOMAIN = 'pretrain.internimage'  # the custom domain of the DCNv3 node
OPSET = 18
TOLERANCE_REL = 1e-4  # max |onnxruntime - torch| / max |torch|


@dataclass
class OnnxCheck:
    """What :func:`check_onnx` ran: batch sizes, the worst relative error and the DCNv3 node count."""
    batch_sizes: tuple[int, ...]
    max_rel_error: float | None
    dcnv3_nodes: int

    def __str__(self) -> str:
        if self.max_rel_error is None:
            return (f'graph holds {self.dcnv3_nodes} {DOMAIN}::DCNv3 nodes (not run: needs a runtime with the '
                    f'plugin)')
        return (f'onnxruntime (CPU) vs PyTorch on random images at batch {", ".join(map(str, self.batch_sizes))}: '
                f'max relative error {self.max_rel_error:.2e} (limit {TOLERANCE_REL:.0e})')


_INT_ATTRIBUTES = ('kernel_h', 'kernel_w', 'stride_h', 'stride_w', 'pad_h', 'pad_w', 'dilation_h', 'dilation_w',
                   'group', 'group_channels', 'remove_center')


def _dcnv3_schema():
    """The ``DCNv3`` node's ONNX schema (docs/EXPORT.md's contract), registered once with onnx."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has('DCNv3', DOMAIN):
        return onnx.defs.get_schema('DCNv3', 1, DOMAIN)
    param = OpSchema.FormalParameter
    schema = OpSchema(
        'DCNv3', DOMAIN, 1, 'DCNv3 aggregation, NHWC (pretrain/ops/reference.py)',
        inputs=[param('input', 'T'), param('offset', 'T'), param('mask', 'T')], outputs=[param('output', 'T')],
        type_constraints=[('T', ['tensor(float)', 'tensor(float16)', 'tensor(bfloat16)'], 'floating point')],
        attributes=[*(OpSchema.Attribute(a, OpSchema.AttrType.INT, '') for a in _INT_ATTRIBUTES),
                    OpSchema.Attribute('offset_scale', OpSchema.AttrType.FLOAT, '')])
    onnx.defs.register_schema(schema)
    return schema


def _dcnv3_translation():
    """The ONNX translation of ``torch.ops.pretrain.dcnv3_forward``: one ``DCNv3`` node in :data:`DOMAIN`."""
    import onnxscript

    node = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), 'DCNv3', _dcnv3_schema())

    def dcnv3(input, offset, mask, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int,
              pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
              remove_center: bool):
        return node(input, offset, mask, kernel_h=kernel_h, kernel_w=kernel_w, stride_h=stride_h,
                    stride_w=stride_w, pad_h=pad_h, pad_w=pad_w, dilation_h=dilation_h, dilation_w=dilation_w,
                    group=group, group_channels=group_channels, offset_scale=float(offset_scale),
                    remove_center=int(remove_center))

    return {torch.ops.pretrain.dcnv3_forward.default: dcnv3}


@contextlib.contextmanager
def _dcnv3_backend(model: nn.Module, backend: str):
    """Every DCNv3 on ``backend``, and every large depth-wise convolution (PeLK) native, not FFT (the same
    values; ONNX's DFT is not run everywhere), restored on exit."""
    from pretrain.ops import DCNv3

    changed = [(m, 'backend', m.backend) for m in model.modules() if isinstance(m, DCNv3)]
    changed += [(m, 'conv_impl', m.conv_impl) for m in model.modules() if hasattr(m, 'conv_impl')]
    for m, attr, _ in changed:
        setattr(m, attr, backend if attr == 'backend' else 'native')
    try:
        yield
    finally:
        for m, attr, value in changed:
            setattr(m, attr, value)


def export_onnx(model: nn.Module, path: str | os.PathLike, img_size: int, custom_op: bool = False) -> None:
    """Write ``model`` (eval mode is set) to ``path`` as ONNX (module docstring); returns None."""
    model.eval()
    example = torch.randn(2, 3, img_size, img_size)
    extra = {}
    if custom_op:
        extra['custom_translation_table'] = _dcnv3_translation()
    batch = torch.export.Dim('batch', min=1, max=4096)
    with _dcnv3_backend(model, 'cpu' if custom_op else 'pytorch'), torch.no_grad(), \
            contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        torch.onnx.export(model, (example,), os.fspath(path), dynamo=True, opset_version=OPSET,
                          input_names=['images'], output_names=['logits'], dynamic_shapes=({0: batch},),
                          external_data=False, **extra)


def check_onnx(model: nn.Module, path: str | os.PathLike, img_size: int, batch_sizes=(1, 3),
               custom_op: bool = False) -> OnnxCheck:
    """Run the exported file in onnxruntime at ``batch_sizes`` against ``model`` and raise AssertionError above
    :data:`TOLERANCE_REL`; for a custom-op file, count its DCNv3 nodes instead. Returns an :class:`OnnxCheck`."""
    import onnx

    graph = onnx.load(os.fspath(path))
    nodes = sum(n.op_type == 'DCNv3' and n.domain == DOMAIN for n in graph.graph.node)
    if custom_op:
        return OnnxCheck(tuple(batch_sizes), None, nodes)
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=['CPUExecutionProvider'])
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        x = torch.randn(b, 3, img_size, img_size, generator=gen)
        with torch.no_grad(), _dcnv3_backend(model, 'pytorch'):
            want = model.eval()(x)
        got = torch.from_numpy(session.run(['logits'], {'images': x.numpy()})[0])
        rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        worst = max(worst, rel)
        if got.shape != want.shape or rel > TOLERANCE_REL:
            raise AssertionError(f'{path}: onnxruntime disagrees with PyTorch at batch {b}: shape {tuple(got.shape)} '
                                 f'vs {tuple(want.shape)}, relative error {rel:.2e} > {TOLERANCE_REL:.0e}')
    return OnnxCheck(tuple(batch_sizes), worst, nodes)
