"""PeLK: the sharing grid against the paper's examples and parameter counts, kernel expansion, the large depth-wise
convolution paths against F.conv2d, the KPE against Eq. 3, the partial split, the timm interface, and the demo config
on real shards."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from pretrain.models import PeLK, checkpointable_blocks, create_backbone, load_checkpoint
from pretrain.models.pelk import PartialPeripheralConv, kpe_bias, sharing_grid
from pretrain.ops import dwconv
from pretrain.ops.dwconv import choose_impl, crop_kernel, dwconv2d, fft_size
from tests.test_engine import _env, shards  # noqa: F401  (shards: real ImageNet photos as tmp shards)
from tests.test_models_internimage import _real_images

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_classes=10)  # pelk_t's kernels 51/49/47/13


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _tiny(**kwargs) -> PeLK:
    torch.manual_seed(0)
    return timm.create_model('pelk_t', **{**TINY, **kwargs})


def _randomize(model: torch.nn.Module) -> None:
    """Move parameters away from init (layer scale 1e-6, zero biases) so every path shows in the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


# ------------------------------------------------------------------------------------------------ sharing grid
@pytest.mark.parametrize('k, center, expected', [
    (31, 5, (7, 4, 2, 1, 1, 1, 1, 1, 2, 4, 7)),  # paper Fig. 1b: 31x31 from 11x11
    (51, 5, (9, 8, 4, 2, 1, 1, 1, 1, 1, 2, 4, 8, 9)),  # Table 6: half-grid [9, 8, 4, 2, 1, 1, (1)]
    (33, 5, (8, 4, 2, 1, 1, 1, 1, 1, 2, 4, 8)),  # Table 5: [8, 4, 2, 1, 1, 1]
    (49, 5, (8, 8, 4, 2, 1, 1, 1, 1, 1, 2, 4, 8, 8)),
    (47, 5, (7, 8, 4, 2, 1, 1, 1, 1, 1, 2, 4, 8, 7)),
    (101, 7, (17, 16, 8, 4, 2, 1, 1, 1, 1, 1, 1, 1, 2, 4, 8, 16, 17)),  # PeLK-101, 7x7 centre
    (13, 5, (2, 2, 1, 1, 1, 1, 1, 2, 2)),
    (5, 5, (1, 1, 1, 1, 1)),  # centre covers the kernel: dense
    (7, 9, (1,) * 7),
])
def test_sharing_grid_reproduces_the_paper(k, center, expected):
    grid = sharing_grid(k, center)
    assert grid == expected
    assert sum(grid) == k and grid == grid[::-1]


@pytest.mark.parametrize('k, k_prime, ratio, decimals', [(51, 13, 0.065, 3), (33, 11, 0.11, 2)])
def test_peripheral_parameter_counts_match_the_paper(k, k_prime, ratio, decimals):
    """51x51 from 13x13: 6.5% of the dense parameters (93.5% fewer, Table 6); 33x33: 0.11x (Table 5); the paper's
    figures are rounded to the decimals given."""
    conv = PartialPeripheralConv(dim=124, kernel_size=k)
    assert conv.conv_channels == 46  # int(3/8 * 124)
    assert conv.weight.shape == (46, 1, k_prime, k_prime)
    assert conv.expanded_weight().shape == (46, 1, k, k)
    assert round(conv.weight.numel() / conv.expanded_weight().numel(), decimals) == ratio


def test_sharing_grid_rejects_even_sizes():
    for k, c in ((50, 5), (51, 4), (0, 5)):
        with pytest.raises(ValueError, match='odd'):
            sharing_grid(k, c)


def test_peripheral_kernel_expands_region_by_region():
    """w(x, y) = w_theta(a, b) for (x, y) in Z_{a,b} (paper §4.1), regions from the grid's running sums."""
    conv = PartialPeripheralConv(dim=16, kernel_size=51)
    torch.manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
    w = conv.expanded_weight()
    edges = [0]
    for s in conv.grid:
        edges.append(edges[-1] + s)
    for a in range(len(conv.grid)):
        for b in range(len(conv.grid)):
            region = w[:, 0, edges[a]:edges[a + 1], edges[b]:edges[b + 1]]
            assert torch.equal(region, conv.weight[:, 0, a, b, None, None].expand_as(region)), (a, b)
    counts = torch.tensor(conv.grid)
    other = conv.weight.repeat_interleave(counts, dim=2).repeat_interleave(counts, dim=3)
    assert torch.equal(w, other)


