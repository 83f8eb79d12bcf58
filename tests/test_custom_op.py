"""DCNv3 as torch.library custom operators (``pretrain::dcnv3_forward`` / ``pretrain::dcnv3_backward``):
``torch.library.opcheck`` (schema, fake tensors against the real kernel, autograd registration, AOT dispatch with
static and dynamic shapes) on the fused CPU kernel and on the reference fallback, under our dtype rules (fp32 offsets
with bf16 inputs) and several batch sizes; the backward op's fake results against the kernel's."""
from __future__ import annotations

import pytest
import torch

from pretrain.ops import build, dcnv3_core
from pretrain.ops.function import dcnv3_backward, dcnv3_forward
from tests.dcnv3_cases import SHAPES, make_inputs

FORWARD, BACKWARD = torch.ops.pretrain.dcnv3_forward.default, torch.ops.pretrain.dcnv3_backward.default


@pytest.fixture(scope='module', autouse=True)
def cpu_kernel():
    if build.load_cpu() is None:
        pytest.fail(f"the fused CPU kernel did not build: {build.failure('cpu')}")


def _op_args(shape, dtype, side_dtype=None, batch=None, device='cpu'):
    tensors, args = make_inputs(shape if batch is None else (batch, *shape[1:]), dtype=dtype, device=device)
    x, offset, mask = tensors
    if side_dtype is not None:  # dcnv3_core's rule: fp32 offset/mask kept beside a 16-bit input
        offset, mask = (t.detach().to(side_dtype).requires_grad_() for t in (offset, mask))
    *geometry, remove_center = args
    return (x, offset, mask, *geometry[:-1], float(geometry[-1]), bool(remove_center))


CASES = {
    'fp64': (SHAPES['all_mixed'], torch.float64, None, None),
    'fp32_batch1': (SHAPES['base'], torch.float32, None, 1),
    'fp32_batch3_stride2': (SHAPES['stride2'], torch.float32, None, 3),
    'bf16_fp32_offsets': (SHAPES['remove_center'], torch.bfloat16, torch.float32, None),
}


@pytest.mark.parametrize('case', list(CASES))
def test_opcheck_forward_with_the_fused_kernel(case):
    torch.library.opcheck(FORWARD, _op_args(*CASES[case]))


def opcheck_backward_op(args) -> None:
    """opcheck of the backward operator at the forward's inputs (on their device); its gradients come back in the
    inputs' dtypes (fp32 offset/mask gradients beside a 16-bit input)."""
    out = dcnv3_forward(*args)
    grad = torch.randn_like(out)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(BACKWARD, (*detached, grad))
    grads = dcnv3_backward(*detached, grad)
    assert [g.dtype for g in grads] == [a.dtype for a in detached[:3]]


@pytest.mark.parametrize('case', ['fp32_batch1', 'bf16_fp32_offsets'])
def test_opcheck_backward_op(case):
    opcheck_backward_op(_op_args(*CASES[case]))


def test_opcheck_with_the_reference_fallback(monkeypatch):
    """Where the fused kernel cannot be built, the same operator runs the reference, with the same contract."""
    monkeypatch.setattr('pretrain.ops.function._ext_or_none', lambda device: None)
    args = _op_args(*CASES['fp32_batch3_stride2'])
    torch.library.opcheck(FORWARD, args)
    fused_out = build.load_cpu().forward(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    torch.testing.assert_close(dcnv3_forward(*args), fused_out, rtol=1e-5, atol=1e-5)


def test_dcnv3_core_goes_through_the_operator():
    (x, offset, mask), args = make_inputs(SHAPES['base'], dtype=torch.float32)
    out = dcnv3_core(x, offset, mask, *args, backend='cpu')
    assert out.grad_fn is not None and 'dcnv3_forward' in type(out.grad_fn).__name__.lower() + str(out.grad_fn)
    gm = torch.fx.experimental.proxy_tensor.make_fx(
        lambda a, b, c: dcnv3_core(a, b, c, *args, backend='cpu'))(x.detach(), offset.detach(), mask.detach())
    assert [n.target for n in gm.graph.nodes if n.op == 'call_function'] == [FORWARD]
