"""Operators per InternImage training step under bf16 autocast (benchmarks/op_count.py): a pinned bound, so that a
change adding casts or tiny kernels to the DCNv3 block fails here rather than on a GPU's throughput.

One InternImage-T stage-1 block (channels 64, drop path on), input (2, 16, 16, 64) float32 (the residual stream's
dtype under CUDA autocast), one forward + backward under CPU autocast bf16 with CUDA's float32 policy for
layer_norm/softmax emulated. Measured with torch 2.14.1: 183 operators, 40 of them ``_to_copy`` casts (two Linears
for offset and mask: 196 and 46). The bounds allow 5 more operators and 2 more casts than measured, so a torch
upgrade that moves a view or a cast in or out of autograd does not fail spuriously, while one extra cast per
Linear (6 per block forward alone) or the two-Linear offset/mask (+13 operators, +6 casts) does.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.op_count import count_step, summarise, unfuse_offset_mask
from pretrain.ops import build

MEASURED_TOTAL, MEASURED_CASTS = 183, 40
MAX_TOTAL, MAX_CASTS = MEASURED_TOTAL + 5, MEASURED_CASTS + 2


def _block():
    # Without the fused kernel 'auto' runs the reference's operators one by one and the count means something else.
    if build.load_cpu() is None:
        pytest.fail(f"the fused CPU kernel did not build: {build.failure('cpu')}")
    import timm

    import pretrain.models  # noqa: F401 - registers the models

    torch.manual_seed(0)
    model = timm.create_model('internimage_t', core_op='DCNv3', drop_path_rate=0.1)
    layer = model.levels[0].blocks[1].train()
    with torch.no_grad():  # the official init zeroes offset and mask: random ones make the math check mean something
        for lin in (layer.dcn.offset, layer.dcn.mask):
            lin.weight.normal_(0, 0.1)
            lin.bias.normal_(0, 0.5)
    return layer, torch.randn(2, 16, 16, layer.channels, requires_grad=True)


def _count(layer, x):
    count_step(layer, x)  # first call: extension load, caches
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return summarise(count_step(layer, x).counts)


def test_block_op_count_bounded():
    layer, x = _block()
    s = _count(layer, x)
    assert s['total'] <= MAX_TOTAL, s
    assert s['to_copy'] <= MAX_CASTS, s


def test_fused_offset_mask_cuts_ops_and_keeps_math():
    layer, x = _block()
    fused = _count(layer, x)
    with torch.no_grad():
        ref_fused = layer.dcn(x)
    grads_fused = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    unfuse_offset_mask(layer)
    unfused = _count(layer, x)
    assert unfused['total'] - fused['total'] >= 12, (unfused, fused)
    assert unfused['to_copy'] - fused['to_copy'] >= 6, (unfused, fused)
    with torch.no_grad():
        torch.testing.assert_close(layer.dcn(x), ref_fused, rtol=1e-5, atol=1e-6)
    # same gradients (the bf16 GEMMs differ only in how x1's gradient is summed: tolerance of bf16)
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    assert grads.keys() == grads_fused.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_fused[n], rtol=2e-2, atol=2e-2 * grads[n].abs().max().item(),
                                   msg=n)
