"""The tap-by-tap convolution weight gradient (pretrain.ops.tapconv): the same gradients as F.conv2d's autograd, and
the rule that chooses it."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pretrain.ops import tapconv
from pretrain.ops.modules import Conv2d

# (N, C_in, C_out, H, W, kernel, stride, padding, groups): dense and depth-wise, maps smaller than the kernel,
# strided downsampling onto 1-2 pixels, even kernels, non-square maps, kernels cut to their centre (7x7 on 1x1).
CASES = [
    (3, 8, 8, 2, 2, 3, 1, 1, 8), (3, 8, 8, 1, 1, 3, 1, 1, 8), (2, 6, 6, 1, 1, 7, 1, 3, 6),
    (2, 6, 6, 4, 3, 7, 1, 3, 6), (2, 4, 4, 1, 2, 5, 1, 2, 4), (3, 8, 16, 2, 2, 3, 2, 1, 1),
    (3, 8, 16, 4, 4, 2, 2, 0, 1), (2, 5, 7, 1, 1, 1, 1, 0, 1), (2, 5, 7, 3, 2, 3, 1, 1, 1), (2, 4, 6, 4, 4, 3, 2, 1, 1),
]


def _pair_of_convs(c_in, c_out, k, s, p, g, bias, dtype=torch.float32):
    torch.manual_seed(0)
    ours = Conv2d(c_in, c_out, k, s, p, groups=g, bias=bias).to(dtype)
    ref = torch.nn.Conv2d(c_in, c_out, k, s, p, groups=g, bias=bias).to(dtype)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize('case', CASES, ids=lambda c: 'x'.join(map(str, c)))
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('channels_last', [True, False])
def test_gradients_equal_those_of_conv2d(case, bias, channels_last):
    n, c_in, c_out, h, w, k, s, p, g = case
    ours, ref = _pair_of_convs(c_in, c_out, k, s, p, g, bias)
    x = torch.randn(n, c_in, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert tapconv.use_taps(x1, ours.weight, ours.stride, ours.padding, ours.dilation, ours.groups)
    y1, y2 = ours(x1), ref(x2)
    assert type(y1.grad_fn).__name__ == '_TapConv2dBackward'  # the path under test ran
    grad = torch.randn_like(y2)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    # taps that only ever read padding: exactly zero, as F.conv2d's
    assert (ours.weight.grad[ref.weight.grad == 0] == 0).all()


@pytest.mark.parametrize('case', [CASES[0], CASES[2], CASES[5], CASES[9]], ids=lambda c: 'x'.join(map(str, c)))
def test_gradcheck_in_float64(case):
    n, c_in, c_out, h, w, k, s, p, g = case
    x = torch.randn(n, c_in, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c_out, c_in // g, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c_out, dtype=torch.float64, requires_grad=True)
    assert tapconv.use_taps(x, weight, s, p, 1, g)
    assert torch.autograd.gradcheck(lambda a, b, c: tapconv.conv2d(a, b, c, s, p, 1, g), (x, weight, bias))


def test_bf16_under_the_fp32_products_mode_runs_in_float32_and_returns_bf16():
    """The engine's bf16 on a CPU without bf16 instructions (pretrain.engine.cpu_bf16.Fp32Products): the products in
    fp32, the backward too (it runs outside the mode), output and gradients in bf16."""
    from pretrain.engine.cpu_bf16 import Fp32Products

    ours, ref = _pair_of_convs(8, 8, 3, 1, 1, 8, True, dtype=torch.bfloat16)
    x = torch.randn(4, 8, 2, 2, dtype=torch.bfloat16, requires_grad=True)
    with Fp32Products():
        assert tapconv.fp32_products_active()
        y = ours(x)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ == 'ToCopyBackward0'  # fp32 inside
    expected = F.conv2d(x.detach().float(), ref.weight.float(), ref.bias.float(), 1, 1, 1, 8).bfloat16()
    assert torch.equal(y, expected)
    y.float().sum().backward()
    assert x.grad.dtype == ours.weight.grad.dtype == torch.bfloat16
    ref_w = ref.weight.detach().float().requires_grad_()
    F.conv2d(x.detach().float(), ref_w, None, 1, 1, 1, 8).sum().backward()
    torch.testing.assert_close(ours.weight.grad.float(), ref_w.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_reduced_precision_without_the_mode_stays_in_its_dtype(dtype):
    """``deepspeed.cpu_bf16_products: native`` (no mode): the taps run in the tensors' own dtype, as F.conv2d."""
    ours, ref = _pair_of_convs(8, 16, 3, 2, 1, 1, True, dtype=dtype)
    x = torch.randn(4, 8, 2, 2, dtype=dtype, requires_grad=True)
    assert not tapconv.fp32_products_active()
    y = ours(x)
    assert type(y.grad_fn).__name__ == '_TapConv2dBackward'
    assert torch.equal(y, F.conv2d(x.detach(), ref.weight, ref.bias, 2, 1))
    y.float().sum().backward()
    assert x.grad.dtype == ours.weight.grad.dtype == ours.bias.grad.dtype == dtype
    ref_w = ref.weight.detach().float().requires_grad_()
    F.conv2d(x.detach().float(), ref_w, None, 2, 1).sum().backward()
    torch.testing.assert_close(ours.weight.grad.float(), ref_w.grad, rtol=2e-2, atol=2e-2)


