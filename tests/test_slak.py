"""SLaK: keys, shapes and order against the official layout (tests/official_layouts.py), dense and non-zero parameter
counts against the paper, the decomposed kernel (two stripes + 5x5, each with BN) against a dense equivalent, the
release's renamed keys, SNIP layer densities, and 2 steps under ZeRO-3 on 2 ranks with 40% SNIP-initialised dynamic
sparsity, exported and loaded back in timm."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from pretrain.engine.sparsity import snip_densities, snip_scores
from pretrain.models import create_backbone
from pretrain.models.slak import DecomposedLargeKernelConv, parameter_counts
from tests.official_layouts import slak_layout
from tests.test_engine import shards  # noqa: F401  (real photos as tmp shards)
from tests.test_replknet import _randomize_bn, train_zero3_and_export

pytestmark = pytest.mark.usefixtures('one_torch_thread')

TINY = dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_classes=10)  # widths int(1.3 x): 10, 20, 31, 41
# name: (official arguments, dense params, non-zero params at 40%, the paper's non-zero count in millions)
SIZES = {
    'slak_t': (dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)), 50_703_838, 30_473_228, 30),
    'slak_s': (dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)), 91_131_820, 54_780_317, 55),
    'slak_b': (dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)), 157_950_792, 94_905_276, 95),
}


@pytest.mark.parametrize('name', list(SIZES))
def test_keys_shapes_order_and_param_counts_match_the_official_release(name):
    args, dense, nonzero, paper_m = SIZES[name]
    with torch.device('meta'):
        model = timm.create_model(name)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == \
        slak_layout(args['depths'], args['dims'], (51, 49, 47, 13, 5))
    assert [m.num_features for m in [model]] == [int(args['dims'][-1] * 1.3)]
    assert parameter_counts(model, 0.4) == (dense, nonzero)
    assert round(nonzero / 1e6) == paper_m  # SLaK's 30M / 55M / 95M count the non-zeros at 40% sparsity


def test_decomposed_kernel_equals_its_dense_sum():
    """Eval mode: LoRA1 (13x5) + LoRA2 (5x13) + small 5x5, each BN-folded and zero-padded to 13x13, summed = one
    dense 13x13 depth-wise conv; the stripes go through dwconv (native and FFT agree)."""
    torch.manual_seed(0)
    conv = DecomposedLargeKernelConv(6, 13, 5).eval().double()
    _randomize_bn(conv)
    x = torch.randn(2, 6, 20, 20, dtype=torch.float64)
    total = torch.zeros(6, 1, 13, 13, dtype=torch.float64)
    bias = torch.zeros(6, dtype=torch.float64)
    for branch in (conv.LoRA1, conv.LoRA2, conv.small_conv):
        bn = branch.bn
        t = bn.weight / (bn.running_var + bn.eps).sqrt()
        w = branch.conv.weight * t.view(-1, 1, 1, 1)
        kh, kw = w.shape[-2:]
        total += F.pad(w, ((13 - kw) // 2, (13 - kw) // 2, (13 - kh) // 2, (13 - kh) // 2))
        bias += bn.bias - bn.running_mean * t
    with torch.no_grad():
        expected = F.conv2d(x, total, bias, padding=6, groups=6)
        torch.testing.assert_close(conv(x), expected)
        for impl in ('native', 'fft'):
            conv.LoRA1.conv.conv_impl = conv.LoRA2.conv.conv_impl = impl
            torch.testing.assert_close(conv(x), expected)
    assert conv.LoRA1.conv.weight.shape == (6, 1, 13, 5) and conv.LoRA2.conv.weight.shape == (6, 1, 5, 13)


def test_checkpoints_with_decom_names_load():
    torch.manual_seed(0)
    src = timm.create_model('slak_t', **TINY)
    renamed = {k.replace('.LoRA1.', '.Decom1.').replace('.LoRA2.', '.Decom2.'): v for k, v in src.state_dict().items()}
    assert any('.Decom1.' in k for k in renamed)
    dst = timm.create_model('slak_t', **TINY)
    dst.load_state_dict(renamed, strict=True)
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


def test_snip_densities_are_a_global_top_k():
    scores = {'a': torch.tensor([[9.0, 1.0], [8.0, 2.0]]), 'b': torch.tensor([7.0, 6.0, 0.5, 0.1, 0.2, 5.0])}
    d = snip_densities(scores, 0.5)  # the 5 largest of 10: 9, 8, 7, 6, 5
    assert d == {'a': 0.5, 'b': 0.5}
    d = snip_densities(scores, 0.3)  # 9, 8, 7
    assert d == {'a': 0.5, 'b': pytest.approx(1 / 6)}
    total = sum(d[n] * s.numel() for n, s in scores.items())
    assert total == pytest.approx(3)


def test_snip_scores_are_weight_times_gradient():
    torch.manual_seed(0)
    model = timm.create_model('slak_t', **TINY)
    batch = {'image': torch.randn(2, 3, 32, 32), 'label': torch.tensor([1, 7])}
    names = ['stages.0.0.pwconv1.weight', 'stages.2.0.large_kernel.LoRA1.conv.weight']
    scores = snip_scores(model, names, batch)
    F.cross_entropy(model(batch['image']), batch['label']).backward()
    params = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(scores[n], (params[n] * params[n].grad).abs())
    with pytest.raises(ValueError, match='label'):
        snip_scores(model, names, {'image': batch['image']})


def test_timm_interface_and_checkpointing():
    x = torch.randn(2, 3, 64, 64)
    feats = create_backbone('slak_t', features_only=True, **{k: v for k, v in TINY.items() if k != 'num_classes'})
    assert [tuple(f.shape) for f in feats(x)] == [(2, 10, 16, 16), (2, 20, 8, 8), (2, 31, 4, 4), (2, 41, 2, 2)]
    model = create_backbone('slak_t', grad_checkpointing=True, drop_path_rate=0.1, **TINY).train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 41)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == 1 + 4 + 1  # stem, 4 blocks (downsampling joins its stage's first block), head


@pytest.mark.slow
@pytest.mark.dist
def test_trains_sparse_under_zero3_on_2_ranks_and_export_loads_in_timm(shards, tmp_path):  # noqa: F811
    """SLaK's released sparsity settings (40%, SNIP init, magnitude prune, random growth) through the config: the
    checkpointed masks hold 60% of every masked weight overall, with SNIP's non-uniform per-layer densities, and the
    exported weights are zero wherever the masks are off."""
    model = train_zero3_and_export('slak_t', dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1]), shards, tmp_path,
                                   sparsity={'enabled': True, 'sparsity': 0.4, 'init': 'snip',
                                             'update_interval_steps': 1, 'prune_rate': 0.3})
    trainer = torch.load(tmp_path / 'run' / 'checkpoints' / 'step_00000002' / 'trainer.pt', weights_only=False)
    masks = {k: m.bool() for k, m in trainer['sparsity']['masks'].items()}
    assert len(masks) == sum(1 for p in model.parameters() if p.ndim in (2, 4))
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(0.6, abs=0.01)
    densities = [float(m.float().mean()) for m in masks.values()]
    assert max(densities) - min(densities) > 0.1  # SNIP's per-layer densities, not one uniform value
    state = model.state_dict()
    for k, m in masks.items():
        assert (state[k][~m] == 0).all(), k


def test_demo_config_builds_with_the_released_sparsity():
    from pretrain.config import load_config
    from pretrain.models import backbone_from_config
    from tests.test_engine import REPO

    cfg = load_config(REPO / 'configs' / 'stage' / 'slak_demo.yaml')
    assert (cfg.sparsity.enabled, cfg.sparsity.sparsity, cfg.sparsity.init) == (True, 0.4, 'snip')
    with torch.device('meta'):
        model = backbone_from_config(cfg.model, num_classes=cfg.model.num_classes)
    assert model.num_features == int(128 * 1.3)
