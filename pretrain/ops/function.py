"""``dcnv3_core``: one DCNv3 operator over three backends ('pytorch' reference, fused 'cpu', 'cuda')."""

from __future__ import annotations

import warnings

import torch

from pretrain.ops import build
from pretrain.ops.reference import dcnv3_core_pytorch, output_size

BACKENDS = ("auto", "pytorch", "cpu", "cuda")
_REDUCED = (torch.float16, torch.bfloat16)
_warned_fallback: set[str] = set()


# DCNv3 as two PyTorch custom operators (torch.library), so torch.compile keeps them in its graphs (forward and
# the compiled backward) and export paths see one named node: ``pretrain::dcnv3_forward`` and
# ``pretrain::dcnv3_backward``. Geometry is passed as scalars; offset/mask come already in their kernel dtype
# (dcnv3_core applies the dtype rules). The CPU kernel is the fused extension, or the reference when it cannot be
# built; the CUDA kernel is the CUDA extension.


def _ext_or_none(device: torch.device):
    return build.load_cuda() if device.type == "cuda" else build.load_cpu()


def _reference_forward(input, offset, mask, *geometry):
    with torch.no_grad():
        return dcnv3_core_pytorch(input, offset.to(input.dtype), mask.to(input.dtype), *geometry)


def _reference_backward(input, offset, mask, *geometry_and_grad):
    *geometry, grad_output = geometry_and_grad
    # torch.func, not torch.autograd: inside an operator's kernel autograd does not record (below its dispatch key)
    out, vjp = torch.func.vjp(lambda i, o, m: dcnv3_core_pytorch(i, o.to(i.dtype), m.to(i.dtype), *geometry),
                              input, offset, mask)
    return tuple(g.to(t.dtype) for g, t in zip(vjp(grad_output.to(out.dtype)), (input, offset, mask)))


@torch.library.custom_op("pretrain::dcnv3_forward", mutates_args=(), device_types="cpu")
def dcnv3_forward(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int,
                  stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
                  group_channels: int, offset_scale: float, remove_center: bool) -> torch.Tensor:
    """The operator behind :func:`dcnv3_core` (arguments as there, checked by the caller): NHWC output, contiguous,
    in ``input``'s dtype."""
    geometry = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
                offset_scale, remove_center)
    ext = _ext_or_none(input.device)
    if ext is None:
        return _reference_forward(input, offset, mask, *geometry).contiguous()
    return ext.forward(input, offset, mask, *geometry)


@torch.library.custom_op("pretrain::dcnv3_backward", mutates_args=(), device_types="cpu")
def dcnv3_backward(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int,
                   stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
                   group_channels: int, offset_scale: float, remove_center: bool,
                   grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_input, grad_offset, grad_mask)`` of :func:`dcnv3_forward`, contiguous, each in its
    tensor's dtype."""
    geometry = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
                offset_scale, remove_center)
    ext = _ext_or_none(input.device)
    if ext is None:
        return tuple(g.contiguous() for g in _reference_backward(input, offset, mask, *geometry, grad_output))
    return tuple(ext.backward(input, offset, mask, *geometry, grad_output))


@dcnv3_forward.register_kernel("cuda")
def _dcnv3_forward_cuda(input, offset, mask, *geometry):
    return build.load_cuda().forward(input, offset, mask, *geometry)


@dcnv3_backward.register_kernel("cuda")
def _dcnv3_backward_cuda(input, offset, mask, *geometry_and_grad):
    return tuple(build.load_cuda().backward(input, offset, mask, *geometry_and_grad))


@dcnv3_forward.register_fake
def _dcnv3_forward_fake(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                        dilation_w, group, group_channels, offset_scale, remove_center):
    n, h, w, c = input.shape
    return input.new_empty((n, output_size(h, kernel_h, stride_h, pad_h, dilation_h),
                            output_size(w, kernel_w, stride_w, pad_w, dilation_w), c))


@dcnv3_backward.register_fake
def _dcnv3_backward_fake(input, offset, mask, *geometry_and_grad):
    return (input.new_empty(input.shape), offset.new_empty(offset.shape), mask.new_empty(mask.shape))


def _setup_context(ctx, inputs, output):
    input, offset, mask, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(input, offset, mask)


def _backward(ctx, grad_output):
    input, offset, mask = ctx.saved_tensors
    grads = dcnv3_backward(input, offset, mask, *ctx.geometry, grad_output.contiguous())
    return (*grads, *([None] * len(ctx.geometry)))


dcnv3_forward.register_autograd(_backward, setup_context=_setup_context)


