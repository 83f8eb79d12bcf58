"""bf16 products in fp32 on CPUs without bf16 instructions (pretrain/engine/cpu_bf16.py)."""
from __future__ import annotations

import contextlib
import os

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
    # the same graph written out (cast up, fp32 op, round to bf16) gives the same output and gradients, bitwise
    conv, lin = model[0], model[3]
    ref_x = x.clone().requires_grad_()
    h = F.gelu(F.conv2d(ref_x.float(), conv.weight.float(), conv.bias.float(), padding=1).bfloat16())
    expect = F.linear(h.flatten(1).float(), lin.weight.float(), lin.bias.float()).bfloat16()
    model.zero_grad()
    (expect.float() ** 2).sum().backward()
    assert y.dtype == torch.bfloat16 and torch.equal(y, expect)
    assert torch.equal(gx, ref_x.grad)
    for n, p in model.named_parameters():
        assert grads[n].dtype == torch.bfloat16 and torch.equal(grads[n], p.grad), n
    # and agree with the native bf16 kernels (bitwise on this machine's oneDNN; not promised elsewhere)
    y_n, gx_n, grads_n, kernels_n = _forward_backward(model, x, contextlib.nullcontext())
    assert all(dtypes == {torch.bfloat16} for _, dtypes in kernels_n), kernels_n
    torch.testing.assert_close(y, y_n, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, gx_n, rtol=5e-2, atol=5e-2)


def test_other_dtypes_mixed_operands_out_and_other_ops_pass_through():
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    a16, b16 = a.bfloat16(), b.bfloat16()
    with _ProductDtypes() as kernels, Fp32Products():
        assert torch.equal(a @ b, torch.mm(a, b))  # fp32 unchanged
        assert (a.double() @ b.double()).dtype == torch.float64
        s = torch.softmax(a16, -1)  # not a product: stays a bf16 op
        at = a16 @ b16  # the operator reaches the mode as Tensor.matmul
        batched = torch.bmm(a16.expand(2, 3, 4), b16.expand(2, 4, 2))
        weight_kwarg = F.linear(a16, weight=b16.t())
        out = torch.empty(3, 2, dtype=torch.bfloat16)
        torch.mm(a16, b16, out=out)  # out= is left to the native kernel, which fills the caller's tensor
        with pytest.raises(RuntimeError):
            torch.mm(a16, b)  # mixed dtypes: refused as without the mode
    assert s.dtype == torch.bfloat16
    expect = (a16.float() @ b16.float()).bfloat16()
    assert at.dtype == torch.bfloat16 and torch.equal(at, expect)
    assert torch.equal(batched[1], expect) and torch.equal(weight_kwarg, expect)
    assert torch.equal(out, torch.mm(a16, b16))
    dtypes = [d for _, d in kernels.seen]
    assert dtypes[:6] == [{torch.float32}] * 2 + [{torch.float64}] + [{torch.float32}] * 3, dtypes
    assert dtypes[6] == {torch.bfloat16}, dtypes  # the out= call


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


@pytest.mark.parametrize('text, has', [
    ('processor\t: 0\nflags\t\t: fpu sse avx512f avx512bw avx512_vnni\n', False),
    ('flags\t\t: fpu avx512f avx512_bf16\n', True),
    ('flags\t\t: fpu amx_tile amx_bf16\n', True),
    ('processor\t: 0\nFeatures\t: fp asimd bf16\n', True),  # no flags line (aarch64): auto changes nothing
    (None, True),  # no file
])
def test_the_cpu_flags_decide(tmp_path, text, has):
    path = tmp_path / 'cpuinfo'
    if text is not None:
        path.write_text(text)
    assert cpu_bf16.cpu_has_bf16_instructions(str(path)) is has


def test_a_wrong_setting_fails_naming_the_key():
    with pytest.raises(ConfigError, match='deepspeed.cpu_bf16_products'):
        load_config('configs/stage/fashion_mnist_internimage.yaml', ['deepspeed.cpu_bf16_products=fast'])


def _trainer_worker(out_file: str, setting: str) -> None:
    """One bf16 training step of a tiny InternImage through the Trainer (1 rank, ZeRO-1), then its evaluation (raw
    and EMA weights): the dtypes of the product kernels each ran."""
    import json

    from pretrain.config import config_from_dict
    from pretrain.engine.trainer import Trainer
    from tests.test_engine import TINY_MODEL

    cfg = config_from_dict({
        'model': TINY_MODEL,
        'data': {'train': [{'name': 'unused', 'urls': 'unused.tar'}], 'img_size': 32},
        'schedule': {'total_steps': 2, 'warmup_steps': 0, 'lr_scale_by_batch': False},
        'deepspeed': {'zero_stage': 1, 'precision': 'bf16', 'micro_batch_size': 4, 'cpu_bf16_products': setting},
        'ema': {'enabled': True},
        'checkpoint': {'resume': 'none'},
        'logging': {'tensorboard': False, 'progress': False},
        'run': {'output_dir': os.path.dirname(out_file), 'seed': 0},
    })
    trainer = Trainer(cfg, build_data=False)
    batch = {'image': torch.randn(4, 3, 32, 32), 'label': torch.tensor([0, 1, 2, 3]), 'key': [''] * 4}
    with _ProductDtypes() as kernels:
        trainer.train_step(lambda: batch)
    trainer.val_loader = [batch]
    with _ProductDtypes() as eval_kernels:
        metrics = trainer.evaluate()

    def names(seen) -> list[str]:
        return sorted({f'{name}:{sorted(str(d) for d in dtypes)}' for name, dtypes in seen})

    with open(out_file, 'w') as f:
        json.dump({'fp32_products': trainer.fp32_products, 'kernels': names(kernels.seen),
                   'eval_kernels': names(eval_kernels.seen),
                   'eval_images': {k: v['images'] for k, v in metrics.items()}}, f)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize('setting', ['fp32', 'native'])
def test_the_trainer_runs_its_step_under_the_setting(tmp_path, setting):
    import json

    from tests.test_engine import run_procs

    out_file = tmp_path / 'kernels.json'
    log = run_procs(1, ['tests/test_cpu_bf16.py', str(out_file), setting])
    got = json.loads(out_file.read_text())
    assert got['fp32_products'] is (setting == 'fp32')
    assert ('linear, convolution and matmul run in fp32' in log) is (setting == 'fp32')
    dtype = 'torch.float32' if setting == 'fp32' else 'torch.bfloat16'
    names = {k.split(':')[0] for k in got['kernels']}
    assert {'convolution', 'convolution_backward', 'addmm', 'mm'} <= names, got
    # every product kernel of the step, forward and backward, ran in one dtype
    assert all(k.endswith(f"['{dtype}']") for k in got['kernels']), got
    # and so did the evaluation's, of the raw weights and of the EMA's
    assert got['eval_images'] == {'raw': 4, 'ema': 4}, got
    assert {'convolution', 'addmm'} <= {k.split(':')[0] for k in got['eval_kernels']}, got
    assert all(k.endswith(f"['{dtype}']") for k in got['eval_kernels']), got


if __name__ == '__main__':
    import sys

    _trainer_worker(sys.argv[1], sys.argv[2])
    from tests.dist_helpers import leave_worker
    leave_worker()
