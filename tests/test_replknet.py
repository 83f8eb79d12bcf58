"""RepLKNet: keys, shapes and order against the official layout (tests/official_layouts.py), parameter counts against
the paper, structural re-parameterisation (timm.utils.reparameterize_model) equal to the training form in eval mode
with non-trivial BatchNorm statistics, the deploy keys, the large-kernel paths, and the timm interface."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.utils import reparameterize_model

from pretrain.models import create_backbone
from pretrain.models.replknet import LargeDepthwiseConv, ReparamLargeKernelConv
from tests.official_layouts import replknet_layout
from tests.test_engine import shards  # noqa: F401  (real photos as tmp shards)

pytestmark = pytest.mark.usefixtures('one_torch_thread')

TINY = dict(layers=(1, 1, 2, 1), channels=(8, 16, 24, 32), num_classes=10)
# (registry name, official constructor arguments, params of the official model, paper's rounded params)
SIZES = {
    'replknet_31b': (dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024),
                          small_kernel=5), 79_864_168, 79_000_000),
    'replknet_31l': (dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(192, 384, 768, 1536),
                          small_kernel=5), 172_671_016, 172_000_000),
    'replknet_xl': (dict(large_kernel_sizes=(27, 27, 27, 13), layers=(2, 2, 18, 2), channels=(256, 512, 1024, 2048),
                         small_kernel=None, dw_ratio=1.5), 335_435_752, 335_000_000),
}


def _layout(model) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize('name', list(SIZES))
def test_keys_shapes_order_and_params_match_the_official_release(name):
    args, params, paper = SIZES[name]
    with torch.device('meta'):
        model = timm.create_model(name)
        merged = timm.create_model(name, small_kernel_merged=True)
    assert _layout(model) == replknet_layout(**args)
    assert _layout(merged) == replknet_layout(**args, small_kernel_merged=True)
    n = sum(p.numel() for p in model.parameters())
    assert n == params and n // 10**6 == paper // 10**6  # the README's 79M / 172M / 335M, truncated


def _randomize_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, and weights away from init."""
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)


@pytest.mark.parametrize('small_kernel', [5, None])
def test_reparameterized_model_equals_training_form_in_eval(small_kernel):
    torch.manual_seed(0)
    model = timm.create_model('replknet_31b', small_kernel=small_kernel, **TINY).eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    model = model.double()
    with torch.no_grad():
        ref = model(x)
    deploy = reparameterize_model(model)  # a copy; each ReparamLargeKernelConv.reparameterize()
    with torch.no_grad():
        got = deploy(x)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    assert not any('lkb_origin' in k or 'small_conv' in k for k in deploy.state_dict())
    official = timm.create_model('replknet_31b', small_kernel=small_kernel, small_kernel_merged=True, **TINY)
    assert _layout(deploy) == _layout(official)
    official.load_state_dict(deploy.state_dict())  # the deploy keys load into the directly built deploy form
    with torch.no_grad():
        torch.testing.assert_close(official.double().eval()(x), got)


def test_merged_kernel_is_the_folded_sum_of_both_branches():
    """Centre 5x5 taps of the merged kernel = folded large + folded small; outer taps = folded large only."""
    torch.manual_seed(0)
    conv = ReparamLargeKernelConv(4, 13, 5).eval()
    _randomize_bn(conv)
    for branch in (conv.lkb_origin, conv.small_conv):
        torch.nn.init.normal_(branch.conv.weight)
    t_l = conv.lkb_origin.bn.weight / (conv.lkb_origin.bn.running_var + 1e-5).sqrt()
    t_s = conv.small_conv.bn.weight / (conv.small_conv.bn.running_var + 1e-5).sqrt()
    large = conv.lkb_origin.conv.weight.detach() * t_l.detach().view(-1, 1, 1, 1)
    small = conv.small_conv.conv.weight.detach() * t_s.detach().view(-1, 1, 1, 1)
    bias = (conv.lkb_origin.bn.bias - conv.lkb_origin.bn.running_mean * t_l
            + conv.small_conv.bn.bias - conv.small_conv.bn.running_mean * t_s).detach()
    conv.reparameterize()
    w = conv.lkb_reparam.weight.detach()
    torch.testing.assert_close(w[..., 4:9, 4:9], large[..., 4:9, 4:9] + small)
    outer = torch.ones(13, 13, dtype=torch.bool)
    outer[4:9, 4:9] = False
    torch.testing.assert_close(w[..., outer], large[..., outer])
    torch.testing.assert_close(conv.lkb_reparam.bias.detach(), bias)
    conv.reparameterize()  # idempotent
    assert isinstance(conv.lkb_reparam, LargeDepthwiseConv)


