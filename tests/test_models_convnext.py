"""create_backbone: ConvNeXt V1/V2 (timm) and InternImage through the same keys, checkpointing and layer decay."""
from __future__ import annotations

import os

import pytest
import torch

from pretrain.engine.optim import build_param_groups
from pretrain.models import (
    checkpointable_blocks,
    create_backbone,
    load_checkpoint,
    set_grad_checkpointing,
)

CORE_OP = os.environ.get('TEST_DCN_CORE_OP', 'DCNv3')
TINY_II = dict(core_op=CORE_OP, channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))
FAMILIES = {  # name: extra constructor kwargs (tiny widths so the tests stay fast)
    'convnext_atto': dict(),
    'convnextv2_atto': dict(),
    'internimage_t': TINY_II,
}


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _grads(model, x, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    model(x).logsumexp(-1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_convnext_v2_has_grn_and_v1_has_not():
    v1 = create_backbone('convnext_atto', num_classes=10)
    v2 = create_backbone('convnextv2_atto', num_classes=10)
    assert not any('grn' in n for n, _ in v1.named_parameters())
    assert any('mlp.grn' in n for n, _ in v2.named_parameters())


@pytest.mark.parametrize('name', list(FAMILIES))
@pytest.mark.parametrize('every', [1, 2])
def test_same_config_keys_and_checkpointing_grads_equal(name, every):
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=10, drop_path_rate=0.2, drop_rate=0.0, **FAMILIES[name]).train()
    x = torch.randn(2, 3, 64, 64)
    ref = _grads(model, x)
    set_grad_checkpointing(model, True, every=every)
    ckpt = _grads(model, x)
    assert ref.keys() == ckpt.keys() and len(ref) > 10
    for n in ref:
        torch.testing.assert_close(ckpt[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize('name', ['convnext_atto', 'convnextv2_atto'])
def test_convnext_checkpointing_recomputes_every_kth_block(name):
    model = create_backbone(name, num_classes=10, grad_checkpointing=True, grad_checkpointing_every=2).train()
    blocks = checkpointable_blocks(model)
    calls = [0] * len(blocks)
    for i, blk in enumerate(blocks):
        blk.conv_dw.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert calls == [2 if i % 2 == 0 else 1 for i in range(len(blocks))]
    keys_before = list(model.state_dict())
    set_grad_checkpointing(model, False)
    assert list(model.state_dict()) == keys_before  # wrapping never changes keys
    calls[:] = [0] * len(blocks)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert calls == [1] * len(blocks)


def test_with_cp_key_works_for_convnext_too():
    model = create_backbone('convnext_atto', num_classes=10, with_cp=True)
    assert all('forward' in vars(b) for b in checkpointable_blocks(model))


@pytest.mark.parametrize('name', [*FAMILIES, 'pelk_t', 'internimage_h'])
def test_metadata_describes_forward_features(name):
    """timm's contract, which the objectives build their heads from: ``num_features`` is the width of
    ``forward_features``'s map, ``output_stride`` its stride, ``head_hidden_size`` the pooled width."""
    from pretrain.models import output_stride

    small = {'pelk_t': dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
             'internimage_h': dict(TINY_II, channels=32, groups=(1, 2, 4, 8))}
    model = create_backbone(name, num_classes=10, **{**FAMILIES.get(name, {}), **small.get(name, {})}).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 64, 64))
        pooled = model.forward_head(feats, pre_logits=True)
    assert feats.shape[1] == model.num_features
    assert 64 // feats.shape[-1] == output_stride(model) == (16 if name == 'internimage_h' else 32)
    assert pooled.shape[1] == model.head_hidden_size


@pytest.mark.parametrize('name', list(FAMILIES))
def test_layer_decay_is_monotone_stem_to_head(name):
    """The trainer's own groups (pretrain.engine.optim.build_param_groups) for every family, and for timm's families
    the same lr scale and weight decay per parameter as timm's param_groups_layer_decay (a second implementation)."""
    model = create_backbone(name, num_classes=10, **FAMILIES[name])
    groups = build_param_groups(model, weight_decay=0.05, layer_decay=0.8)
    if 'convnext' in name:
        from timm.optim import param_groups_layer_decay

        def per_param(gs):
            return {id(p): (g['lr_scale'], g['weight_decay']) for g in gs for p in g['params']}
        assert per_param(groups) == per_param(param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.8))
    scale = {}
    for g in groups:
        for p in g['params']:
            scale[id(p)] = g['lr_scale']
    names = [n for n, _ in model.named_parameters()]
    assert len(scale) == len(names)
    ordered = [scale[id(p)] for _, p in model.named_parameters()]
    blocks = checkpointable_blocks(model)
    first_block = [scale[id(p)] for p in blocks[0].parameters()]
    last_block = [scale[id(p)] for p in blocks[-1].parameters()]
    assert max(first_block) < min(last_block)
    assert min(ordered) < 0.8 ** (len(blocks) - 2)  # the stem / first block is decayed through all blocks
    head_w = dict(model.named_parameters())['head.fc.weight' if 'convnext' in name else 'head.weight']
    assert scale[id(head_w)] == 1.0


