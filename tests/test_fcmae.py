"""ConvNeXt V2 FCMAE: the pixel loss on masked patches, dense masking of ConvNeXt V2 with GRN statistics over the
visible positions (also under activation checkpointing), which parameters the objective trains, the mask it shares
with MIM, and the demo stage on the real photos."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from pretrain.config import ObjectiveConfig, build_dataclass
from tests.test_objectives import _grads, _rows, _run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / 'configs' / 'stage' / 'fcmae_convnextv2_demo.yaml'


def tiny_convnextv2(conv_mlp: bool = True, num_classes: int = 0, **kwargs):
    """A ConvNeXt V2 small enough for the CPU: atto's layout (1x1-conv MLP, NCHW GRN) or, with ``conv_mlp=False``,
    tiny's and larger (Linear MLP, channels-last GRN)."""
    from pretrain.models import create_backbone

    torch.manual_seed(0)
    return create_backbone('convnextv2_atto', num_classes=num_classes, dims=(8, 16, 32, 64), depths=(1, 1, 2, 1),
                           conv_mlp=conv_mlp, drop_path_rate=0.0, **kwargs)


def fcmae_model(num_classes: int = 0, **sections):
    from pretrain.objectives import M3IModel

    base = {'kind': 'multi', 'supervised': {'weight': 1.0 if num_classes else 0.0}, 'contrastive': {'weight': 0.0},
            'mim': {'weight': 0.0}, 'fcmae': {'weight': 1.0, 'decoder_dim': 32}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    backbone = tiny_convnextv2(num_classes=num_classes)
    torch.manual_seed(1)
    return M3IModel(backbone, build_dataclass(ObjectiveConfig, base))


def grid_mask(batch: int, seed: int, grid: int = 2, ratio: float = 0.5) -> torch.Tensor:
    from pretrain.objectives.masking import random_grid_mask

    return random_grid_mask(batch, (grid, grid), ratio, torch.Generator().manual_seed(seed))


def pixel_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    from pretrain.objectives.masking import upsample_mask

    return upsample_mask(mask, (size, size))[:, None]


# ----------------------------------------------------------------------------------------------------------------
# the loss


def test_fcmae_loss_is_the_norm_pix_mse_of_the_masked_patches():
    """Against the loss written patch by patch: each 32x32x3 patch in (row, column, channel) order, normalised by
    its mean and unbiased variance, MSE per patch, mean over the masked patches."""
    from pretrain.objectives.fcmae import fcmae_loss
    from pretrain.objectives.masking import random_grid_mask

    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96, generator=g) * 2 + 0.5
    pred = torch.randn(2, 32 * 32 * 3, 2, 3, generator=g)
    mask = random_grid_mask(2, (2, 3), 0.5, g)
    for norm_pix in (True, False):
        per_patch, weights = [], []
        for b in range(2):
            for i in range(2):
                for j in range(3):
                    t = images[b, :, i * 32:(i + 1) * 32, j * 32:(j + 1) * 32].permute(1, 2, 0).reshape(-1)
                    if norm_pix:
                        t = (t - t.mean()) / (t.var() + 1e-6) ** 0.5
                    per_patch.append(((pred[b, :, i, j] - t) ** 2).mean())
                    weights.append(mask[b, i, j])
        ref = (torch.stack(per_patch) * torch.stack(weights)).sum() / torch.stack(weights).sum()
        torch.testing.assert_close(fcmae_loss(pred, images, mask, norm_pix), ref, rtol=1e-5, atol=1e-6)


def test_fcmae_loss_ignores_visible_patches():
    from pretrain.objectives.fcmae import fcmae_loss

    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 64, 64, generator=g)
    pred = torch.randn(3, 32 * 32 * 3, 2, 2, generator=g)
    mask = grid_mask(3, 2)
    up = pixel_mask(mask, 64)
    loss = fcmae_loss(pred, images, mask)
    noise = torch.randn(images.shape, generator=g)
    torch.testing.assert_close(fcmae_loss(pred, images + noise * (1 - up), mask), loss, rtol=0, atol=0)
    assert not torch.allclose(fcmae_loss(pred, images + noise * up, mask), loss)


