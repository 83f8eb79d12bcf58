"""InternImage: official keys/shapes/counts for every size, forward semantics, init, timm interface, checkpointing."""
from __future__ import annotations

import ast
import math
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import pretrain.models as pm
from pretrain.models import InternImage
from tests.dcnv3_cases import official_dcnv3_core

REPO = Path(__file__).resolve().parents[1]
SPEC_KEYS = REPO.parent / 'shared' / 'spec' / 'internimage_state_dict_keys'
REAL_IMAGES = REPO.parent / 'shared' / 'data' / 'real' / 'imagenet-1k-samples'
# 'DCNv3' -> backend 'auto' (fused kernel when built); set TEST_DCN_CORE_OP=DCNv3_pytorch to force the reference.
CORE_OP = os.environ.get('TEST_DCN_CORE_OP', 'DCNv3')

SIZES = {  # name: (tsv suffix, official parameter count with 1000 classes)
    'internimage_t': ('T', 29_918_424),
    'internimage_s': ('S', 50_079_880),
    'internimage_b': ('B', 97_461_832),
    'internimage_l': ('L', 223_334_810),
    'internimage_xl': ('XL', 334_819_780),
    'internimage_h': ('H', 1_089_636_760),
    'internimage_g': ('G', 3_076_373_352),
}

TINY = dict(core_op=CORE_OP, channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), num_classes=10,
            drop_path_rate=0.0)