def test_conv_impls_give_the_same_model():
    torch.manual_seed(0)
    ref = timm.create_model('replknet_31b', conv_impl='native', **TINY).eval()
    _randomize_bn(ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
    model = timm.create_model('replknet_31b', conv_impl='fft', **TINY).eval()
    model.load_state_dict(ref.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    large = [m for m in model.modules() if isinstance(m, LargeDepthwiseConv)]
    assert [m.kernel_size for m in large[:3]] == [(31, 31), (29, 29), (27, 27)] and len(large) == 5
    with pytest.raises(ValueError, match='conv_impl'):
        timm.create_model('replknet_31b', conv_impl='cuda', **TINY)


def test_timm_interface_features_and_checkpointing():
    x = torch.randn(2, 3, 64, 64)
    feats = create_backbone('replknet_31b', features_only=True, **{k: v for k, v in TINY.items() if k != 'num_classes'})
    assert [tuple(f.shape) for f in feats(x)] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 24, 4, 4), (2, 32, 2, 2)]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    model = create_backbone('replknet_31b', grad_checkpointing=True, drop_path_rate=0.1, **TINY).train()
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == 1 + 5 * 2 + 3 + 1  # stem, 10 blocks (RepLK + FFN per layer), 3 transitions, head norm


# ------------------------------------------------------------------------------------------------ DeepSpeed + export
def train_zero3_and_export(name: str, model_kwargs: dict, urls: str, tmp_path, deploy: bool = False,
                           **sections) -> torch.nn.Module:
    """2 steps of ``name`` on 2 CPU ranks under ZeRO-3 (real photo shards), ``python -m pretrain export --format timm``
    (``--deploy`` if asked), then ``timm.create_model('local-dir:...', pretrained=True)``; returns that model after
    checking that its tensors equal the exported file's and that it classifies the shards' size."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.test_engine import REPO, _env, run_procs, stage_config

    cfg = stage_config(tmp_path / 'stage.yaml', urls, tmp_path / 'run',
                       model={'name': name, 'num_classes': 200, 'drop_path_rate': 0.1, 'kwargs': model_kwargs},
                       deepspeed={'zero_stage': 3, 'precision': 'fp32', 'micro_batch_size': 4},
                       schedule={'total_steps': 2, 'warmup_steps': 1, 'lr_scale_by_batch': False},
                       checkpoint={'interval_steps': 2, 'keep_last': 1}, data={'val': []}, **sections)
    run_procs(2, ['-m', 'pretrain', 'train', str(cfg)], timeout=900)
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['step'] == 2
    out = tmp_path / 'export_timm'
    res = subprocess.run([sys.executable, '-m', 'pretrain', 'export', str(tmp_path / 'run'), '--format', 'timm',
                          '--out', str(out), *(['--deploy'] if deploy else [])],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import pretrain.models  # noqa: F401  (registers the models with timm)

    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    saved = load_file(str(out / 'model.safetensors'))
    state = model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 200)
    return model


@pytest.mark.slow
@pytest.mark.dist
def test_trains_under_zero3_on_2_ranks_and_deploy_export_loads_in_timm(shards, tmp_path):  # noqa: F811
    model = train_zero3_and_export('replknet_31b', dict(layers=[1, 1, 1, 1], channels=[8, 16, 24, 32]), shards,
                                   tmp_path, deploy=True)
    keys = list(model.state_dict())
    assert any(k.endswith('large_kernel.lkb_reparam.bias') for k in keys)
    assert not any('lkb_origin' in k or 'small_conv' in k for k in keys)


def test_demo_config_builds():
    from pretrain.config import load_config
    from pretrain.models import backbone_from_config
    from tests.test_engine import REPO

    cfg = load_config(REPO / 'configs' / 'stage' / 'replknet_demo.yaml')
    with torch.device('meta'):
        model = backbone_from_config(cfg.model, num_classes=cfg.model.num_classes)
    assert [len(s.blocks) for s in model.stages] == [2, 2, 4, 2] and model.num_features == 128