@pytest.mark.parametrize('name', list(FAMILIES))
def test_features_only_and_checkpoint_path(name, tmp_path):
    feats = create_backbone(name, features_only=True, **FAMILIES[name])(torch.randn(1, 3, 64, 64))
    assert len(feats) == 4 and [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    src = create_backbone(name, num_classes=10, **FAMILIES[name])
    path = tmp_path / 'w.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in src.state_dict().items()}}, path)
    dst = create_backbone(name, num_classes=10, checkpoint_path=path, **FAMILIES[name])
    assert dst.load_report.ok, str(dst.load_report)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])
    assert load_checkpoint(dst, path).loaded == len(src.state_dict())


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match='unknown model'):
        create_backbone('internimage_zz')


def _to_fb_layout(sd: dict) -> dict:
    """timm ConvNeXt keys -> the original facebookresearch ConvNeXt V1/V2 release layout."""
    import re

    out = {}
    for k, v in sd.items():
        k = re.sub(r'^stem\.(\d)\.', r'downsample_layers.0.\1.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.(\d)\.', r'downsample_layers.\1.\2.', k)
        k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.', k)
        k = k.replace('conv_dw', 'dwconv').replace('mlp.fc1', 'pwconv1').replace('mlp.fc2', 'pwconv2')
        if 'mlp.grn.' in k:
            k = k.replace('mlp.grn.weight', 'grn.gamma').replace('mlp.grn.bias', 'grn.beta')
            v = v.reshape(1, 1, 1, -1)
        k = re.sub(r'^head\.norm\.', 'norm.', k)
        k = re.sub(r'^head\.fc\.', 'head.', k)
        out[k] = v
    return out


@pytest.mark.parametrize('name', ['convnext_atto', 'convnextv2_atto'])
def test_original_convnext_release_layout_loads(name, tmp_path):
    torch.manual_seed(0)
    src = create_backbone(name, num_classes=10)
    fb = _to_fb_layout(src.state_dict())
    assert 'downsample_layers.0.0.weight' in fb and not set(fb) & {'stem.0.weight', 'head.fc.weight'}
    path = tmp_path / 'fb.pth'
    torch.save({'model': {f'module.{k}': v for k, v in fb.items()}}, path)
    dst = create_backbone(name, num_classes=10, checkpoint_path=path)
    assert dst.load_report.ok, str(dst.load_report)
    assert any('checkpoint_filter_fn' in note for note in dst.load_report.layout)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


@pytest.mark.parametrize('name', list(FAMILIES))
def test_features_only_loads_a_full_checkpoint(name, tmp_path):
    src = create_backbone(name, num_classes=10, **FAMILIES[name])
    path = tmp_path / 'full.pth'
    torch.save({'model': src.state_dict()}, path)
    feats = create_backbone(name, features_only=True, checkpoint_path=path, **FAMILIES[name])
    report = feats.load_report
    assert not report.missing and not report.mismatched, str(report)
    assert report.unexpected and all('head' in k for k in report.unexpected)  # pruned classifier parts
    for k, v in feats.model.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