VARIANTS = {  # the norm-placement / head variants of the official sizes, at tiny width
    'T_prenorm': dict(),
    'SBLXL_postnorm_layerscale': dict(layer_scale=1e-5, post_norm=True, offset_scale=2.0),
    'prenorm_layerscale': dict(layer_scale=0.5),
    'H_resPostNorm_clip': dict(dw_kernel_size=5, res_post_norm=True, level2_post_norm=True,
                               level2_post_norm_block_ids=(1,), center_feature_scale=True, use_clip_projector=True),
    'G_postnorm_clip': dict(dw_kernel_size=5, post_norm=True, level2_post_norm=True, level2_post_norm_block_ids=(0, 1),
                            center_feature_scale=True, use_clip_projector=True),
    'remove_center': dict(remove_center=True),
}


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _spec_keys(suffix: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = (line.rstrip('\n').split('\t') for line in (SPEC_KEYS / f'internimage_{suffix}_1000cls_keys.tsv').open())
    return [(k, tuple(ast.literal_eval(shape))) for k, shape in rows]


def _tiny(**kwargs) -> InternImage:
    torch.manual_seed(0)
    return InternImage(**{**TINY, **kwargs})


def _randomize(model: torch.nn.Module) -> None:
    """Move all parameters away from their init (zero offsets, unit norms ...) so every path is exercised."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def _real_images(n: int, size: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(REAL_IMAGES.glob('*.JPEG'))[:n]
    assert len(files) == n, f'expected {n} real images in {REAL_IMAGES}'
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    out = []
    for f in files:
        img = Image.open(f).convert('RGB').resize((size, size), Image.BICUBIC)
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
        out.append((t.float() / 255 - mean) / std)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ keys / counts
@pytest.mark.parametrize('name', list(SIZES))
def test_state_dict_keys_shapes_and_param_count_match_official(name):
    suffix, count = SIZES[name]
    with torch.device('meta'):
        model = timm.create_model(name)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = _spec_keys(suffix)
    assert {k for k, _ in got} == {k for k, _ in expected}, (
        f'extra {sorted({k for k, _ in got} - {k for k, _ in expected})[:5]}, '
        f'missing {sorted({k for k, _ in expected} - {k for k, _ in got})[:5]}')
    assert got == expected  # same shapes, same order
    assert sum(p.numel() for p in model.parameters()) == count


def test_core_op_names_map_to_backends_and_unknown_rejected():
    assert pm.internimage.CORE_OP_BACKENDS == {'DCNv3': 'auto', 'DCNv3_pytorch': 'pytorch'}
    with pytest.raises(ValueError, match='core_op'):
        InternImage(core_op='DCNv4', channels=16, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8))
    with pytest.raises(TypeError):
        InternImage(channels=16, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8), not_an_arg=1)


def test_drop_path_schedule_linear_and_uniform():
    model = _tiny(drop_path_rate=0.4, depths=(1, 1, 2, 1))
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for lvl in model.levels for b in lvl.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    model = _tiny(drop_path_rate=0.4, drop_path_type='uniform')
    rates = [b.drop_path.drop_prob for lvl in model.levels for b in lvl.blocks]
    assert rates == pytest.approx([0.4] * 5)


# ------------------------------------------------------------------------------------------------ init
def test_official_initialisation():
    torch.manual_seed(0)
    model = InternImage(core_op=CORE_OP, channels=64, depths=(1, 1, 2, 1), groups=(4, 8, 16, 32), layer_scale=1e-5,
                        center_feature_scale=True, post_norm=True, num_classes=1000)
    layer = model.levels[2].blocks[0]
    dcn = layer.dcn
    for t in (dcn.offset.weight, dcn.offset.bias, dcn.mask.weight, dcn.mask.bias, dcn.input_proj.bias,
              dcn.output_proj.bias, dcn.center_feature_scale_proj_weight, dcn.center_feature_scale_proj_bias):
        assert torch.count_nonzero(t) == 0
    # xavier_uniform on input/output projections: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)).
    w = dcn.input_proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # trunc_normal(std .02) on every other Linear, zero bias.
    for lin in (layer.mlp.fc1, layer.mlp.fc2, model.head):
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.count_nonzero(lin.bias) == 0
    assert torch.all(layer.gamma1 == 1e-5) and torch.all(layer.gamma2 == 1e-5)
    for ln in (layer.norm1[0], layer.norm2[0], model.levels[0].downsample.norm[1]):
        assert torch.all(ln.weight == 1) and torch.count_nonzero(ln.bias) == 0
        assert ln.eps == 1e-6
    # Conv2d keeps the PyTorch default (kaiming_uniform a=sqrt(5) -> U(+-1/sqrt(fan_in))), not trunc_normal.
    conv = model.patch_embed.conv2.weight
    assert conv.abs().max() <= 1 / math.sqrt(conv[0].numel()) + 1e-6
    assert conv.std().item() > 0.03


def test_init_dcn_is_box_filter_of_input_projection():
    """At init (zero offsets, uniform mask) every DCNv3 is a 3x3 box filter of input_proj(x) (zero padded)."""
    model = _tiny()
    dcn = model.levels[0].blocks[0].dcn
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        got = dcn(x)
        v = dcn.input_proj(x).permute(0, 3, 1, 2)
        box = F.avg_pool2d(v, 3, stride=1, padding=1, count_include_pad=True).permute(0, 2, 3, 1)
        expected = dcn.output_proj(box)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ semantics
# ------------------------------------------------------------------------------------------------ the official forward
# An independent transcription of the official forward from ../shared/spec/official-internimage.md (§2.3, §2.4, §3.1),
# in float64 on the state_dict tensors alone: no submodule of the model runs, the branches follow the constructor
# arguments (not the model's flags), and DCNv3's core is the official algorithm the DCNv3 tests use
# (tests/dcnv3_cases.official_dcnv3_core).
def _ln(x: torch.Tensor, sd: dict, key: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f'{key}.weight'], sd[f'{key}.bias'], eps=1e-6)


def _linear(x: torch.Tensor, sd: dict, key: str) -> torch.Tensor:
    return F.linear(x, sd[f'{key}.weight'], sd.get(f'{key}.bias'))


def _official_dcnv3(x: torch.Tensor, sd: dict, key: str, group: int, kw: dict) -> torch.Tensor:
    """The official ``DCNv3.forward`` (spec §3.1) on NHWC ``x``: kernel 3, stride 1, pad 1, dilation 1."""
    n, h, w, c = x.shape
    dw = sd[f'{key}.dw_conv.0.weight']
    x_proj = _linear(x, sd, f'{key}.input_proj')
    x1 = F.conv2d(x.permute(0, 3, 1, 2), dw, sd[f'{key}.dw_conv.0.bias'], padding=(dw.shape[-1] - 1) // 2, groups=c)
    x1 = F.gelu(_ln(x1.permute(0, 2, 3, 1), sd, f'{key}.dw_conv.1.1'))
    points = 9 - int(kw.get('remove_center', False))
    offset = _linear(x1, sd, f'{key}.offset')
    mask = _linear(x1, sd, f'{key}.mask').reshape(n, h, w, group, points).softmax(-1).reshape(n, h, w, -1)
    out = official_dcnv3_core(x_proj, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, group, c // group,
                              kw.get('offset_scale', 1.0), kw.get('remove_center', False))
    if kw.get('center_feature_scale', False):
        scale = torch.sigmoid(F.linear(x1, sd[f'{key}.center_feature_scale_proj_weight'],
                                       sd[f'{key}.center_feature_scale_proj_bias']))
        scale = scale[..., None].repeat(1, 1, 1, 1, c // group).flatten(-2)
        out = out * (1 - scale) + x_proj * scale
    return _linear(out, sd, f'{key}.output_proj')


def _official_layer(x: torch.Tensor, sd: dict, key: str, group: int, kw: dict) -> torch.Tensor:
    """The official ``InternImageLayer._inner_forward`` (spec §2.4; eval, so drop path is the identity)."""
    def dcn(t):
        return _official_dcnv3(t, sd, f'{key}.dcn', group, kw)

    def mlp(t):
        return _linear(F.gelu(_linear(t, sd, f'{key}.mlp.fc1')), sd, f'{key}.mlp.fc2')

    def norm(t, name):
        return _ln(t, sd, f'{key}.{name}.0')

    if kw.get('layer_scale') is not None:
        g1, g2 = sd[f'{key}.gamma1'], sd[f'{key}.gamma2']
        if kw.get('post_norm', False):
            x = x + g1 * norm(dcn(x), 'norm1')
            return x + g2 * norm(mlp(x), 'norm2')
        x = x + g1 * dcn(norm(x, 'norm1'))
        return x + g2 * mlp(norm(x, 'norm2'))
    if kw.get('post_norm', False):
        x = x + norm(dcn(x), 'norm1')
        return x + norm(mlp(x), 'norm2')
    if kw.get('res_post_norm', False):
        x = x + norm(dcn(norm(x, 'norm1')), 'res_post_norm1')
        return x + norm(mlp(norm(x, 'norm2')), 'res_post_norm2')
    x = x + dcn(norm(x, 'norm1'))
    return x + mlp(norm(x, 'norm2'))


def _official_forward(sd: dict, kw: dict, x: torch.Tensor) -> torch.Tensor:
    """The official classifier forward (spec §2.3: stem, levels, then ``conv_head`` or ``forward_clip_projector``)
    with the weights ``sd`` of an ``InternImage(**kw)``, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(x.double(), sd['patch_embed.conv1.weight'], sd['patch_embed.conv1.bias'], stride=2, padding=1)
    x = F.gelu(_ln(x.permute(0, 2, 3, 1), sd, 'patch_embed.norm1.1')).permute(0, 3, 1, 2)
    x = F.conv2d(x, sd['patch_embed.conv2.weight'], sd['patch_embed.conv2.bias'], stride=2, padding=1)
    x = _ln(x.permute(0, 2, 3, 1), sd, 'patch_embed.norm2.1')
    outs = []
    levels = len(kw['depths'])
    for i, (depth, group) in enumerate(zip(kw['depths'], kw['groups'])):
        post_ids = list(kw.get('level2_post_norm_block_ids') or []) if kw.get('level2_post_norm') and i == 2 else []
        for j in range(depth):
            x = _official_layer(x, sd, f'levels.{i}.blocks.{j}', group, kw)
            if j in post_ids:
                x = _ln(x, sd, f'levels.{i}.post_norms.{post_ids.index(j)}.0')
        if not kw.get('post_norm', False) or kw.get('center_feature_scale', False):
            x = _ln(x, sd, f'levels.{i}.norm.0')
        outs.append(x)
        if i < levels - 1:
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[f'levels.{i}.downsample.conv.weight'], stride=2, padding=1)
            x = _ln(x.permute(0, 2, 3, 1), sd, f'levels.{i}.downsample.norm.1')
    if not kw.get('use_clip_projector', False):
        x = F.conv2d(outs[-1].permute(0, 3, 1, 2), sd['conv_head.0.weight'])
        x = F.batch_norm(x, sd['conv_head.1.0.running_mean'], sd['conv_head.1.0.running_var'],
                         sd['conv_head.1.0.weight'], sd['conv_head.1.0.bias'], training=False, eps=1e-5)
        return _linear(F.gelu(x).mean((2, 3)), sd, 'head')
    x4 = F.pixel_shuffle(F.conv2d(outs[3].permute(0, 3, 1, 2), sd['dcnv3_head_x4.0.weight'],
                                  sd['dcnv3_head_x4.0.bias']), 2)
    x = x4 + F.conv2d(outs[2].permute(0, 3, 1, 2), sd['dcnv3_head_x3.weight'], sd['dcnv3_head_x3.bias'])
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, 1024)
    cp = 'clip_projector'
    q = _ln(tokens.mean(1, keepdim=True), sd, f'{cp}.norm1_q.0')
    k, v = _ln(tokens, sd, f'{cp}.norm1_k.0'), _ln(tokens, sd, f'{cp}.norm1_v.0')
    b, n, dim = k.shape
    heads = 16  # the official attnpool_num_heads
    q = F.linear(q, sd[f'{cp}.cross_dcn.q.weight'], sd[f'{cp}.cross_dcn.q_bias']).view(b, 1, heads, -1)
    k = F.linear(k, sd[f'{cp}.cross_dcn.k.weight'], sd[f'{cp}.cross_dcn.k_bias']).view(b, n, heads, -1)
    v = F.linear(v, sd[f'{cp}.cross_dcn.v.weight'], sd[f'{cp}.cross_dcn.v_bias']).view(b, n, heads, -1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    attn = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    pooled = _linear((attn @ v).transpose(1, 2).reshape(b, 1, -1), sd, f'{cp}.cross_dcn.proj').squeeze(1)
    return _linear(_ln(pooled, sd, 'fc_norm.0'), sd, 'head')


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_forward_matches_official_semantics(variant):
    model = _tiny(**VARIANTS[variant]).eval()
    _randomize(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = model(x)
        expected = _official_forward(model.state_dict(), {**TINY, **VARIANTS[variant]}, x)
    assert got.shape == (2, 10)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_variant_dispatch_is_not_degenerate():
    """The variants really differ (guards the reference test against all branches collapsing to one)."""
    x = torch.randn(1, 3, 32, 32)
    outs = {}
    for name in ('T_prenorm', 'SBLXL_postnorm_layerscale', 'prenorm_layerscale'):
        model = _tiny(**VARIANTS[name]).eval()
        _randomize(model)
        with torch.no_grad():
            outs[name] = model.levels[0].blocks[0](model.patch_embed(x))
    vals = list(outs.values())
    assert not torch.allclose(vals[0], vals[1]) and not torch.allclose(vals[0], vals[2])


def test_h_head_uses_stage3_and_upsampled_stage4():
    model = _tiny(**VARIANTS['H_resPostNorm_clip']).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1024, 4, 4)  # stride 16
    assert model.forward_head(feats, pre_logits=True).shape == (2, 768)
    assert isinstance(model.dcnv3_head_x4[1], torch.nn.PixelShuffle)
    assert not hasattr(model, 'conv_head')


# ------------------------------------------------------------------------------------------------ real images
def test_tiny_forward_on_real_images_is_finite_and_per_sample():
    x = _real_images(4, 64)
    for variant in ('T_prenorm', 'G_postnorm_clip'):
        model = _tiny(**VARIANTS[variant]).eval()
        _randomize(model)
        with torch.no_grad():
            batched = model(x)
            single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        assert torch.isfinite(batched).all()
        torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
        assert batched.std(0).mean() > 0  # different images give different logits


@pytest.mark.slow
def test_internimage_t_forward_backward_real_images_224():
    model = timm.create_model('internimage_t', core_op=CORE_OP, num_classes=1000)
    x = _real_images(2, 224)
    out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ checkpointing
@pytest.mark.parametrize('variant', ['T_prenorm', 'SBLXL_postnorm_layerscale', 'H_resPostNorm_clip'])
@pytest.mark.parametrize('every', [1, 2])
def test_grad_checkpointing_gives_equal_grads(variant, every):
    model = _tiny(**{**VARIANTS[variant], 'drop_path_rate': 0.3}).train()
    _randomize(model)
    x = _real_images(2, 64)

    def grads():
        model.zero_grad()
        torch.manual_seed(123)  # same drop-path masks in both runs; checkpoint replays the RNG state
        model(x).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = grads()
    model.set_grad_checkpointing(True, every=every)
    flags = [b.grad_checkpointing for lvl in model.levels for b in lvl.blocks]
    assert flags == [i % every == 0 for i in range(len(flags))] and model.stem_checkpointing
    ckpt = grads()
    for n in ref:
        torch.testing.assert_close(ckpt[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
    model.set_grad_checkpointing(False)
    assert not any(b.grad_checkpointing for lvl in model.levels for b in lvl.blocks)
    assert not model.stem_checkpointing


def test_checkpointing_recomputes_blocks_and_with_cp_enables_it():
    model = _tiny(with_cp=True).train()
    assert all(b.grad_checkpointing for lvl in model.levels for b in lvl.blocks)
    calls = []
    model.levels[0].blocks[0].dcn.register_forward_hook(lambda *a: calls.append('dcn'))
    model.patch_embed.conv1.register_forward_hook(lambda *a: calls.append('stem'))
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert sorted(calls) == ['dcn', 'dcn', 'stem', 'stem']  # forward + recompute in backward
    calls.clear()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert sorted(calls) == ['dcn', 'stem']
    # a BatchNorm stem is never recomputed (its running statistics would be updated twice)
    bn = InternImage(**{**TINY, 'norm_layer': 'BN'})
    bn.set_grad_checkpointing(True)
    assert not bn.stem_checkpointing and bn.levels[0].blocks[0].grad_checkpointing


# ------------------------------------------------------------------------------------------------ timm interface
@pytest.mark.parametrize('name', list(SIZES))
def test_timm_create_model_and_pretrained_cfg(name):
    assert name in timm.list_models('internimage*')
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=21841, drop_path_rate=0.0)
    assert model.head.out_features == 21841
    cfg = model.pretrained_cfg
    assert cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)
    assert cfg['url'].startswith('https://huggingface.co/OpenGVLab/InternImage/') and cfg['url'].endswith('.pth')
    size = {'internimage_h': 640, 'internimage_g': 512, 'internimage_l': 384, 'internimage_xl': 384}.get(name, 224)
    assert cfg['input_size'] == (3, size, size)


def test_features_only_and_forward_intermediates():
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model('internimage_t', features_only=True, core_op=CORE_OP, channels=16,
                              depths=(1, 1, 1, 1), groups=(1, 2, 4, 8))
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    model = timm.create_model('internimage_t', features_only=True, out_indices=(1, 2), core_op=CORE_OP,
                              channels=16, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8))
    assert [tuple(f.shape) for f in model(x)] == [(2, 32, 8, 8), (2, 64, 4, 4)]
    assert len(model.model.levels) == 3  # pruned after the last requested level

    full = _tiny().eval()
    with torch.no_grad():
        final, inter = full.forward_intermediates(x)
        nhwc = full.forward_intermediates(x, indices=[0, 3], output_fmt='NHWC', intermediates_only=True)
        seq = full.forward_features_seq_out(x)
        torch.testing.assert_close(final, full.forward_features(x))
    torch.testing.assert_close(inter[3], seq[3].permute(0, 3, 1, 2))
    torch.testing.assert_close(nhwc[0], seq[0])
    assert len(inter) == 4 and len(nhwc) == 2


