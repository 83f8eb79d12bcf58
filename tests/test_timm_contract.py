"""timm's model contract for our families, with the checks of timm's own tests/test_models.py (default cfgs, FX
forward/backward, TorchScript opt-out) written here for InternImage (T at full width, a tiny H/G-style model with
the attention-pooling head) and PeLK-T. Inputs are 64 px instead of 224 to keep the CPU cost down; the map sizes
follow from the models' output strides."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules

import pretrain.models  # noqa: F401 - registers the families with timm

IMG = 64
CASES = {
    'internimage_t': ('internimage_t', {}),
    'internimage_h_tiny': ('internimage_h', {'channels': 16, 'depths': [1, 1, 1, 1], 'groups': [1, 2, 4, 8],
                                             'level2_post_norm': False}),
    'pelk_t': ('pelk_t', {}),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build(case: str, **kw) -> torch.nn.Module:
    name, kwargs = CASES[case]
    return timm.create_model(name, pretrained=False, **{**kwargs, **kw})


def batch(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG)


@pytest.mark.parametrize('case', list(CASES))
def test_default_cfg_widths_pooling_and_names(case):
    model = build(case).eval()
    x = batch()
    side = IMG // model.output_stride if hasattr(model, 'output_stride') else IMG // 32
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape == (2, model.num_features, side, side), 'forward_features width != num_features'
        assert pre.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)  # keeps the pooling: the pooled features
        pooled = model(x)
        assert pooled.shape == pre.shape
        torch.testing.assert_close(pooled, pre)
        model.reset_classifier(0, '')  # no classifier, no pooling: a map (PeLK's head still norms it, as timm's)
        same = torch.equal if case.startswith('internimage') else lambda a, b: a.shape == b.shape
        assert same(model(x), feats)
        unpooled = build(case, num_classes=0, global_pool='').eval()
        unpooled.load_state_dict(model.state_dict())
        assert same(unpooled(x), feats)
    cfg, sd = model.pretrained_cfg, model.state_dict()
    assert f"{cfg['first_conv']}.weight" in sd
    assert f"{cfg['classifier']}.weight" in build(case).state_dict()


def _fx(model: torch.nn.Module, train: bool) -> torch.nn.Module:
    """The model traced by torch.fx through timm's registries of untraceable modules and functions, returning its
    last node (the logits), as timm's FX tests trace it."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(leaf_modules=list(get_notrace_modules()), autowrap_functions=list(get_notrace_functions()))
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize('case', list(CASES))
def test_fx_forward_matches_eager(case):
    model = build(case).eval()
    x = batch()
    with torch.inference_mode():
        eager = model(x)
        traced = _fx(model, train=False)
        (out,) = traced(x).values()
    assert out.shape == (2, model.num_classes) and not out.isnan().any()
    assert torch.equal(out, eager)


@pytest.mark.parametrize('case', list(CASES))
def test_fx_backward_reaches_every_parameter(case):
    model = build(case, num_classes=42).train()
    traced = _fx(model, train=True)
    (out,) = traced(batch()).values()
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing and len(list(traced.parameters())) == len(list(model.parameters()))


@pytest.mark.parametrize('case', ['internimage_t', 'pelk_t'])
def test_torchscript_is_refused_explicitly(case):
    with pytest.raises(RuntimeError, match='does not support TorchScript'):
        torch.jit.script(build(case))


def test_global_pool_is_validated():
    with pytest.raises(ValueError, match="global_pool must be 'avg'"):
        build('internimage_t', global_pool='max')
