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


# The chunked kernels' own cases: each path of csrc/dcnv3/dcnv3_cuda_kernels.cuh (vector / scalar forward, K=9 in
# registers / any K, backward lanes 2..16, the legacy fallback) on shapes the shared SHAPES do not reach in fp32.
CHUNKED_SHAPES = {
    **SHAPES,
    "gc16_k5": (2, 9, 8, 2, 16, 5, 1, 2, 1, 1.0, False, 2.0),  # fp32: 4 lanes, P=25 read per point
    "gc16_rc_stride2": (2, 11, 9, 3, 16, 3, 2, 1, 1, 1.0, True, 2.0),  # P=8 (generic), strided output
    "gc32_dil2": (2, 10, 10, 2, 32, 3, 1, 2, 2, 2.0, False, 2.0),  # fp32: 8 lanes; fp64: 16 lanes
    "gc64": (1, 6, 7, 2, 64, 3, 1, 1, 1, 1.0, False, 2.0),  # fp32: 16 lanes; fp64: 32 lanes -> legacy backward
    "gc24": (2, 6, 6, 2, 24, 3, 1, 1, 1, 1.0, False, 2.0),  # fp32: 6 lanes -> legacy backward, vector forward
    "gc16_outside": (2, 7, 6, 4, 16, 3, 1, 1, 1, 1.0, False, 15.0),  # most taps off the image
}


def _against_cpu(name, dtype, rtol, atol, grad_rtol, grad_atol, off_grid=True):
    """The CUDA kernel in ``dtype`` against the CPU kernel in float64 on the same inputs (forward and all grads)."""
    tensors, args = make_inputs(CHUNKED_SHAPES[name], dtype=dtype, off_grid=off_grid)
    ref = [t.detach().double().requires_grad_() for t in tensors]
    cpu_out, cpu_grads = forward_backward(dcnv3_core, ref, args, backend="cpu")
    dev = [t.detach().cuda().requires_grad_() for t in tensors]
    out, grads = forward_backward(dcnv3_core, dev, args, backend="cuda")
    assert out.dtype == dtype and all(g.dtype == t.dtype for g, t in zip(grads, dev))
    torch.testing.assert_close(out.double().cpu(), cpu_out, rtol=rtol, atol=atol)
    for got, want, what in zip(grads, cpu_grads, ("input", "offset", "mask")):
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got.double().cpu(), want, rtol=grad_rtol, atol=grad_atol * scale,
                                   msg=lambda m, w=what: f"grad {w}: {m}")


@pytest.mark.parametrize("name", sorted(CHUNKED_SHAPES))
def test_cuda_float64_matches_cpu_kernel(cuda_kernel, name):
    """Same math header, two devices: float64 forward and every gradient to 1e-9."""
    _against_cpu(name, torch.float64, 1e-9, 1e-9, 1e-9, 1e-9, off_grid=False)


@pytest.mark.parametrize("name", sorted(CHUNKED_SHAPES))
def test_cuda_float32_matches_cpu_kernel(cuda_kernel, name):
    """float32: 1e-5 relative on the output, 1e-4 on the gradients (atomics add in any order)."""
    _against_cpu(name, torch.float32, 1e-5, 1e-5, 1e-4, 1e-4)


@pytest.mark.parametrize("name", ["base", "gc16_k5", "gc32_dil2", "gc16_rc_stride2", "gc24"])
def test_cuda_bfloat16_matches_cpu_kernel(cuda_kernel, name):
    """bfloat16 inputs with float32 accumulation: within 2 bf16 ulps of the float64 result on the output, 4 on the
    gradients (grad_input is accumulated in float32 and rounded once)."""
    tensors, args = make_inputs(CHUNKED_SHAPES[name], dtype=torch.bfloat16, off_grid=True)
    tensors[1] = tensors[1].detach().float().requires_grad_()  # float32 offsets and mask, as under autocast
    tensors[2] = tensors[2].detach().float().requires_grad_()
    ref = [t.detach().double().requires_grad_() for t in tensors]
    cpu_out, cpu_grads = forward_backward(dcnv3_core, ref, args, backend="cpu")
    dev = [t.detach().cuda().requires_grad_() for t in tensors]
    out, grads = forward_backward(dcnv3_core, dev, args, backend="cuda")
    assert out.dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    eps = 2.0**-8
    torch.testing.assert_close(out.double().cpu(), cpu_out, rtol=2 * eps, atol=2 * eps)
    for got, want in zip(grads, cpu_grads):
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got.double().cpu(), want, rtol=4 * eps, atol=4 * eps * scale)