def test_reset_classifier_and_pre_logits():
    model = _tiny()
    model.reset_classifier(7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, int(128 * 1.5))
    clip = _tiny(**VARIANTS['G_postnorm_clip'])
    clip.reset_classifier(5)
    assert clip.head.in_features == 768 and clip(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_group_matcher_gives_official_layer_decay():
    """timm's layer decay with our group_matcher reproduces the official ``lr_decay_keywords`` scales."""
    from timm.optim import param_groups_layer_decay

    model = _tiny(**VARIANTS['H_resPostNorm_clip'])
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.9)
    scale = {n: g['lr_scale'] for g in groups for n, p in model.named_parameters() if any(p is q for q in g['params'])}
    assert set(scale) == {n for n, _ in model.named_parameters()}
    depths = TINY['depths']
    n_blocks = sum(depths)
    # official: block k (0-based, forward order) gets ratio ** (n_blocks - 1 - k)
    k = 0
    for i, d in enumerate(depths):
        for j in range(d):
            assert scale[f'levels.{i}.blocks.{j}.mlp.fc1.weight'] == pytest.approx(0.9 ** (n_blocks - 1 - k))
            k += 1
    assert scale['patch_embed.conv1.weight'] == pytest.approx(0.9 ** (n_blocks - 1))
    assert scale['levels.0.downsample.conv.weight'] == scale['levels.1.blocks.0.mlp.fc1.weight']
    assert scale['levels.2.norm.0.weight'] == scale['levels.3.blocks.0.mlp.fc1.weight']
    for name in ('levels.3.norm.0.weight', 'levels.2.post_norms.0.0.weight', 'head.weight',
                 'clip_projector.cross_dcn.q.weight', 'dcnv3_head_x3.weight', 'fc_norm.0.weight'):
        assert scale[name] == 1.0, name
    # no weight decay on 1-D params and biases
    for g in groups:
        if g['weight_decay'] > 0:
            assert all(p.ndim > 1 for p in g['params'])
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 1 + len(depths) + 1


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('variant', ['T_prenorm', 'H_resPostNorm_clip'])
def test_cuda_kernel_model_matches_reference_model(variant):
    """Same weights, core_op 'DCNv3' (CUDA kernel) vs 'DCNv3_pytorch': outputs and grads agree; checkpointing too.
    In full float32: cuDNN's default TF32 convolutions round their inputs to 10 mantissa bits, which turns the two
    operators' ~1e-7 summation-order differences into ~1e-3 ones through a deep net."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _compare_cuda_kernel_model_with_reference(variant)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _compare_cuda_kernel_model_with_reference(variant):
    fused = _tiny(**VARIANTS[variant], core_op='DCNv3').cuda().train()
    _randomize(fused)
    ref = _tiny(**VARIANTS[variant], core_op='DCNv3_pytorch').cuda().train()
    ref.load_state_dict(fused.state_dict())
    torch.manual_seed(2)
    x = torch.randn(4, 3, 64, 64, device='cuda')  # device machines may not have ../shared

    def run(model):
        model.zero_grad()
        out = model(x)
        out.logsumexp(-1).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_f, g_f = run(fused)
    out_r, g_r = run(ref)
    torch.testing.assert_close(out_f, out_r, rtol=1e-3, atol=1e-3)
    for n in g_r:
        torch.testing.assert_close(g_f[n], g_r[n], rtol=1e-2, atol=1e-3, msg=n)
    fused.set_grad_checkpointing(True)
    out_c, g_c = run(fused)
    torch.testing.assert_close(out_c, out_f)
    # float32 atomics (the DCN backward's grad_input scatter, cuDNN's weight gradients) add in a different order on
    # every run, so compare each gradient by its norm-relative error (on the CPU the same check is bitwise).
    for n in g_f:
        rel = ((g_c[n] - g_f[n]).norm() / g_f[n].norm().clamp_min(1e-12)).item()
        assert rel < 1e-5, f'{n}: checkpointed gradient differs by {rel:.2e} (relative norm)'
    with torch.autocast('cuda', dtype=torch.float16):
        assert torch.isfinite(fused(x)).all()
