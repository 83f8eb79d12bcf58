"""torch.compile of the models: no graph breaks through DCNv3, compiled == eager within tolerance, clean keys."""
from __future__ import annotations

import pytest
import timm
import torch

import pretrain.models  # noqa: F401 - registers the families with timm
from pretrain.ops import function

TINY_INTERNIMAGE = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8])
# fp32, inductor against eager on the CPU: the generated kernels sum in another order (and fuse LayerNorm/GELU), so
# results differ by rounding only: outputs within 1e-4 of their largest magnitude; gradients within 1e-3 of the
# largest gradient of the model (some are rounding noise around 0, e.g. a LayerNorm bias ahead of a BatchNorm).
OUT_RTOL, GRAD_RTOL = 1e-4, 1e-3
SGD_LR = 0.1


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


@pytest.mark.slow
def test_internimage_t_forward_and_backward_trace_without_graph_breaks():
    """torch._dynamo.explain on InternImage-T (the real size, 2x3x64x64), forward and backward in one function:
    one graph, no break; DCNv3 is in it as the custom op, resolving its backend (a file read, a lock) is not."""
    torch.manual_seed(0)
    model = timm.create_model('internimage_t', num_classes=10)
    images = torch.randn(2, 3, 64, 64)

    def train_step(x):
        logits = model(x)
        logits.sum().backward()
        return logits.detach()  # a returned tensor whose graph backward consumed would force a break

    with torch._dynamo.config.patch(trace_autograd_ops=True):  # trace .backward() into the graph
        explained = torch._dynamo.explain(train_step)(images)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1, reasons
    code = explained.graphs[0].code
    assert code.count('pretrain.dcnv3_forward') == 4 + 4 + 18 + 4, 'one DCNv3 op per block of InternImage-T'


def _aot_recorder():
    """An aot_eager-like backend that keeps the forward and backward graphs it was given (ATen level)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, list] = {'forward': [], 'backward': []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=keep('forward'), bw_compiler=keep('backward')), graphs


def test_compiled_backward_keeps_the_backward_op_in_one_graph():
    """fullgraph compile of a tiny InternImage: one forward and one backward graph, holding the forward and the
    backward custom ops (not a decomposition, not a Python callback)."""
    torch.manual_seed(0)
    model = timm.create_model('internimage_t', num_classes=10, **TINY_INTERNIMAGE)
    backend, graphs = _aot_recorder()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    compiled(torch.randn(2, 3, 32, 32)).sum().backward()
    assert len(graphs['forward']) == 1 and len(graphs['backward']) == 1
    fw, bw = (str(graphs[k][0].code) for k in ('forward', 'backward'))
    assert fw.count('pretrain.dcnv3_forward') == 4 and 'dcnv3_backward' not in fw
    assert bw.count('pretrain.dcnv3_backward') == 4


def test_backend_is_resolved_once_per_device_type(monkeypatch):
    """The choice is cached: later calls do not reach the extension loader (which dynamo cannot trace)."""
    monkeypatch.setattr(function, '_resolved', {})
    device = torch.device('cpu')
    first = function.resolved_backend('auto', device)
    assert first == function.resolve_backend('auto', device)
    monkeypatch.setattr(function.build, 'load_cpu', lambda *a, **k: pytest.fail('load_cpu called again'))
    assert function.resolved_backend('auto', device) == first
    assert function.resolved_backend('pytorch', device) == 'pytorch'


def _train_step(model, images, labels):
    """One SGD step; returns the logits before it, the gradients and the weights after it."""
    opt = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    logits = model(images)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return logits.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize('name, kwargs', [
    pytest.param('internimage_t', TINY_INTERNIMAGE, marks=pytest.mark.extended),  # 3 min: make test-extended
    ('convnext_atto', {})])
def test_compiled_train_step_matches_eager(name, kwargs):
    """inductor (the engine's compile) against eager from the same weights: logits, every gradient and the
    weights after an SGD step, within OUT_RTOL / GRAD_RTOL; the state_dict keys stay the model's own."""
    torch.manual_seed(0)
    eager = timm.create_model(name, num_classes=10, drop_path_rate=0.0, **kwargs)
    twin = timm.create_model(name, num_classes=10, drop_path_rate=0.0, **kwargs)
    twin.load_state_dict(eager.state_dict())
    twin.compile()  # in place, as the engine does: no _orig_mod. wrapper
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([1, 4, 7])
    want_logits, want_grads, want_weights = _train_step(eager, images, labels)
    got_logits, got_grads, got_weights = _train_step(twin, images, labels)
    assert _relative_error(got_logits, want_logits) < OUT_RTOL
    # Each gradient against its own scale, floored at 1e-3 of the largest: a gradient that is rounding noise around
    # 0 (a LayerNorm bias ahead of a BatchNorm, ~1e-8) has no scale of its own to be relative to.
    floor = 1e-3 * max(float(g.abs().max()) for g in want_grads.values())
    for n in want_grads:
        scale = max(float(want_grads[n].abs().max()), floor)
        assert float((got_grads[n] - want_grads[n]).abs().max()) < GRAD_RTOL * scale, n
        # SGD moves both copies by lr x gradient from the same weights: they differ by lr x the gradients' difference
        assert float((got_weights[n] - want_weights[n]).abs().max()) <= (
            SGD_LR * GRAD_RTOL * scale + 1e-6 * float(want_weights[n].abs().max())), n
    assert list(twin.state_dict()) == list(eager.state_dict())
    with torch.no_grad():  # eval mode recompiles (the guard on .training) and still agrees
        eager.eval(), twin.eval()
        assert _relative_error(twin(images), eager(images)) < OUT_RTOL