def test_non_square_kernels_strides_and_paddings_and_an_input_without_gradient():
    torch.manual_seed(0)
    for k, s, p, hw in [((3, 1), (2, 1), (1, 0), (2, 3)), ((1, 5), (1, 1), (0, 2), (3, 2)),
                        ((5, 3), (3, 2), (2, 1), (3, 4)), ((2, 2), (2, 2), (0, 0), (2, 4))]:
        for input_grad in (True, False):
            x = torch.randn(2, 4, *hw, dtype=torch.float64, requires_grad=input_grad)
            w = torch.randn(6, 4, *k, dtype=torch.float64, requires_grad=True)
            assert tapconv.use_taps(x, w, s, p, 1, 1), (k, s, p, hw)
            y = tapconv.conv2d(x, w, None, s, p)
            assert type(y.grad_fn).__name__ == '_TapConv2dBackward'
            w2 = w.detach().clone().requires_grad_()
            x2 = x.detach().clone().requires_grad_(input_grad)
            y2 = F.conv2d(x2, w2, None, s, p)
            grad = torch.randn_like(y2)
            y.backward(grad)
            y2.backward(grad)
            torch.testing.assert_close(y, y2)
            torch.testing.assert_close(w.grad, w2.grad)
            assert (x.grad is None) is (not input_grad)
            if input_grad:
                torch.testing.assert_close(x.grad, x2.grad)


def test_the_kernel_is_cut_to_the_taps_that_reach_a_pixel_where_the_cut_is_symmetric():
    weight = torch.randn(8, 1, 7, 7)
    cut, padding = tapconv._crop(weight, (1, 1), (1, 1), (1, 1), (3, 3))  # 7 x 7 on 1 x 1: its centre
    assert cut.shape == (8, 1, 1, 1) and padding == (0, 0) and torch.equal(cut, weight[..., 3:4, 3:4])
    cut, padding = tapconv._crop(weight, (2, 3), (2, 3), (1, 1), (3, 3))
    assert cut.shape == (8, 1, 3, 5) and padding == (1, 2)
    w3 = torch.randn(16, 8, 3, 3)  # stride 2 onto 1 x 1 from 2 x 2: taps 1-2 reach, not symmetric: no cut
    cut, padding = tapconv._crop(w3, (2, 2), (1, 1), (2, 2), (1, 1))
    assert cut is w3 and padding == (1, 1)


def test_weight_grad_by_taps_refuses_grouped_convolutions():
    with pytest.raises(ValueError, match='groups=2'):
        tapconv.weight_grad_by_taps(torch.randn(2, 8, 2, 2), torch.randn(2, 8, 2, 2), torch.Size((8, 4, 3, 3)),
                                    1, 1, 2)


