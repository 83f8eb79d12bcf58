"""The CUDA kernel against the reference (float64/float32/float16/bfloat16), large and odd batches, non-contiguous
inputs, the CPU kernel and autocast. Skipped without CUDA (marker gpu)."""

from __future__ import annotations

import pytest
import torch

from pretrain.ops import DCNv3, build, dcnv3_core, dcnv3_core_pytorch
from tests.dcnv3_cases import SHAPES, forward_backward, make_inputs

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_kernel():
    if build.load_cuda() is None:
        pytest.fail(f"the CUDA kernel did not build: {build.failure('cuda')}")


def _compare(tensors_dev, args, ref_tensors, rtol, atol, grad_rtol, grad_atol):
    ref_out, ref_grads = forward_backward(dcnv3_core_pytorch, ref_tensors, args)
    out, grads = forward_backward(dcnv3_core, tensors_dev, args, backend="cuda")
    assert out.is_cuda and out.dtype == tensors_dev[0].dtype
    torch.testing.assert_close(out.double().cpu(), ref_out, rtol=rtol, atol=atol)
    for got, want, what in zip(grads, ref_grads, ("input", "offset", "mask")):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double().cpu(), want, rtol=grad_rtol, atol=grad_atol * max(scale, 1.0),
                                   msg=lambda m, w=what: f"grad {w}: {m}")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_cuda_float64(cuda_kernel, name):
    ref, args = make_inputs(SHAPES[name])
    dev = [t.detach().cuda().requires_grad_() for t in ref]
    _compare(dev, args, ref, 1e-10, 1e-10, 1e-9, 1e-10)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_cuda_float32(cuda_kernel, name):
    ref, args = make_inputs(SHAPES[name], off_grid=True)
    dev = [t.detach().float().cuda().requires_grad_() for t in ref]
    _compare(dev, args, ref, 1e-5, 1e-5, 1e-4, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["base", "all_mixed", "gc71", "gc32", "kernel5_rc"])
def test_cuda_low_precision(cuda_kernel, name, dtype):
    low, args = make_inputs(SHAPES[name], dtype=dtype, off_grid=True)
    ref = [t.detach().double().requires_grad_() for t in low]
    dev = [t.detach().cuda().requires_grad_() for t in low]
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    _compare(dev, args, ref, eps, eps, 4 * eps, 4 * eps)


@pytest.mark.parametrize("batch", [1, 257, 300])
def test_cuda_any_batch_size(cuda_kernel, batch):
    ref, args = make_inputs((batch, 6, 5, 2, 16, 3, 1, 1, 1, 1.0, False, 2.0), off_grid=True)
    dev = [t.detach().float().cuda().requires_grad_() for t in ref]
    _compare(dev, args, ref, 1e-5, 1e-5, 1e-4, 1e-5)


def test_cuda_non_contiguous(cuda_kernel):
    ref, args = make_inputs(SHAPES["all_mixed"])
    dev = [t.detach().cuda().permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1).requires_grad_() for t in ref]
    assert not dev[0].is_contiguous()
    _compare(dev, args, ref, 1e-10, 1e-10, 1e-9, 1e-10)


def test_cuda_matches_cpu_kernel_at_internimage_t_stage1(cuda_kernel):
    """One kernel header, two devices: the same float32 results at a real model shape."""
    tensors, args = make_inputs((4, 56, 56, 4, 16, 3, 1, 1, 1, 1.0, False, 2.0), dtype=torch.float32, off_grid=True)
    cpu_out, cpu_grads = forward_backward(dcnv3_core, tensors, args, backend="cpu")
    dev = [t.detach().cuda().requires_grad_() for t in tensors]
    out, grads = forward_backward(dcnv3_core, dev, args, backend="cuda")
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, cpu_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_cuda_module_under_bf16_autocast(cuda_kernel):
    torch.manual_seed(0)
    m = DCNv3(channels=64, group=4, dw_kernel_size=5, center_feature_scale=True).cuda()
    for name, p in m.named_parameters():
        if name.startswith(("offset", "mask")):
            torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(8, 14, 14, 64, device="cuda")
    ref = m(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
