"""bf16 products in fp32 on CPUs without bf16 instructions (pretrain/engine/cpu_bf16.py)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointError, checkpoint

from pretrain.config import ConfigError, load_config
from pretrain.engine import cpu_bf16
from pretrain.engine.cpu_bf16 import Fp32Products, use_fp32_products
from pretrain.models.factory import set_grad_checkpointing, uses_grad_checkpointing


def _layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Flatten(1), nn.Linear(8 * 6 * 6, 5)).bfloat16()


class _ProductDtypes(TorchDispatchMode):
    """Records the dtypes of the ATen product kernels that run (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, set]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ('mm', 'addmm', 'bmm', 'convolution', 'convolution_backward'):
            self.seen.append((name, {a.dtype for a in args if isinstance(a, torch.Tensor)}))
        return func(*args, **(kwargs or {}))


def _forward_backward(model, x, mode):
    model.zero_grad()
    x = x.clone().requires_grad_()
    with _ProductDtypes() as kernels:
        with mode:
            y = model(x)
        (y.float() ** 2).sum().backward()
    return y, x.grad, {n: p.grad for n, p in model.named_parameters()}, kernels.seen


def test_products_run_in_fp32_and_round_to_bf16_forward_and_backward():
    model = _layers()
    x = torch.randn(4, 3, 6, 6).bfloat16()
    y, gx, grads, kernels = _forward_backward(model, x, Fp32Products())
    # every product kernel, forward and backward, ran on fp32 operands
    assert {name for name, _ in kernels} >= {'convolution', 'convolution_backward', 'addmm', 'mm'}
    assert all(dtypes == {torch.float32} for _, dtypes in kernels), kernels
    conv, lin = model[0], model[3]
    # the forward is exactly the fp32 computation of the bf16 operands, rounded to bf16 once per product
    h = F.gelu(F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1).bfloat16())
    expect = F.linear(h.flatten(1).float(), lin.weight.float(), lin.bias.float()).bfloat16()
    assert y.dtype == torch.bfloat16 and torch.equal(y, expect)
    # gradients keep the dtype of what they belong to (DeepSpeed's bf16 parameters) and agree with bf16 kernels
    assert gx.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads.values())
    y_n, gx_n, grads_n, kernels_n = _forward_backward(model, x, contextlib.nullcontext())
    assert all(dtypes == {torch.bfloat16} for _, dtypes in kernels_n), kernels_n
    torch.testing.assert_close(y, y_n, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, gx_n, rtol=5e-2, atol=5e-2)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_n[n], rtol=5e-2, atol=5e-1, msg=n)


def test_other_dtypes_and_ops_pass_through():
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with _ProductDtypes() as kernels, Fp32Products():
        assert torch.equal(a @ b, torch.mm(a, b))  # fp32 unchanged
        assert (a.double() @ b.double()).dtype == torch.float64
        s = torch.softmax(a.bfloat16(), -1)  # not a product: stays a bf16 op
        mixed = torch.mm(a.bfloat16(), b.bfloat16())
    assert s.dtype == torch.bfloat16
    assert [d for _, d in kernels.seen] == [{torch.float32}] * 2 + [{torch.float64}] + [{torch.float32}]
    assert mixed.dtype == torch.bfloat16
    assert torch.equal(mixed, (a.bfloat16().float() @ b.bfloat16().float()).bfloat16())


@pytest.mark.parametrize('has', [True, False])
def test_the_setting_chooses_only_for_bf16_on_a_cpu(monkeypatch, has):
    monkeypatch.setattr(cpu_bf16, 'cpu_has_bf16_instructions', lambda: has)
    cpu, bf16 = torch.device('cpu'), torch.bfloat16
    assert use_fp32_products('auto', device=cpu, dtype=bf16) is (not has)
    assert use_fp32_products('fp32', device=cpu, dtype=bf16)
    assert not use_fp32_products('native', device=cpu, dtype=bf16)
    assert not use_fp32_products('fp32', device=cpu, dtype=torch.float32)
    assert not use_fp32_products('fp32', device=torch.device('cuda', 0), dtype=bf16)
    assert not use_fp32_products('fp32', device=cpu, dtype=bf16, compiled=True)
    assert not use_fp32_products('fp32', device=cpu, dtype=bf16, checkpointing=True)


def test_activation_checkpointing_is_why_the_mode_stays_off_and_it_is_found():
    # torch's checkpoint recomputes in the backward, outside the mode, and refuses the dtype change: the trainer
    # therefore leaves a checkpointed model on the native kernels (uses_grad_checkpointing finds it)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).bfloat16()
    x = torch.randn(3, 8).bfloat16().requires_grad_()
    with Fp32Products():
        y = checkpoint(model, x, use_reentrant=False)
    with pytest.raises(CheckpointError, match='different metadata'):
        y.float().sum().backward()

    import timm

    import pretrain.models  # noqa: F401  (registers InternImage)
    for name, kwargs in [('internimage_t', dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8])),
                         ('convnext_atto', {})]:
        net = timm.create_model(name, num_classes=10, **kwargs)
        assert not uses_grad_checkpointing(net), name
        set_grad_checkpointing(net, True, every=2)
        assert uses_grad_checkpointing(net), name
        set_grad_checkpointing(net, False)
        assert not uses_grad_checkpointing(net), name


def test_the_cpu_flags_are_read():
    with open('/proc/cpuinfo') as f:
        flags = next(line for line in f if line.startswith('flags')).split()
    assert cpu_bf16.cpu_has_bf16_instructions() == ('avx512_bf16' in flags or 'amx_bf16' in flags)


def test_a_wrong_setting_fails_naming_the_key():
    with pytest.raises(ConfigError, match='deepspeed.cpu_bf16_products'):
        load_config('configs/stage/fashion_mnist_internimage.yaml', ['deepspeed.cpu_bf16_products=fast'])