@pytest.mark.parametrize("name", ["base", "gc16_k5", "gc5", "gc32_dil2", "outside"])
def test_cuda_gradcheck(cuda_kernel, name):
    n, h, w, g, d, k, s, p, dil, osc, rc, std = CHUNKED_SHAPES[name]
    tensors, args = make_inputs((1, min(h, 6), min(w, 6), g, d, k, s, p, dil, osc, rc, std), off_grid=True)
    dev = [t.detach().cuda().requires_grad_() for t in tensors]
    # grad_input accumulates with atomicAdd, whose order varies between runs: reentrant to rounding, not bitwise.
    assert torch.autograd.gradcheck(lambda *t: dcnv3_core(*t, *args, backend="cuda"), dev, eps=1e-6, atol=1e-6,
                                    nondet_tol=1e-12)


def test_cuda_misaligned_input_takes_the_scalar_path(cuda_kernel):
    """An input that starts 4 bytes past a 16-byte boundary cannot use vector loads: the scalar forward and the
    legacy backward give the same result as an aligned copy."""
    tensors, args = make_inputs(CHUNKED_SHAPES["base"], dtype=torch.float32, off_grid=True)
    x = tensors[0].detach().cuda()
    flat = torch.empty(x.numel() + 1, device="cuda")
    flat[1:] = x.flatten()
    shifted = flat[1:].view_as(x).requires_grad_()
    assert shifted.data_ptr() % 16 != 0
    rest = [t.detach().cuda().requires_grad_() for t in tensors[1:]]
    out, grads = forward_backward(dcnv3_core, [shifted, *rest], args, backend="cuda")
    want_out, want_grads = forward_backward(dcnv3_core, [x.clone().requires_grad_(), *rest], args, backend="cuda")
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cuda_legacy_kernel_agrees_with_the_chunked_one(cuda_kernel):
    """DCNV3_CUDA_KERNEL=legacy (read once per process, so in a subprocess) runs the old kernel: same results."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, sys\n"
        "from pretrain.ops import dcnv3_core\n"
        "from tests.dcnv3_cases import make_inputs, forward_backward\n"
        "t, a = make_inputs((3, 14, 13, 4, 16, 3, 1, 1, 1, 1.0, False, 2.0), dtype=torch.float32, off_grid=True)\n"
        "dev = [x.detach().cuda().requires_grad_() for x in t]\n"
        "out, grads = forward_backward(dcnv3_core, dev, a, backend='cuda')\n"
        "torch.save([out.cpu(), *[g.cpu() for g in grads]], sys.argv[1])\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for kernel in ("legacy", "chunked"):
        path = f"/tmp/dcnv3_{kernel}_{os.getpid()}.pt"
        env = dict(os.environ, DCNV3_CUDA_KERNEL=kernel,
                   PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        res = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        results.append(torch.load(path))
        os.unlink(path)
    for legacy, chunked in zip(*results):
        torch.testing.assert_close(chunked, legacy, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_second_device(cuda_kernel):
    """The device guard: tensors on cuda:1 run there (not on the current device) and match the CPU kernel."""
    tensors, args = make_inputs(CHUNKED_SHAPES["base"], dtype=torch.float64)
    cpu_out, cpu_grads = forward_backward(dcnv3_core, tensors, args, backend="cpu")
    dev = [t.detach().to("cuda:1").requires_grad_() for t in tensors]
    with torch.cuda.device(0):
        out, grads = forward_backward(dcnv3_core, dev, args, backend="cuda")
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-9, atol=1e-9)
    for got, want in zip(grads, cpu_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", ["fp32_batch3_stride2", "bf16_fp32_offsets"])
def test_cuda_opcheck(cuda_kernel, case):
    """``torch.library.opcheck`` of both operators on the CUDA kernel (issue 18; the CPU ones are in
    tests/test_custom_op.py): schema, fake tensors against the kernel, autograd registration, AOT dispatch."""
    from tests.test_custom_op import CASES, FORWARD, _op_args, opcheck_backward_op

    args = _op_args(*CASES[case], device='cuda')
    torch.library.opcheck(FORWARD, args)
    opcheck_backward_op(args)
