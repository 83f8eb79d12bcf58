"""DCNv3 operator: semantics against the official algorithm, fused CPU kernel against the reference (values and
gradients, float64/float32/bfloat16/float16), module parameters and backends, build fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pretrain.ops import DCNv3, build, dcnv3_core, dcnv3_core_pytorch
from tests.dcnv3_cases import SHAPES, forward_backward, make_inputs, official_dcnv3_core

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(scope="module")
def cpu_kernel():
    if build.load_cpu() is None:
        pytest.fail(f"the fused CPU kernel did not build: {build.failure('cpu')}")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_reference_matches_official_algorithm(name):
    tensors, args = make_inputs(SHAPES[name])
    ours = dcnv3_core_pytorch(*tensors, *args)
    official = official_dcnv3_core(*tensors, *args)
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-12)


def test_channel_layout_one_hot():
    """Offset channels (g*P + p)*2 + (x, y), mask channels g*P + p, points x-major: a one-hot mask on point p with a
    whole-pixel x offset reads exactly the shifted input pixel."""
    n, h, w, g, d = 1, 6, 7, 2, 3
    x = torch.arange(n * h * w * g * d, dtype=torch.float64).view(n, h, w, g * d)
    group, p, shift_x = 1, 1, 1.0  # point 1 is (dx=-1, dy=0) in x-major order
    offset = torch.zeros(n, h, w, g * 9 * 2, dtype=torch.float64)
    offset[..., (group * 9 + p) * 2 + 0] = shift_x
    mask = torch.zeros(n, h, w, g * 9, dtype=torch.float64)
    mask[..., group * 9 + p] = 1.0
    for backend in ("pytorch", "cpu"):
        out = dcnv3_core(x, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, g, d, 1.0, False, backend=backend)
        # point 1 = kernel (dx=-1, dy=0); offset +1 in x -> reads the same pixel (h, w) of group 1
        torch.testing.assert_close(out[..., d:], x[..., d:], rtol=0, atol=1e-9)
        assert out[..., :d].abs().max() == 0


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_cpu_kernel_float64_matches_reference(cpu_kernel, name):
    tensors, args = make_inputs(SHAPES[name])
    ref_out, ref_grads = forward_backward(dcnv3_core_pytorch, tensors, args)
    out, grads = forward_backward(dcnv3_core, tensors, args, backend="cpu")
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for got, want, what in zip(grads, ref_grads, ("input", "offset", "mask")):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m, w=what: f"grad {w}: {m}")


@pytest.mark.parametrize("name", ["base", "all_mixed", "kernel5_rc", "gc5", "outside"])
def test_cpu_kernel_gradcheck(cpu_kernel, name):
    n, h, w, g, d, k, s, p, dil, osc, rc, std = SHAPES[name]
    small = (1, min(h, 5), min(w, 5), g, min(d, 2), k, s, p, dil, osc, rc, std)
    tensors, args = make_inputs(small, off_grid=True)
    assert torch.autograd.gradcheck(lambda *t: dcnv3_core(*t, *args, backend="cpu"), tensors, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["base", "all_mixed", "gc71"])
def test_cpu_kernel_float32(cpu_kernel, name):
    tensors64, args = make_inputs(SHAPES[name], off_grid=True)
    tensors = [t.detach().float().requires_grad_() for t in tensors64]
    ref_out, ref_grads = forward_backward(dcnv3_core_pytorch, tensors64, args)
    out, grads = forward_backward(dcnv3_core, tensors, args, backend="cpu")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["base", "all_mixed"])
def test_cpu_kernel_low_precision(cpu_kernel, name, dtype):
    """bf16/fp16 inputs accumulate in float32: the result is the float64 reference of the rounded inputs, up to one
    rounding of the output (relative 2^-8 for bf16, 2^-11 for fp16) plus float32 accumulation error."""
    tensors, args = make_inputs(SHAPES[name], dtype=dtype, off_grid=True)
    rounded = [t.detach().double().requires_grad_() for t in tensors]
    ref_out, ref_grads = forward_backward(dcnv3_core_pytorch, rounded, args)
    out, grads = forward_backward(dcnv3_core, tensors, args, backend="cpu")
    assert out.dtype == dtype and all(gr.dtype == dtype for gr in grads)
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    torch.testing.assert_close(out.double(), ref_out, rtol=eps, atol=eps * ref_out.abs().max().item() * 0.05)
    for got, want in zip(grads, ref_grads):
        scale = want.abs().max().item()
        # grad_output is rounded to the low precision too, so allow a few roundings relative to the largest entry
        torch.testing.assert_close(got.double(), want, rtol=4 * eps, atol=4 * eps * scale)


def test_cpu_kernel_float32_offsets_with_bf16_input(cpu_kernel):
    """Under autocast softmax returns float32 masks; they stay float32 and get float32 gradients."""
    tensors, args = make_inputs(SHAPES["base"], dtype=torch.float32, off_grid=True)
    x = tensors[0].detach().bfloat16().requires_grad_()
    out, grads = forward_backward(dcnv3_core, [x, tensors[1], tensors[2]], args, backend="cpu")
    assert out.dtype == torch.bfloat16 and grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
    ref = dcnv3_core_pytorch(x.detach().double(), tensors[1].detach().double(), tensors[2].detach().double(), *args)
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=1e-2)


@pytest.mark.parametrize("batch", [1, 300])
def test_cpu_kernel_batch_sizes(cpu_kernel, batch):
    shape = (batch, 5, 4, 2, 4, 3, 1, 1, 1, 1.0, False, 2.0)
    tensors, args = make_inputs(shape)
    ref_out, ref_grads = forward_backward(dcnv3_core_pytorch, tensors, args)
    out, grads = forward_backward(dcnv3_core, tensors, args, backend="cpu")
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_cpu_kernel_non_contiguous(cpu_kernel):
    tensors, args = make_inputs(SHAPES["base"])
    # The same values laid out NCHW and permuted to NHWC views.
    views = [t.detach().permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1).requires_grad_() for t in tensors]
    assert not views[0].is_contiguous()
    ref_out, ref_grads = forward_backward(dcnv3_core_pytorch, tensors, args)
    out, grads = forward_backward(dcnv3_core, views, args, backend="cpu")
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# Large enough that the forward splits its positions across threads (grain about 2048 multiply-adds per task); the
# backward owns (image, group) slices, except THREAD_CASES["one_slice"], whose single slice at 2 threads is split
# into position chunks with a private grad_input each.
THREAD_CASES = {
    "slices8": (2, 20, 19, 4, 16, 3, 1, 1, 1, 1.0, False, 2.0),
    "slices3_mixed": (1, 24, 23, 3, 8, 3, 2, 2, 2, 2.0, True, 3.0),
    "one_slice": (1, 21, 22, 1, 16, 3, 1, 1, 1, 1.0, False, 2.0),
}


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(THREAD_CASES))
def test_cpu_kernel_threads_agree_with_each_other_and_the_reference(cpu_kernel, restore_threads, name):
    """The parallel forward and backward at 1 and 2 threads: float64 values and all gradients match the reference,
    and match each other bit for bit wherever each thread owns whole (image, group) slices."""
    tensors, args = make_inputs(THREAD_CASES[name])
    ref_out, ref_grads = forward_backward(dcnv3_core_pytorch, tensors, args)
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results[threads] = forward_backward(dcnv3_core, tensors, args, backend="cpu")
        out, grads = results[threads]
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        for got, want, what in zip(grads, ref_grads, ("input", "offset", "mask")):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9,
                                       msg=lambda m, w=what, t=threads: f"{t} threads, grad {w}: {m}")
    (out1, grads1), (out2, grads2) = results[1], results[2]
    assert torch.equal(out1, out2)  # each output element is written by one thread
    assert torch.equal(grads1[1], grads2[1]) and torch.equal(grads1[2], grads2[2])  # per (position, group, point)
    if name == "one_slice":  # chunk partial sums: deterministic for a thread count, rounded differently across
        torch.testing.assert_close(grads2[0], grads1[0], rtol=1e-13, atol=1e-13)
        torch.set_num_threads(2)
        assert torch.equal(forward_backward(dcnv3_core, tensors, args, backend="cpu")[1][0], grads2[0])
    else:
        assert torch.equal(grads1[0], grads2[0])


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_gradcheck_threads(cpu_kernel, restore_threads, threads):
    """fp64 gradcheck of both backward strategies: slices owned per thread, and one slice split into chunks."""
    torch.set_num_threads(threads)
    tensors, args = make_inputs((1, 6, 7, 1, 3, 3, 1, 1, 1, 1.0, False, 2.0), off_grid=True)
    assert torch.autograd.gradcheck(lambda *t: dcnv3_core(*t, *args, backend="cpu"), tensors, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["pytorch", "cpu"])
def test_bad_arguments_name_the_problem(cpu_kernel, backend):
    tensors, args = make_inputs(SHAPES["base"])
    x, offset, mask = (t.detach() for t in tensors)
    with pytest.raises(ValueError, match="group \\* group_channels"):
        dcnv3_core(x[..., :-1], offset, mask, *args, backend=backend)
    with pytest.raises(ValueError, match="offset must have shape"):
        dcnv3_core(x, offset[..., :-2], mask, *args, backend=backend)
    with pytest.raises(ValueError, match="mask must have shape"):
        dcnv3_core(x, offset, mask[:, :-1], *args, backend=backend)
    with pytest.raises(ValueError, match="remove_center needs an odd kernel"):
        dcnv3_core(x, offset, mask, 2, 2, 1, 1, 1, 1, 1, 1, 4, 16, 1.0, True, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        dcnv3_core(x, offset, mask, *args, backend="triton")
    with pytest.raises(ValueError, match="cannot run tensors on cpu"):
        dcnv3_core(x, offset, mask, *args, backend="cuda")


def test_extension_checks_are_a_backstop(cpu_kernel):
    """Called directly, the extension still refuses bad shapes with a message (no crash, no silent overrun)."""
    tensors, args = make_inputs(SHAPES["base"])
    x, offset, mask = (t.detach() for t in tensors)
    with pytest.raises(RuntimeError, match="offset must have shape"):
        build.load_cpu().forward(x, offset[..., :-2], mask, *args)


@pytest.mark.parametrize("center_feature_scale", [False, True])
@pytest.mark.parametrize("remove_center", [False, True])
def test_module_backends_agree(cpu_kernel, center_feature_scale, remove_center):
    torch.manual_seed(0)
    ref = DCNv3(channels=32, group=2, dw_kernel_size=5, offset_scale=2.0, center_feature_scale=center_feature_scale,
                remove_center=remove_center, backend="pytorch").double()
    # Non-trivial offsets, masks and centre scale (the official init zeroes them).
    for name, param in ref.named_parameters():
        if name.startswith(("offset", "mask", "center_feature")):
            torch.nn.init.normal_(param, std=0.5)
    fused = DCNv3(channels=32, group=2, dw_kernel_size=5, offset_scale=2.0, center_feature_scale=center_feature_scale,
                  remove_center=remove_center, backend="cpu").double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 6, 32, dtype=torch.float64)
    out_ref, out_fused = ref(x), fused(x)
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-10, atol=1e-10)
    out_ref.square().sum().backward()
    out_fused.square().sum().backward()
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-8, atol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


def test_module_official_parameter_names_and_init():
    m = DCNv3(channels=64, group=4, dw_kernel_size=5, center_feature_scale=True, remove_center=True)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "dw_conv.0.weight": (64, 1, 5, 5), "dw_conv.0.bias": (64,),
        "dw_conv.1.1.weight": (64,), "dw_conv.1.1.bias": (64,),
        "offset.weight": (4 * 8 * 2, 64), "offset.bias": (4 * 8 * 2,),
        "mask.weight": (4 * 8, 64), "mask.bias": (4 * 8,),
        "input_proj.weight": (64, 64), "input_proj.bias": (64,),
        "output_proj.weight": (64, 64), "output_proj.bias": (64,),
        "center_feature_scale_proj_weight": (4, 64), "center_feature_scale_proj_bias": (4,),
    }
    for name in ("offset.weight", "offset.bias", "mask.weight", "mask.bias", "center_feature_scale_proj_weight"):
        assert m.state_dict()[name].abs().max() == 0, name
    assert m.input_proj.weight.std() > 0


def test_module_at_init_is_a_box_filter_of_the_projection(cpu_kernel):
    """Official init: zero offsets and a uniform softmax make each group a 3x3 mean of input_proj(x)."""
    m = DCNv3(channels=8, group=2).double()
    x = torch.randn(1, 5, 5, 8, dtype=torch.float64)
    proj = m.input_proj(x).permute(0, 3, 1, 2)
    box = torch.nn.functional.avg_pool2d(proj, 3, 1, 1, count_include_pad=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), m.output_proj(box), rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_auto_falls_back_with_one_warning_when_the_build_fails(tmp_path):
    code = (
        "import warnings, torch\n"
        "from pretrain.ops import dcnv3_core\n"
        "x = torch.randn(1, 4, 4, 4); o = torch.zeros(1, 4, 4, 18); m = torch.rand(1, 4, 4, 9)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3): dcnv3_core(x, o, m, 3, 3, 1, 1, 1, 1, 1, 1, 1, 4, 1.0, False)\n"
        "msgs = [str(i.message) for i in w if 'DCNv3' in str(i.message)]\n"
        "assert len(msgs) == 1 and 'sources not found' in msgs[0], msgs\n"
        "try:\n"
        "    dcnv3_core(x, o, m, 3, 3, 1, 1, 1, 1, 1, 1, 1, 4, 1.0, False, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'cpu kernel unavailable' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('explicit cpu backend did not raise')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, DCNV3_CSRC=str(tmp_path / "missing"), DCNV3_BUILD_DIR=str(tmp_path / "cache"),
               PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow
def test_cuda_kernel_compiles_for_sm90():
    """CI has nvcc but no GPU: the CUDA file must still compile (the cache makes reruns instant)."""
    env = dict(os.environ, DCNV3_CUDA_ARCH_LIST="9.0", PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-m", "pretrain.ops", "build", "--cuda"], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cuda: built" in res.stdout


@pytest.mark.slow
def test_failed_build_is_remembered_across_processes(tmp_path):
    """A broken compile fails once; later processes fall back at once with the reason; `ops build` retries."""
    import shutil
    import time

    csrc = tmp_path / "csrc"
    shutil.copytree(os.path.join(REPO, "csrc", "dcnv3"), csrc)
    source = csrc / "dcnv3_cpu.cpp"
    source.write_text("#include \"deliberately_broken_for_the_test.h\"\n" + source.read_text())  # fatal at once
    env = dict(os.environ, DCNV3_CSRC=str(csrc), DCNV3_BUILD_DIR=str(tmp_path / "cache"), PYTHONPATH=REPO)
    probe = ("from pretrain.ops import build\n"
             "assert build.load_cpu() is None\n"
             "print(build.failure('cpu'))\n")

    def run(args):
        start = time.perf_counter()
        res = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
        return res, time.perf_counter() - start

    first, _ = run(["-c", probe])
    assert first.returncode == 0 and "deliberately_broken" in first.stdout, first.stdout + first.stderr
    assert list((tmp_path / "cache").glob("*/*/*/BUILD_FAILED.json"))
    second, _ = run(["-c", probe])
    assert second.returncode == 0 and "an earlier build of these sources failed" in second.stdout, second.stdout
    assert "deliberately_broken" in second.stdout
    forced, _ = run(["-m", "pretrain.ops", "build"])
    assert forced.returncode == 1 and "deliberately_broken" in forced.stderr, forced.stdout + forced.stderr
    assert "an earlier build" not in forced.stderr


@pytest.mark.slow
def test_identical_sources_elsewhere_reuse_the_build(tmp_path):
    """Builds are keyed by content: a copy of csrc/dcnv3 (a run's code snapshot) loads the already built extension
    instead of compiling again."""
    import shutil

    built = build.load_cpu()
    assert built is not None, build.failure("cpu")
    copy = tmp_path / "snapshot" / "csrc" / "dcnv3"
    shutil.copytree(os.path.join(REPO, "csrc", "dcnv3"), copy)
    code = "from pretrain.ops import build\nm = build.load_cpu()\nprint(m.__file__ if m else build.failure('cpu'))\n"
    env = dict(os.environ, DCNV3_CSRC=str(copy), PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == built.__file__


def test_conv2d_copies_misaligned_weights_and_keeps_gradients():
    """The aligned Conv2d (ZeRO-3 packs gathered parameters into one flat buffer): a weight that starts at an odd
    address is copied for the call; output and gradients are those of nn.Conv2d."""
    from pretrain.ops.modules import ALIGN_BYTES, Conv2d

    torch.manual_seed(0)
    conv = Conv2d(8, 8, kernel_size=3, padding=1, groups=8)
    ref = torch.nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8)
    ref.load_state_dict(conv.state_dict())
    assert list(conv.state_dict()) == ['weight', 'bias']
    flat = torch.zeros(1 + conv.weight.numel() + 8, requires_grad=False)
    flat[1:1 + conv.weight.numel()] = conv.weight.detach().flatten()
    flat = flat.requires_grad_(True)
    misaligned = flat[1:1 + conv.weight.numel()].view_as(conv.weight)  # 4 bytes past an aligned start
    assert misaligned.data_ptr() % ALIGN_BYTES != 0
    x = torch.randn(2, 8, 6, 6)
    out = conv._conv_forward(x, misaligned, conv.bias)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    out.sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(flat.grad[1:1 + conv.weight.numel()].view_as(ref.weight), ref.weight.grad)


def test_align_convolutions_turns_every_conv_aligned_without_changing_keys_or_outputs():
    """The trainer's one call covers convolutions whoever built them (InternImage, timm's ConvNeXt, decoders)."""
    import timm

    from pretrain.models import create_backbone
    from pretrain.ops.modules import Conv2d, align_convolutions

    torch.manual_seed(0)
    for model in (create_backbone('internimage_t', channels=16, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8),
                                  num_classes=10, core_op='DCNv3_pytorch'),
                  timm.create_model('convnextv2_atto', num_classes=10)):
        model.eval()
        x = torch.randn(1, 3, 64, 64)
        keys, before = list(model.state_dict()), model(x)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert align_convolutions(model) == len(convs) > 0
        assert all(type(m) is Conv2d for m in convs)
        assert list(model.state_dict()) == keys
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        assert align_convolutions(model) == 0  # already aligned