def test_the_rule():
    def rule(x_shape, w_shape, stride=1, padding=1, dilation=1, groups=1, requires_grad=True):
        x = torch.zeros(x_shape)
        w = torch.zeros(w_shape, requires_grad=requires_grad)
        return tapconv.use_taps(x, w, stride, padding, dilation, groups)

    assert rule((8, 16, 2, 2), (16, 1, 3, 3), groups=16)            # map smaller than the kernel
    assert rule((8, 16, 4, 4), (16, 1, 7, 7), padding=3, groups=16)
    assert rule((8, 16, 4, 4), (32, 16, 3, 3), stride=2)            # onto 2 x 2
    assert not rule((8, 16, 8, 8), (16, 1, 3, 3), groups=16)        # oneDNN's JIT kernels: keep them
    assert not rule((8, 16, 8, 8), (32, 16, 3, 3), stride=2)        # onto 4 x 4
    assert not rule((8, 16, 2, 2), (16, 4, 3, 3), groups=4)         # grouped, not depth-wise
    assert not rule((8, 16, 2, 2), (32, 1, 3, 3), groups=16)        # depth-wise with a channel multiplier
    assert not rule((8, 16, 2, 2), (16, 1, 3, 3), dilation=2, groups=16)
    assert not rule((8, 16, 2, 2), (16, 1, 3, 3), padding='same', groups=16)
    assert not rule((8, 16, 2, 2), (16, 1, 3, 3), groups=16, requires_grad=False)  # frozen: forward only
    assert not rule((8, 16, 1, 1), (16, 1, 9, 9), padding=4, groups=16)  # more than MAX_TAPS taps
    x, w = torch.zeros(8, 16, 2, 2), torch.zeros(16, 1, 3, 3, requires_grad=True)
    assert not tapconv.use_taps(x.bfloat16(), w, 1, 1, 1, 16)  # mixed dtypes: F.conv2d's error, as without taps
    assert not tapconv.use_taps(x, w, 1, 1, 1, 16, torch.zeros(16, dtype=torch.bfloat16))
    assert not tapconv.use_taps(x.to('meta'), w, 1, 1, 1, 16)  # not on the CPU
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not tapconv.use_taps(x, w, 1, 1, 1, 16)  # CPU autocast: F.conv2d's own casts
        y = Conv2d(16, 16, 3, padding=1, groups=16)(x.requires_grad_())
    y.float().sum().backward()
    assert tapconv.use_taps(x, w, 1, 1, 1, 16)
    with torch.no_grad():
        assert not rule((8, 16, 2, 2), (16, 1, 3, 3), groups=16)
    tapconv.ENABLED = False
    try:
        assert not rule((8, 16, 2, 2), (16, 1, 3, 3), groups=16)
    finally:
        tapconv.ENABLED = True
    assert rule((8, 16, 2, 2), (16, 1, 3, 3), groups=16)


def test_not_under_torch_compile(monkeypatch):
    x, w = torch.zeros(8, 16, 2, 2), torch.zeros(16, 1, 3, 3, requires_grad=True)
    assert tapconv.use_taps(x, w, 1, 1, 1, 16)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    assert not tapconv.use_taps(x, w, 1, 1, 1, 16)


def test_conv2d_outside_the_rule_is_plain_conv2d():
    conv = Conv2d(8, 8, 3, padding=1, groups=8)
    assert type(conv(torch.randn(2, 8, 8, 8)).grad_fn).__name__ == 'ConvolutionBackward0'
    assert type(Conv2d(8, 8, 3, padding=1, padding_mode='reflect', groups=8)(torch.randn(2, 8, 2, 2)).grad_fn
                ).__name__ == 'ConvolutionBackward0'  # padding modes other than zeros: nn.Conv2d's own path


def test_the_benchmark_runs_and_routes_the_small_maps_of_the_convergence_model(tmp_path):
    """benchmarks/small_conv.py (its layer part, one call per variant): the convergence InternImage's convolutions
    on 2 x 2 and 1 x 1 maps take the taps, those on 8 x 8 keep oneDNN."""
    from benchmarks.small_conv import main

    out = tmp_path / 'small_conv.json'
    assert main(['--part', 'layers', '--only', 'internimage', '--steps', '1', '--warmup', '0',
                 '--json-file', str(out)]) == 0
    rule = {row['layer']: row['rule'] for row in json.loads(out.read_text())['layers']}
    assert rule['levels.2.blocks.0.dcn.dw_conv.0'] == rule['levels.3.blocks.0.dcn.dw_conv.0'] == 'taps'
    assert rule['levels.0.blocks.0.dcn.dw_conv.0'] == rule['patch_embed.conv1'] == 'onednn'