def test_fcmae_part_of_the_model_is_the_loss_of_its_decoder_on_the_masked_features():
    from pretrain.objectives.fcmae import fcmae_loss
    from pretrain.objectives.masking import dense_masking

    model = fcmae_model().eval()
    x = torch.randn(2, 3, 64, 64)
    mask = grid_mask(2, 3)
    assert model.fcmae_decoder.pred.out_channels == 32 * 32 * 3
    with torch.no_grad():
        parts = model(x, mask=mask)
        with dense_masking(model.backbone, mask):
            feats = model.backbone.forward_features(x * (1 - pixel_mask(mask, 64)))
        ref = fcmae_loss(model.fcmae_decoder(feats, mask), x, mask)
    assert set(parts) == {'fcmae', 'loss'}
    torch.testing.assert_close(parts['fcmae'], ref)
    torch.testing.assert_close(parts['loss'], parts['fcmae'])


# ----------------------------------------------------------------------------------------------------------------
# dense masking of ConvNeXt V2 and its GRN


@pytest.mark.parametrize('conv_mlp', [True, False], ids=['nchw-grn', 'nhwc-grn'])
def test_dense_masking_hides_the_masked_cells_from_convnextv2(conv_mlp):
    """What the masked cells of the image contain does not change the features (as for InternImage)."""
    from pretrain.objectives.masking import dense_masking

    model = tiny_convnextv2(conv_mlp).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = grid_mask(2, 4)
    up = pixel_mask(mask, 64)
    other = x * (1 - up) + torch.randn_like(x) * 5 * up
    with torch.no_grad(), dense_masking(model, mask):
        a = model.forward_features(x * (1 - up))
        b = model.forward_features(other * (1 - up))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():  # without the re-masking the features do change (the test can fail)
        assert not torch.allclose(a, model.forward_features(other))