def _fallback_warning(kind: str, reason: str) -> None:
    if kind not in _warned_fallback:
        _warned_fallback.add(kind)
        warnings.warn(f"DCNv3: the fused {kind} kernel is unavailable ({reason}); using the slower PyTorch reference. "
                      "Run `python -m pretrain.ops check` for details.", RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run on ``device``: 'auto' picks cuda for CUDA tensors, the fused cpu kernel for CPU
    tensors when it builds, else the reference (warning once with the reason). Explicit choices never fall back."""
    if backend not in BACKENDS:
        raise ValueError(f"DCNv3 backend must be one of {BACKENDS}, got {backend!r}")
    kind = "cuda" if device.type == "cuda" else "cpu"
    if backend == "pytorch":
        return backend
    if backend != "auto" and backend != kind:
        raise ValueError(f"DCNv3 backend {backend!r} cannot run tensors on {device}")
    if device.type not in ("cpu", "cuda"):
        if backend == "auto":
            return "pytorch"
        raise ValueError(f"DCNv3 backend {backend!r} cannot run tensors on {device}")
    ext = build.load_cuda() if kind == "cuda" else build.load_cpu()
    if ext is not None:
        return kind
    if backend == "auto":
        _fallback_warning(kind, build.failure(kind) or "unknown reason")
        return "pytorch"
    raise RuntimeError(f"DCNv3 {kind} kernel unavailable: {build.failure(kind)}")


# (backend, device type) -> what resolve_backend chose: the extension is built and loaded once per process, so the
# choice cannot change, and looking it up again per call would touch the build cache (a file read under a lock).
_resolved: dict[tuple[str, str], str] = {}


# Dynamo runs this at trace time and bakes the answer into the graph, so resolving (file reads, locks, warnings)
# never breaks a compiled graph; eager calls get the same cached answer.
@torch.compiler.assume_constant_result
def resolved_backend(backend: str, device: torch.device) -> str:
    """:func:`resolve_backend`, computed once per ``(backend, device type)`` and process."""
    key = (backend, device.type)
    if key not in _resolved:
        _resolved[key] = resolve_backend(backend, device)
    return _resolved[key]


def check_arguments(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int,
                    stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
                    group_channels: int, remove_center: bool) -> None:
    """Raises ValueError naming the argument at fault; the same checks for every backend."""
    if min(kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w) < 1 or min(pad_h, pad_w) < 0:
        raise ValueError("DCNv3: kernel, stride and dilation must be positive and padding non-negative")
    if remove_center and (kernel_h % 2 == 0 or kernel_w % 2 == 0):
        raise ValueError(f"DCNv3: remove_center needs an odd kernel, got {kernel_h}x{kernel_w}")
    if input.dim() != 4 or offset.dim() != 4 or mask.dim() != 4:
        raise ValueError(f"DCNv3: input, offset and mask must be NHWC 4-d tensors, got shapes {tuple(input.shape)}, "
                         f"{tuple(offset.shape)}, {tuple(mask.shape)}")
    n, h, w, c = input.shape
    if c != group * group_channels:
        raise ValueError(f"DCNv3: input has {c} channels but group * group_channels = {group} * {group_channels}")
    points = kernel_h * kernel_w - int(remove_center)
    h_out = output_size(h, kernel_h, stride_h, pad_h, dilation_h)
    w_out = output_size(w, kernel_w, stride_w, pad_w, dilation_w)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"DCNv3: empty output for input of shape {tuple(input.shape)}")
    for name, tensor, channels in (("offset", offset, group * points * 2), ("mask", mask, group * points)):
        if tuple(tensor.shape) != (n, h_out, w_out, channels):
            raise ValueError(f"DCNv3: {name} must have shape {(n, h_out, w_out, channels)} for input "
                             f"{tuple(input.shape)}, got {tuple(tensor.shape)}")
        if tensor.device != input.device:
            raise ValueError(f"DCNv3: {name} is on {tensor.device} but input is on {input.device}")


def dcnv3_core(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int,
               stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
               group_channels: int, offset_scale: float, remove_center: bool | int,
               backend: str = "auto") -> torch.Tensor:
    """DCNv3 aggregation with the official semantics (see :mod:`pretrain.ops.reference` for layouts).

    ``input (N, H_in, W_in, G*D)``, ``offset (N, H_out, W_out, G*P*2)``, ``mask (N, H_out, W_out, G*P)`` ->
    ``(N, H_out, W_out, G*D)`` in the input's dtype. Any batch size; non-contiguous tensors are accepted. With a
    float16/bfloat16 input, offset and mask may be float32 (as softmax under autocast returns them) and are then
    kept in float32; otherwise they are cast to the input's dtype. Accumulation is in float32 (float64 for double).
    """
    remove_center = bool(remove_center)
    check_arguments(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                    group, group_channels, remove_center)
    chosen = resolved_backend(backend, input.device)
    if chosen == "pytorch":
        return dcnv3_core_pytorch(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                  dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)
    wide = input.dtype in _REDUCED and torch.float32 in (offset.dtype, mask.dtype)
    side_dtype = torch.float32 if wide else input.dtype
    offset, mask = offset.to(side_dtype), mask.to(side_dtype)
    return dcnv3_forward(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                         dilation_w, group, group_channels, float(offset_scale), remove_center)
