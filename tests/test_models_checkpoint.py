"""load_checkpoint: every supported layout written to a file and loaded back into a fresh model."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from pretrain.models import InternImage, load_checkpoint

CORE_OP = os.environ.get('TEST_DCN_CORE_OP', 'DCNv3')
TINY = dict(core_op=CORE_OP, channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), num_classes=10,
            drop_path_rate=0.0)
CLIP = dict(dw_kernel_size=5, post_norm=True, level2_post_norm=True, level2_post_norm_block_ids=(1,),
            center_feature_scale=True, use_clip_projector=True)


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _model(seed: int, **kwargs) -> InternImage:
    torch.manual_seed(seed)
    model = InternImage(**{**TINY, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for b in model.buffers():
            if b.dtype.is_floating_point:
                b.add_(torch.rand_like(b))
    return model


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        if not k.startswith(skip):
            assert torch.equal(v, sb[k]), k


def _save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize('layout', ['model', 'state_dict', 'module', 'raw', 'ddp_prefix', 'compiled'])
def test_wrapper_layouts_load_exactly(tmp_path, layout):
    src, dst = _model(0), _model(1)
    sd = src.state_dict()
    obj = {
        'model': {'model': sd, 'optimizer': {'state': {}}, 'epoch': 3},
        'state_dict': {'state_dict': sd, 'meta': {'epoch': 3}},
        'module': {'module': {f'module.{k}': v for k, v in sd.items()}},  # DeepSpeed mp_rank_00_model_states.pt
        'raw': sd,  # zero_to_fp32 output
        'ddp_prefix': {'model': {f'module.{k}': v for k, v in sd.items()}},
        'compiled': {f'_orig_mod.{k}': v for k, v in sd.items()},
    }[layout]
    report = load_checkpoint(dst, _save(obj, tmp_path / 'ckpt.pth'))
    assert report.ok, str(report)
    assert report.loaded == len(sd)
    _assert_same(src, dst)


def test_detection_backbone_prefix(tmp_path):
    src, dst = _model(0), _model(1)
    sd = {f'backbone.{k}': v for k, v in src.state_dict().items() if not k.startswith(('conv_head', 'head'))}
    sd['neck.fpn.0.weight'] = torch.zeros(3)
    sd['rpn_head.conv.weight'] = torch.zeros(3)
    report = load_checkpoint(dst, _save({'state_dict': sd, 'meta': {}}, tmp_path / 'det.pth'))
    assert "prefix 'backbone.'" in report.layout
    assert set(report.dropped) == {'neck.fpn.0.weight', 'rpn_head.conv.weight'}
    assert report.missing and all(k.startswith(('conv_head', 'head')) for k in report.missing)
    assert not report.unexpected and not report.ok
    _assert_same(src, dst, skip=('conv_head', 'head'))
    text = str(report)
    assert 'missing in checkpoint' in text and 'conv_head.0.weight' in text


def test_huggingface_port_layer_scale_names(tmp_path):
    src, dst = _model(0, layer_scale=1e-5, post_norm=True), _model(1, layer_scale=1e-5, post_norm=True)
    sd = {}
    for k, v in src.state_dict().items():
        sd['model.' + k.replace('.gamma1', '.layer_scale1').replace('.gamma2', '.layer_scale2')] = v
    assert any('layer_scale1' in k for k in sd)
    report = load_checkpoint(dst, _save(sd, tmp_path / 'hf.bin'))
    assert report.ok, str(report)
    assert any('layer_scale1 -> ' in c for c in report.converted)
    _assert_same(src, dst)


def test_m3i_student_checkpoint(tmp_path):
    src, dst, teacher = _model(0, **CLIP), _model(1, **CLIP), _model(2, **CLIP)
    sd = {f'student.{k}': v for k, v in src.state_dict().items()}
    sd.update({f'teacher.{k}': v for k, v in teacher.state_dict().items()})
    sd['student_proj.weight'] = torch.zeros(4, 4)
    report = load_checkpoint(dst, _save({'model': sd}, tmp_path / 'm3i.pth'))
    assert report.ok, str(report)
    assert 'student_proj.weight' in report.dropped and 'teacher.head.weight' in report.dropped
    _assert_same(src, dst)


def test_m3i_sim_checkpoint(tmp_path):
    src, dst = _model(0, **CLIP), _model(1, **CLIP)
    sd = {'mask_token': torch.zeros(1, 1, 16)}
    for k, v in src.state_dict().items():
        if k.startswith('fc_norm.0.'):
            sd['clip.classifier_ln.' + k[len('fc_norm.0.'):]] = v
        elif k.startswith('head.'):
            sd['clip.classifier.' + k[len('head.'):]] = v
        elif k.startswith('clip_projector.'):
            sd[k] = v
        else:
            sd['dcnv3.' + k] = v
    sd['mm_dcnv3.levels.0.blocks.0.norm1.0.weight'] = torch.zeros(16)
    report = load_checkpoint(dst, _save({'model': sd}, tmp_path / 'sim.pth'))
    assert report.ok, str(report)
    assert 'M3I sim' in report.layout and 'mm_dcnv3.levels.0.blocks.0.norm1.0.weight' in report.dropped
    _assert_same(src, dst)


def test_22k_head_mapped_to_1k_with_index_file(tmp_path):
    src = _model(0, num_classes=50)
    dst = _model(1, num_classes=10)
    index = [49, 3, 7, 0, 12, 48, 21, 30, 5, 9]
    index_file = tmp_path / 'map22kto1k.txt'
    index_file.write_text(''.join(f'{i}\n' for i in index))
    path = _save({'model': src.state_dict()}, tmp_path / '22k.pth')
    report = load_checkpoint(dst, path, head_index=index_file)
    assert report.ok, str(report)
    assert torch.equal(dst.head.weight, src.head.weight[index])
    assert torch.equal(dst.head.bias, src.head.bias[index])
    _assert_same(src, dst, skip=('head.',))

    # without an index the head is skipped and reported, everything else loads
    fresh = _model(2, num_classes=10)
    before = fresh.head.weight.clone()
    report = load_checkpoint(fresh, path)
    assert not report.ok and len(report.mismatched) == 2 and 'head.weight' in report.mismatched[0]
    assert torch.equal(fresh.head.weight, before)
    with pytest.raises(RuntimeError, match='head.weight'):
        load_checkpoint(_model(3, num_classes=10), path, strict=True)
    with pytest.raises(ValueError, match='entries'):
        load_checkpoint(_model(3, num_classes=10), path, head_index=index[:5])


def test_remove_center_surgery_preserves_function(tmp_path):
    src = _model(0)
    with torch.no_grad():  # make the centre point's weight ~0 so both models compute the same function
        for level in src.levels:
            for blk in level.blocks:
                g = blk.dcn.group
                blk.dcn.mask.weight.view(g, 9, -1)[:, 4] = 0
                blk.dcn.mask.bias.view(g, 9)[:, 4] = -40.0
    dst = _model(1, remove_center=True)
    report = load_checkpoint(dst, _save({'model': src.state_dict()}, tmp_path / 'rc.pth'))
    assert report.ok, str(report)
    assert sum('remove_center' in c for c in report.converted) == 4 * 5  # offset+mask, weight+bias, 5 blocks
    blk_s, blk_d = src.levels[1].blocks[0].dcn, dst.levels[1].blocks[0].dcn
    g = blk_s.group
    torch.testing.assert_close(blk_d.mask.weight.view(g, 8, -1),
                               blk_s.mask.weight.view(g, 9, -1)[:, [0, 1, 2, 3, 5, 6, 7, 8]])
    torch.testing.assert_close(blk_d.offset.bias.view(g, 8, 2),
                               blk_s.offset.bias.view(g, 9, 2)[:, [0, 1, 2, 3, 5, 6, 7, 8]])
    x = torch.randn(2, 3, 64, 64)
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=1e-4, atol=1e-4)


class _NotAWeight:
    """Pickled into a checkpoint to prove the loader refuses arbitrary objects."""


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'model': _model(0).state_dict(), 'config': _NotAWeight()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(_model(1), path)


def test_ema_safetensors_and_bad_files(tmp_path):
    from safetensors.torch import save_file

    a, b, dst = _model(0), _model(1), _model(2)
    path = _save({'model': a.state_dict(), 'model_ema': b.state_dict()}, tmp_path / 'ema.pth')
    assert load_checkpoint(dst, path).ok
    _assert_same(a, dst)
    assert load_checkpoint(dst, path, use_ema=True).ok
    _assert_same(b, dst)

    st = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(st))
    report = load_checkpoint(dst, st)
    assert report.ok and report.layout == ['safetensors']
    _assert_same(a, dst)

    with pytest.raises(ValueError, match='no state_dict'):
        load_checkpoint(dst, _save({'epoch': 1, 'optimizer': {}}, tmp_path / 'opt.pth'))


def test_report_lists_unexpected_keys(tmp_path):
    src, dst = _model(0), _model(1)
    sd = dict(src.state_dict())
    sd['levels.0.blocks.0.gamma1'] = torch.ones(16)  # e.g. a layer-scale checkpoint into a T-style model
    report = load_checkpoint(dst, _save(sd, tmp_path / 'x.pth'))
    assert report.unexpected == ['levels.0.blocks.0.gamma1'] and not report.missing
    assert 'unexpected (not in model)' in str(report)
    _assert_same(src, dst)


def test_timm_pretrained_path_uses_official_layout(tmp_path):
    """timm.create_model(pretrained=True) with an official ``{'model': ...}`` file (as on the HF hub)."""
    import timm

    src = _model(0)
    path = _save({'model': src.state_dict(), 'epoch': 1}, tmp_path / 'internimage_t_1k_224.pth')
    kwargs = {k: v for k, v in TINY.items() if k != 'drop_path_rate'}
    overlay = dict(file=str(path), num_classes=10)
    model = timm.create_model('internimage_t', pretrained=True, pretrained_cfg_overlay=overlay, drop_path_rate=0.0,
                              **kwargs)
    _assert_same(src, model)


def test_assign_materialises_a_meta_model(tmp_path):
    src = _model(0, **CLIP)
    path = _save({'model': src.state_dict()}, tmp_path / 'big.pth')
    with torch.device('meta'):
        dst = InternImage(**{**TINY, **CLIP})
    report = load_checkpoint(dst, path, assign=True, strict=True)
    assert report.ok
    assert not any(p.is_meta for p in dst.parameters()) and not any(b.is_meta for b in dst.buffers())
    _assert_same(src, dst)
    x = torch.randn(2, 3, 64, 64)
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