@pytest.mark.parametrize('channels_last', [True, False])
def test_grn_pools_per_sample_over_the_visible_positions(channels_last):
    """The GRN of the spec (§B.2, JAX dense FCMAE): Gx = ||x||_2 over the visible positions of the sample, per
    channel; Nx = Gx / (mean_C Gx + 1e-6); out = gamma * (x * Nx) + beta + x -- at every visible position."""
    from timm.layers.grn import GlobalResponseNorm

    from pretrain.objectives.masking import visible_grn

    g = torch.Generator().manual_seed(5)
    grn = GlobalResponseNorm(6, channels_last=channels_last)
    with torch.no_grad():
        grn.weight.copy_(torch.randn(6, generator=g))
        grn.bias.copy_(torch.randn(6, generator=g))
    x = torch.randn(3, 6, 8, 8, generator=g)  # NCHW here, permuted for the channels-last GRN
    mask = grid_mask(3, 6, grid=4)
    keep = 1 - pixel_mask(mask, 8)
    gx = (x * keep).pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
    ref = grn.weight.view(1, -1, 1, 1) * (x * nx) + grn.bias.view(1, -1, 1, 1) + x

    def run(t):
        if channels_last:
            return grn(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return grn(t)

    with torch.no_grad(), visible_grn(grn, mask):
        out = run(x)
        # whatever the masked positions hold, the visible ones come out the same
        other = run(x + torch.randn(x.shape, generator=g) * 3 * (1 - keep))
    torch.testing.assert_close(out * keep, ref * keep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other * keep, out * keep, rtol=0, atol=0)
    with torch.no_grad():  # the plain GRN pools over every position (the test can fail); the hook is gone on exit
        assert not torch.allclose(run(x) * keep, ref * keep, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('conv_mlp', [True, False], ids=['nchw-grn', 'nhwc-grn'])
def test_visible_features_do_not_depend_on_masked_positions_inside_the_blocks(conv_mlp, monkeypatch):
    """Inside a block the depthwise convolution writes into the masked positions (a sparse convolution would not):
    with GRN pooling over the visible positions, the visible features ignore whatever is there; pooling over every
    position, they do not."""
    from pretrain.models import checkpointable_blocks
    from pretrain.objectives import masking

    model = tiny_convnextv2(conv_mlp).eval()
    with torch.no_grad():  # GRN starts as the identity (zero weight and bias); make it act
        for grn in masking._grns(model):
            grn.weight.normal_(0, 1.0)
            grn.bias.normal_(0, 0.1)
    x = torch.randn(2, 3, 64, 64)
    mask = grid_mask(2, 7)
    keep_image = 1 - pixel_mask(mask, 64)
    g = torch.Generator().manual_seed(8)

    def junk_in_masked_cells(_module, _args, out):
        return out + torch.randn(out.shape, generator=g) * 10 * pixel_mask(mask, out.shape[-1])

    def visible_features(junk: bool) -> torch.Tensor:
        handles = [blk.conv_dw.register_forward_hook(junk_in_masked_cells)
                   for blk in checkpointable_blocks(model)] if junk else []
        try:
            with torch.no_grad(), masking.dense_masking(model, mask):
                f = model.forward_features(x * keep_image)
        finally:
            for h in handles:
                h.remove()
        return f * (1 - pixel_mask(mask, f.shape[-1]))

    clean = visible_features(False)
    torch.testing.assert_close(visible_features(True), clean, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(masking, 'visible_grn', lambda *_: contextlib.nullcontext())
    assert not torch.allclose(visible_features(True), clean, rtol=1e-3, atol=1e-3)


def test_checkpointed_blocks_recompute_with_the_same_grn_masks():
    """Activation checkpointing recomputes a block in the backward, after dense_masking has exited; the gradients
    must be those of the un-checkpointed model."""
    from pretrain.models import set_grad_checkpointing

    model = fcmae_model()
    with torch.no_grad():
        for n, p in model.backbone.named_parameters():
            if '.grn.' in n:
                p.normal_(0, 1.0)
    x = torch.randn(2, 3, 64, 64)
    mask = grid_mask(2, 9)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(x, mask=mask)['loss'].backward()
        return {n: p.grad.clone() for n, p in model.backbone.named_parameters() if p.grad is not None}

    plain = grads()
    set_grad_checkpointing(model.backbone, True)
    try:
        checkpointed = grads()
    finally:
        set_grad_checkpointing(model.backbone, False)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)
    assert not any('checkpoint_context_fn' in blk.__dict__ for blk in model.backbone.modules())


# ----------------------------------------------------------------------------------------------------------------
# parameters, shared mask, config


def test_fcmae_trains_its_decoder_and_the_encoder_only():
    model = fcmae_model(num_classes=10, mim={'weight': 1.0, 'decoder_dim': 16})
    mask = grid_mask(4, 10)
    teacher = torch.randn(4, model.backbone.num_features, 2, 2)
    counts = torch.tensor([0.0, 4.0])
    assert _grads(model, mask=mask, counts=counts) == {'backbone', 'fcmae_decoder'}
    assert _grads(model, mask=mask, teacher_features=teacher, counts=counts) == {
        'backbone', 'mim_decoder', 'fcmae_decoder'}
    assert _grads(model, labels=torch.tensor([1, 2, 3, 4]), counts=counts) == {'backbone', 'backbone.head'}
    assert 'fcmae_decoder.mask_token' in model.no_weight_decay()


def test_fcmae_and_mim_share_one_mask_per_micro_batch():
    """M3IStep draws one mask (FCMAE's ratio and patch) and gives it to both objectives in one forward."""
    import types

    from pretrain.config import config_from_dict
    from pretrain.objectives.steps import M3IStep

    cfg = config_from_dict({
        'data': {'train': [{'urls': 'x.tar'}], 'img_size': 128}, 'schedule': {'total_steps': 2},
        'loss': {'mixup_alpha': 0.0, 'cutmix_alpha': 0.0},
        'objective': {'kind': 'multi', 'supervised': {'weight': 0.0}, 'contrastive': {'weight': 0.0},
                      'mim': {'weight': 1.0, 'decoder_dim': 16, 'mask_ratio': 0.75},
                      'fcmae': {'weight': 1.0, 'decoder_dim': 16, 'mask_ratio': 0.75}}})
    assert cfg.objective.mask_settings() == (0.75, 32)
    model = fcmae_model(mim={'weight': 1.0, 'decoder_dim': 16})
    calls = []

    def engine(images, **kwargs):
        calls.append(kwargs)
        return model(images, **kwargs)

    step = M3IStep(cfg, types.SimpleNamespace(module=model), 1, 'cpu', torch.float32, 2, 0)
    step.engine = engine
    batch = {'image': torch.randn(4, 3, 128, 128), 'label': torch.full((4,), -1)}
    _, parts = step.loss(batch, step=0, micro=0)
    assert set(parts) == {'mim', 'fcmae'} and len(calls) == 1
    mask = calls[0]['mask']
    assert mask.shape == (4, 4, 4) and (mask.sum(dim=(1, 2)) == 12).all()
    torch.testing.assert_close(mask, step._mask(4, 0, 0))
    assert not torch.equal(mask, step._mask(4, 0, 1))  # a new mask per micro-batch


def test_fcmae_config_errors_name_the_key():
    from pretrain.config import ConfigError, config_from_dict

    base = {'data': {'train': [{'urls': 'x.tar'}]}, 'schedule': {'total_steps': 2},
            'loss': {'mixup_alpha': 0.0, 'cutmix_alpha': 0.0}}

    def objective(**sections):
        parts = {'supervised': {'weight': 0.0}, 'contrastive': {'weight': 0.0}, 'mim': {'weight': 0.0},
                 'fcmae': {'weight': 0.0}}
        return {**base, 'objective': {'kind': 'multi', **parts, **sections}}

    cfg = config_from_dict(objective(fcmae={'weight': 1.0}))
    f = cfg.objective.fcmae
    assert (f.mask_ratio, f.mask_patch, f.decoder_dim, f.decoder_depth, f.norm_pix_loss) == (0.6, 32, 512, 1, True)
    assert cfg.objective.mask_settings() == (0.6, 32)
    with pytest.raises(ConfigError, match=r'objective\.fcmae\.weight: must be >= 0'):
        config_from_dict(objective(fcmae={'weight': -1.0}, mim={'weight': 1.0}))
    with pytest.raises(ConfigError, match=r'objective\.fcmae\.mask_ratio: must be in \(0, 1\)'):
        config_from_dict(objective(fcmae={'weight': 1.0, 'mask_ratio': 1.0}))
    with pytest.raises(ConfigError, match=r'objective\.fcmae\.mask_patch: must be a power of two'):
        config_from_dict(objective(fcmae={'weight': 1.0, 'mask_patch': 24}))
    with pytest.raises(ConfigError, match=r'objective\.fcmae\.mask_patch: data\.img_size 224 is not a multiple'):
        config_from_dict(objective(fcmae={'weight': 1.0, 'mask_patch': 64}))
    with pytest.raises(ConfigError, match=r'objective\.fcmae\.decoder_dim'):
        config_from_dict(objective(fcmae={'weight': 1.0, 'decoder_dim': 0}))
    with pytest.raises(ConfigError, match=r'objective\.fcmae\.mask_ratio: 0\.75 differs from objective\.mim\.mask_'
                                          r'ratio 0\.6: MIM and FCMAE share one mask'):
        config_from_dict(objective(fcmae={'weight': 1.0, 'mask_ratio': 0.75}, mim={'weight': 1.0}))
    with pytest.raises(ConfigError, match=r'objective\.fcmae\.mask_patch: 16 differs'):
        config_from_dict(objective(fcmae={'weight': 1.0, 'mask_patch': 16}, mim={'weight': 1.0}))
    # an objective that is off keeps its own settings out of the check
    assert config_from_dict(objective(fcmae={'weight': 0.0, 'mask_ratio': 0.75}, mim={'weight': 1.0}))


# ----------------------------------------------------------------------------------------------------------------
# the demo stage on the real photos


@pytest.fixture(scope='module')
def photo_shards(real_data, tmp_path_factory) -> str:
    from tests.data_helpers import write_photo_shards
    return write_photo_shards(real_data, tmp_path_factory.mktemp('photos'), max_side_px=96, prefix='photos')


@pytest.mark.slow
def test_demo_stage_pretrains_convnextv2_with_fcmae_on_the_real_photos(photo_shards, tmp_path):
    out = tmp_path / 'run'
    _run(['train', str(DEMO), f'data.train=[{{name: photos, urls: "{photo_shards}"}}]', 'schedule.total_steps=4',
          'logging.interval_steps=1', 'checkpoint.interval_steps=4', f'run.output_dir={out}'])
    train = [r for r in _rows(out) if r['split'] == 'train']
    assert [r['step'] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert set(r['loss']) == {'total', 'fcmae'} and 0 < r['loss']['fcmae'] < 10, r['loss']
    step = out / 'checkpoints' / 'step_00000004'
    assert (step / 'COMPLETE').is_file()
    weights = torch.load(step / 'global_step4' / 'mp_rank_00_model_states.pt', weights_only=False)['module']
    assert weights['fcmae_decoder.pred.weight'].shape == (32 * 32 * 3, 512, 1, 1)
    assert 'backbone.stages.3.blocks.1.mlp.grn.weight' in weights
    assert not any(k.startswith(('mim_decoder.', 'text.', 'backbone.head.fc')) for k in weights)
