"""bf16 matrix products on CPUs without bf16 dot-product instructions: computed in fp32, rounded to bf16.

On an x86 CPU without AVX512-BF16 or AMX, oneDNN and ATen emulate bf16 GEMMs and convolutions by converting
inside the kernel, several times slower than converting the operands once and running the fp32 kernel: a whole
forward + backward of the convergence benchmark's InternImage is 1.49x faster that way, its ConvNeXt 1.95x
(docs/PERFORMANCE.md, "bf16 on a CPU without bf16 instructions"). DeepSpeed's bf16 mode casts the whole module to
bf16, so a CPU run of the bf16 recipe (tests, the convergence benchmark) pays that on every linear and convolution.

:class:`Fp32Products` is a ``TorchFunctionMode`` that runs ``linear``, ``conv1d/2d/3d`` and the matrix products
of bf16 CPU tensors on fp32 copies and casts the result back to bf16. The numbers are those of a bf16 kernel with
fp32 accumulation (which is what bf16 kernels do): bf16 -> fp32 is exact, the products and sums are fp32, the result
is rounded to bf16 once. The casts are in the autograd graph, so the backward runs the fp32 kernels too and hands
bf16 gradients to the bf16 parameters, as DeepSpeed expects. Autograd saves the fp32 copies, so the saved inputs of
the products take twice the memory. Only ops called directly under the mode are converted, and only when every
floating-point operand is a bf16 CPU tensor and there is no ``out=``: a Python function such as
``F.multi_head_attention_forward`` (open_clip's text tower) runs its inner ops as they are, as do
``scaled_dot_product_attention`` and ``einsum``, and the backward of a custom autograd Function (DeepSpeed's ZeRO-3
linear under ``zero_init``).

``deepspeed.cpu_bf16_products`` chooses: ``auto`` (fp32 products when the CPU lacks bf16 instructions),
``fp32`` or ``native``. GPUs are never affected, nor a compiled model, nor one with activation checkpointing (its
recomputation runs in the backward, outside the mode: torch's checkpoint refuses the fp32 tensors the forward saved
against the bf16 ones the recomputation saves).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_PRODUCTS = frozenset({
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul,  # also ``a @ b``
    torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.addmm, torch.Tensor.baddbmm,
})


def _is_cpu_bf16(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and t.device.type == 'cpu'


def _all_cpu_bf16(*operands) -> bool:
    # every floating-point tensor operand is a bf16 CPU tensor (mixed dtypes pass through, and torch refuses them
    # as it would without the mode)
    floats = [t for t in operands if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(floats) and all(_is_cpu_bf16(t) for t in floats)


def _up(t):
    return t.float() if _is_cpu_bf16(t) else t


class Fp32Products(TorchFunctionMode):
    """Within the mode, a product whose floating-point operands are all bf16 CPU tensors (and no ``out=``) runs in
    fp32 and returns bf16; anything else runs as it is. ``fp32_products`` tells code that runs its own backward
    (``pretrain.ops.tapconv``, whose backward runs outside the mode) to compute in fp32 too."""

    fp32_products = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS and 'out' not in kwargs and _all_cpu_bf16(*args, *kwargs.values()):
            out = func(*(_up(a) for a in args), **{k: _up(v) for k, v in kwargs.items()})
            return out.to(torch.bfloat16)
        return func(*args, **kwargs)


@functools.cache
def cpu_has_bf16_instructions(cpuinfo: str = '/proc/cpuinfo') -> bool:
    """True when the CPU advertises AVX512-BF16 or AMX-BF16 (``/proc/cpuinfo`` flags); also True where that file
    cannot be read or has no ``flags`` line (not an x86 Linux): then ``auto`` changes nothing."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    return bool(flags & {'avx512_bf16', 'amx_bf16'})
    except OSError:
        pass
    return True


def use_fp32_products(setting: str, *, device: torch.device, dtype: torch.dtype, compiled: bool = False,
                      checkpointing: bool = False) -> bool:
    """Whether a stage with ``deepspeed.cpu_bf16_products=setting`` on ``device`` in ``dtype`` runs its products in
    fp32 (only bf16 on a CPU; ``auto``: when the CPU lacks bf16 instructions). Never with ``compiled`` (torch.compile
    makes its own kernels) or ``checkpointing`` (activation checkpointing recomputes in the backward, outside the
    mode, and refuses tensors saved as fp32 in the forward and recomputed as bf16)."""
    if device.type != 'cpu' or dtype != torch.bfloat16 or setting == 'native' or compiled or checkpointing:
        return False
    return setting == 'fp32' or not cpu_has_bf16_instructions()


def products_context(enabled: bool):
    """:class:`Fp32Products` when ``enabled``, else a no-op context."""
    return Fp32Products() if enabled else contextlib.nullcontext()