def test_shared_parameter_gradient_is_the_sum_over_its_region():
    conv = PartialPeripheralConv(dim=8, kernel_size=31)
    upstream = torch.randn(conv.conv_channels, 1, 31, 31)
    (conv.expanded_weight() * upstream).sum().backward()
    edges = torch.tensor((0,) + conv.grid).cumsum(0).tolist()
    expected = torch.stack([torch.stack([upstream[:, 0, edges[a]:edges[a + 1], edges[b]:edges[b + 1]].sum((-2, -1))
                                         for b in range(11)], -1) for a in range(11)], -2)
    torch.testing.assert_close(conv.weight.grad[:, 0], expected)


# ------------------------------------------------------------------------------------------------ depth-wise conv
CONV_SHAPES = [  # (B, C, H, W, k)
    (2, 3, 9, 9, 5),
    (2, 4, 7, 12, 13),  # kernel larger than the map's height: cropped to 13 x 13 -> 13 x 13 (2H-1 = 13)
    (1, 2, 5, 6, 51),  # cropped to 9 x 11
    (2, 3, 16, 16, 3),
    (1, 5, 14, 14, 47),  # PeLK-T stage 3 at 224: 47 -> 27
]


@pytest.mark.parametrize('impl', ['native', 'fft', 'auto'])
@pytest.mark.parametrize('shape', CONV_SHAPES, ids=str)
def test_dwconv2d_equals_conv2d_forward_and_backward(impl, shape):
    b, c, h, w, k = shape
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, 1, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(b, c, h, w, dtype=torch.float64)

    def run(fn):
        out = fn(x, weight, bias)
        out.backward(grad)
        grads = [t.grad.clone() for t in (x, weight, bias)]
        for t in (x, weight, bias):
            t.grad = None
        return out.detach(), grads

    ref_out, ref_grads = run(lambda x, w, bb: F.conv2d(x, w, bb, padding=k // 2, groups=c))
    out, grads = run(lambda x, w, bb: dwconv2d(x, w, bb, impl=impl))
    assert out.dtype == torch.float64 and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for name, g, r in zip(('x', 'weight', 'bias'), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=name)
    # taps outside the crop never meet a pixel: their gradient is exactly zero
    cropped = crop_kernel(weight, h, w)
    assert grads[1].abs().sum() == pytest.approx(crop_kernel(grads[1], h, w).abs().sum())
    assert cropped.shape[-2:] == (min(k, 2 * h - 1), min(k, 2 * w - 1))


@pytest.mark.parametrize('impl', ['native', 'fft'])
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_dwconv2d_float32_and_bf16_close_to_float64(impl, dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 28, 28, dtype=torch.float64)
    weight = torch.randn(6, 1, 49, 49, dtype=torch.float64) * 0.02
    ref = F.conv2d(x, weight, padding=24, groups=6)
    out = dwconv2d(x.to(dtype), weight.to(dtype), impl=impl)
    assert out.dtype == dtype
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < tol


def test_auto_rule_and_dispatch(monkeypatch):
    assert choose_impl(51, 51, 56, 56, needs_grad=True) == 'fft'
    assert choose_impl(51, 51, 56, 56, needs_grad=False) == 'fft'
    assert choose_impl(13, 13, 7, 7, needs_grad=True) == 'fft'
    assert choose_impl(13, 13, 7, 7, needs_grad=False) == 'native'
    assert choose_impl(47, 47, 14, 14, needs_grad=False) == 'native'  # forward only, small map
    assert choose_impl(11, 11, 56, 56, needs_grad=True) == 'native'
    assert choose_impl(47, 47, 3, 3, needs_grad=True) == 'native'  # cropped to 5x5
    calls = []
    monkeypatch.setattr(dwconv, 'dwconv2d_fft', lambda *a: calls.append('fft') or a[0])
    monkeypatch.setattr(dwconv, 'dwconv2d_native', lambda *a: calls.append('native') or a[0])
    x = torch.randn(1, 2, 7, 7)
    w = torch.randn(2, 1, 13, 13, requires_grad=True)
    dwconv.dwconv2d(x, w)
    with torch.no_grad():
        dwconv.dwconv2d(x, w)
    assert calls == ['fft', 'native']
    with pytest.raises(ValueError, match='impl'):
        dwconv.dwconv2d(x, w, impl='cudnn')


def test_fft_size_is_the_next_7_smooth_number():
    def smooth(n):
        for p in (2, 3, 5, 7):
            while n % p == 0:
                n //= p
        return n == 1

    for n in range(1, 300):
        m = fft_size(n)
        assert m >= n and smooth(m) and not any(smooth(j) for j in range(n, m))
    assert fft_size(81) == 81 and fft_size(106) == 108 and fft_size(13) == 14


def test_crop_kernel_rejects_even_kernels():
    with pytest.raises(ValueError, match='odd'):
        crop_kernel(torch.zeros(2, 1, 4, 4), 8, 8)


# ------------------------------------------------------------------------------------------------ KPE, partial conv
def _eq3(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, valid_only: bool) -> torch.Tensor:
    """Eq. 3 term by term: Y(p) = sum_taps w(t) * (X(p + t) + h(t)), over zero-padded taps too unless valid_only."""
    b, c, height, width = x.shape
    k = w.shape[-1]
    patches = F.unfold(x, k, padding=k // 2).view(b, c, k * k, height * width)
    inside = F.unfold(torch.ones(1, c, height, width, dtype=x.dtype), k, padding=k // 2).view(1, c, k * k, -1)
    added = h.reshape(1, c, k * k, 1) * (inside if valid_only else 1.0)
    return ((patches + added) * w.reshape(1, c, k * k, 1)).sum(2).view(b, c, height, width)


@pytest.mark.parametrize('mode', ['valid', 'all'])
@pytest.mark.parametrize('size', [(9, 9), (6, 11), (40, 40)])
def test_kpe_matches_equation_3(mode, size):
    torch.manual_seed(0)
    conv = PartialPeripheralConv(dim=4, kernel_size=15, conv_ratio=1.0, kpe_mode=mode).double()
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.zero_()
    h = torch.randn(4, 15, 15, dtype=torch.float64)
    x = torch.randn(2, *size, 4, dtype=torch.float64)  # NHWC
    got = conv(x, h).permute(0, 3, 1, 2)
    expected = _eq3(x.permute(0, 3, 1, 2), conv.expanded_weight(), h, valid_only=mode == 'valid')
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_kpe_valid_varies_at_borders_and_all_is_constant():
    torch.manual_seed(0)
    w, h = torch.randn(3, 1, 7, 7), torch.randn(3, 7, 7)
    const = kpe_bias(w, h, 20, 20, 'all')
    valid = kpe_bias(w, h, 20, 20, 'valid')
    assert const.shape == (3, 1, 1) and valid.shape == (3, 20, 20)
    torch.testing.assert_close(valid[:, 3:17, 3:17], const.expand(3, 14, 14))  # every tap inside
    assert (valid[:, 0, 0] - const[:, 0, 0]).abs().min() > 1e-4  # a corner sees a quarter of the taps
    with pytest.raises(ValueError, match='kpe'):
        kpe_bias(w, h, 20, 20, 'absolute')


def test_partial_conv_convolves_three_eighths_and_passes_the_rest():
    conv = PartialPeripheralConv(dim=16, kernel_size=13, kpe_mode='none')
    assert conv.conv_channels == 6
    x = torch.randn(2, 8, 8, 16)
    out = conv(x)
    assert torch.equal(out[..., 6:], x[..., 6:])
    ref = F.conv2d(x[..., :6].permute(0, 3, 1, 2), conv.expanded_weight(), conv.bias, padding=6, groups=6)
    torch.testing.assert_close(out[..., :6].permute(0, 3, 1, 2), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='conv_impl'):
        PartialPeripheralConv(dim=16, kernel_size=13, conv_impl='igemm')
    with pytest.raises(ValueError, match='kpe'):
        PartialPeripheralConv(dim=16, kernel_size=13, kpe_mode='learned')
    with pytest.raises(ValueError, match='conv_ratio'):
        PartialPeripheralConv(dim=2, kernel_size=13)


def test_one_kpe_per_stage_shared_by_its_blocks():
    model = _tiny(depths=(2, 1, 3, 1))
    kpes = {n: p for n, p in model.named_parameters() if 'kpe' in n}
    assert sorted(kpes) == [f'stages.{i}.kpe' for i in range(4)]
    assert kpes['stages.2.kpe'].shape == (24, 47, 47)  # int(3/8 * 64) channels, the stage's full kernel
    seen = []
    for blk in model.stages[2].blocks:
        blk.conv.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert len(seen) == 3 and all(t is kpes['stages.2.kpe'] for t in seen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in kpes.values())
    assert model.no_weight_decay() == set(kpes)
    assert not any('kpe' in n for n, _ in _tiny(kpe='none').named_parameters())


# ------------------------------------------------------------------------------------------------ model, timm
SIZES = {  # dense parameters (1000 classes); the paper counts 29M / 50M / 89M with SLaK's 40% sparsity
    'pelk_t': (48_649_606, 29e6),
    'pelk_s': (85_149_826, 50e6),
    'pelk_b': (149_978_012, 89e6),
}


@pytest.mark.parametrize('name', list(SIZES))
def test_registered_sizes_and_parameter_counts(name):
    dense, paper = SIZES[name]
    assert name in timm.list_models('pelk*')
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == dense
    # SLaK masks every 2-D / 4-D weight at 40% sparsity: the non-zero count is within 4% of the paper's
    masked = sum(p.numel() for p in model.parameters() if p.ndim in (2, 4))
    assert abs(dense - 0.4 * masked - paper) / paper < 0.04
    depths = [len(s.blocks) for s in model.stages]
    assert depths == ([3, 3, 9, 3] if name == 'pelk_t' else [3, 3, 27, 3])
    assert [s.blocks[0].conv.kernel_size for s in model.stages] == [51, 49, 47, 13]
    cfg = model.pretrained_cfg
    assert cfg['crop_pct'] == 0.875 and cfg['input_size'] == (3, 224, 224) and cfg['classifier'] == 'head.fc'


def test_conv_impls_give_the_same_model():
    ref = _tiny(conv_impl='native').eval()
    _randomize(ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
    for impl in ('fft', 'auto'):
        model = _tiny(conv_impl=impl).eval()
        model.load_state_dict(ref.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_forward_on_real_images_is_finite_and_per_sample():
    model = _tiny().eval()
    _randomize(model)
    x = _real_images(4, 64)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    assert batched.shape == (4, 10) and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
    assert batched.std(0).mean() > 0


def test_features_only_and_forward_intermediates():
    x = torch.randn(2, 3, 64, 64)
    feats = create_backbone('pelk_t', features_only=True, **{k: v for k, v in TINY.items() if k != 'num_classes'})
    assert [tuple(f.shape) for f in feats(x)] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    assert feats.feature_info.channels() == [16, 32, 64, 128]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    two = timm.create_model('pelk_t', features_only=True, out_indices=(1, 2), dims=TINY['dims'], depths=TINY['depths'])
    assert [tuple(f.shape) for f in two(x)] == [(2, 32, 8, 8), (2, 64, 4, 4)]
    assert len(two.model.stages) == 3  # pruned after the last requested stage

    model = _tiny().eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        nhwc = model.forward_intermediates(x, indices=[0, 3], output_fmt='NHWC', intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x))
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    assert len(inter) == 4 and final.shape == (2, 128, 2, 2)
    torch.testing.assert_close(nhwc[0].permute(0, 3, 1, 2), inter[0])
    torch.testing.assert_close(nhwc[1].permute(0, 3, 1, 2), inter[3])
    torch.testing.assert_close(early[0], inter[1])


def test_reset_classifier_and_pre_logits():
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    assert model.num_features == model.head_hidden_size == 128
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)


def test_layer_decay_groups_follow_forward_order():
    from pretrain.engine.optim import build_param_groups

    model = _tiny(depths=(1, 2, 1, 1))
    groups = build_param_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g['param_names']}
    assert sorted(by_name) == sorted(n for n, _ in model.named_parameters())
    scale = {n: g['lr_scale'] for n, g in by_name.items()}
    # stem, 5 blocks, head: 7 layer ids; the head gets 1, each block 0.5 ** (blocks after it)
    assert scale['stem.conv.weight'] == pytest.approx(0.5 ** 6)
    assert scale['stages.0.blocks.0.mlp.fc1.weight'] == pytest.approx(0.5 ** 5)
    assert scale['stages.1.blocks.1.mlp.fc1.weight'] == pytest.approx(0.5 ** 3)
    assert scale['stages.3.blocks.0.conv.weight'] == pytest.approx(0.5)
    assert scale['head.fc.weight'] == scale['head.norm.weight'] == 1.0
    for i in (1, 2, 3):  # downsampling and the KPE join their stage's first block
        first = scale[f'stages.{i}.blocks.0.mlp.fc1.weight']
        assert scale[f'stages.{i}.downsample.conv.weight'] == scale[f'stages.{i}.kpe'] == first
    assert by_name['stages.0.kpe']['weight_decay'] == 0.0
    assert by_name['stages.0.blocks.0.conv.weight']['weight_decay'] == 0.05
    assert by_name['stages.0.blocks.0.gamma']['weight_decay'] == 0.0
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 1 + 4 + 1


def _grads(model, x):
    model.zero_grad()
    torch.manual_seed(123)  # same drop-path masks; checkpointing replays the RNG state
    model(x).logsumexp(-1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('every', [1, 2])
def test_grad_checkpointing_gives_equal_grads_and_recomputes(every):
    model = _tiny(drop_path_rate=0.3).train()
    _randomize(model)
    x = torch.randn(2, 3, 64, 64)
    ref = _grads(model, x)
    model.set_grad_checkpointing(True, every=every)
    blocks = checkpointable_blocks(model)
    calls = [0] * len(blocks)
    for i, blk in enumerate(blocks):
        blk.conv.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    got = _grads(model, x)
    assert calls == [2 if i % every == 0 else 1 for i in range(len(blocks))]
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
    model.set_grad_checkpointing(False)
    assert not any('forward' in vars(b) for b in blocks)
    via_factory = create_backbone('pelk_t', grad_checkpointing=True, grad_checkpointing_every=2, **TINY)
    assert ['forward' in vars(b) for b in checkpointable_blocks(via_factory)] == [True, False, True, False, True]


def test_checkpoint_loading_through_create_backbone(tmp_path):
    src = _tiny()
    _randomize(src)
    path = tmp_path / 'w.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in src.state_dict().items()}}, path)
    dst = create_backbone('pelk_t', checkpoint_path=path, **TINY)
    assert dst.load_report.ok, str(dst.load_report)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    feats = create_backbone('pelk_t', features_only=True, checkpoint_path=path,
                            **{k: v for k, v in TINY.items() if k != 'num_classes'})
    report = feats.load_report
    assert not report.missing and not report.mismatched, str(report)
    assert report.unexpected and all(k.startswith('head.') for k in report.unexpected)
    assert load_checkpoint(dst, path).loaded == len(src.state_dict())


def test_invalid_per_stage_arguments_are_rejected():
    with pytest.raises(ValueError, match='kernel_sizes'):
        PeLK(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), kernel_sizes=(13, 13))
    with pytest.raises(TypeError):
        PeLK(not_an_arg=1)


# ------------------------------------------------------------------------------------------------ demo config
@pytest.mark.slow
def test_demo_config_trains_on_real_shards(shards, tmp_path):  # noqa: F811
    """configs/stage/pelk_demo.yaml, pointed at 32 real ImageNet photos, trains 3 steps (DeepSpeed ZeRO-2, bf16, one
    CPU process) and evaluates raw and EMA weights."""
    import yaml

    cfg = yaml.safe_load((REPO / 'configs' / 'stage' / 'pelk_demo.yaml').read_text())
    assert cfg['model']['name'] == 'pelk_t'
    cfg['data']['train'] = [{'name': 'in1k', 'urls': shards}]
    cfg['data']['val'] = [{'name': 'in1k', 'urls': shards}]
    cfg['run']['output_dir'] = str(tmp_path / 'run')
    path = tmp_path / 'pelk_demo.yaml'
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, '-m', 'pretrain', 'train', str(path), 'schedule.epochs=null',
                          'schedule.total_steps=3', 'logging.interval_steps=1'],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['step'] == 3 and summary['samples_seen'] == 3 * 8
    assert summary['eval']['raw']['images'] == 32 and summary['eval']['ema']['images'] == 32
    rows = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    train = [r for r in rows if r['split'] == 'train']
    assert len(train) == 3 and all(0 < r['loss']['ce'] < 20 and r['grad_norm'] > 0 for r in train)


def test_dense_masking_hides_the_masked_cells_from_pelk():
    """PeLK's blocks run channels-last (``block_layout = 'NHWC'``): with the image and every block input re-masked,
    nothing the network computes depends on what the masked cells contain, through 51x51 kernels too."""
    from pretrain.objectives.masking import block_layout
    from tests.test_objectives import assert_blind_to_masked_content

    model = _tiny().eval()
    assert block_layout(model) == 'NHWC'
    assert_blind_to_masked_content(model)
