"""ATen operators per InternImage training step under bf16 autocast, counted by name (independent of machine load).

A ``TorchDispatchMode`` sits below autocast and autograd, so it sees every operator that reaches a backend kernel:
the casts autocast inserts (``_to_copy``), the copies, the tiny element-wise ops, in the forward and the backward.
On a GPU each of them is one or more kernel launches, so at batch 64 on an H100, where the step is host-bound
(docs/PERFORMANCE.md, 'Training throughput on one GPU'), this count is what the step time follows.

    python benchmarks/op_count.py                          # InternImage-T, batch 2, 64 px, CPU autocast bf16
    python benchmarks/op_count.py --model convnext_tiny    # the reference point
    python benchmarks/op_count.py --block                  # one InternImage-T stage-1 block (the test's bound)
    python benchmarks/op_count.py --unfused                # offset/mask as two Linears (the layout before the
                                                           # fusion, and the ZeRO-3 path), for a before/after
    python benchmarks/op_count.py --json counts.json       # the table as JSON as well

The count is of operators dispatched from Python/autograd; copies that a kernel makes inside itself (the DCNv3
extension's ``.contiguous()`` of its inputs, softmax's) go through no dispatch the mode sees, and a ``_to_copy``
is one operator here but an allocation plus a copy kernel in a GPU profile.

CPU autocast runs it (no GPU needed), but its cast policy differs from CUDA's where it matters here: CUDA autocast
runs ``layer_norm`` and ``softmax`` in float32 (the torch AMP op reference lists them under "CUDA ops that can
autocast to float32"), CPU autocast leaves both in the input's dtype (checked: bf16 in, bf16 out). By default the
count emulates the CUDA policy for those two ops (a TorchFunctionMode casts their floating inputs to float32 as
CUDA autocast does, so the output is float32 and the next Linear casts it back); ``--cpu-policy`` counts CPU
autocast as it is. Other ops of this model (linear, conv: bf16; gelu, add, mul: input dtype) agree on both.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Ops that only move or convert data (each a kernel launch on a GPU, no arithmetic of the model's).
COPY_OPS = ('aten::_to_copy', 'aten::copy_', 'aten::clone', 'aten::contiguous')
# Ops that allocate (no kernel, but host time per call).
ALLOC_OPS = ('aten::empty_strided', 'aten::empty', 'aten::new_empty', 'aten::new_empty_strided', 'aten::zeros',
             'aten::zeros_like', 'aten::empty_like')


class CudaFp32Policy(TorchFunctionMode):
    """CUDA autocast's float32 policy for layer_norm and softmax, on top of CPU autocast: reduced-precision floating
    inputs are cast to float32 (one ``_to_copy`` each, as CUDA autocast's ``cached_cast`` makes) before the op."""

    FUNCS = {torch.nn.functional.layer_norm: 'layer_norm', torch.layer_norm: 'layer_norm',
             torch.nn.functional.softmax: 'softmax', torch.softmax: 'softmax', torch.Tensor.softmax: 'softmax'}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FUNCS and torch.is_autocast_enabled('cpu'):
            args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16)
                         else a for a in args)
            kwargs = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16)
                          else v) for k, v in kwargs.items()}
            with torch.autocast('cpu', enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class OpCounter(TorchDispatchMode):
    """Counts ``aten::<name>`` (overload dropped) of every operator dispatched while active; ``casts`` counts the
    ``_to_copy`` calls by ``(from dtype, to dtype)``."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.casts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.counts[name] += 1
        if name == 'aten::_to_copy' and 'dtype' in kwargs and isinstance(args[0], torch.Tensor):
            self.casts[f'{args[0].dtype}->{kwargs["dtype"]}'.replace('torch.', '')] += 1
        return func(*args, **kwargs)


def is_view(name: str) -> bool:
    op = getattr(torch.ops.aten, name.split('::')[1], None)
    if op is None:
        return False
    packet_overloads = [getattr(op, o) for o in op.overloads()]
    return any(torch.Tag.view_copy not in ov.tags and ov._schema.returns and ov._schema.returns[0].alias_info
               is not None and not ov._schema.returns[0].alias_info.is_write for ov in packet_overloads)


def summarise(counts: collections.Counter) -> dict:
    """Totals: all ops, copies/casts, allocations, views (no kernel), and the rest ('compute')."""
    total = sum(counts.values())
    copies = sum(counts[n] for n in COPY_OPS)
    allocs = sum(counts[n] for n in ALLOC_OPS)
    views = sum(c for n, c in counts.items() if n not in COPY_OPS and n not in ALLOC_OPS and is_view(n))
    return {'total': total, 'copies_casts': copies, 'to_copy': counts['aten::_to_copy'],
            'copy_': counts['aten::copy_'], 'allocations': allocs, 'views': views,
            'compute': total - copies - allocs - views}


def count_step(model: torch.nn.Module, x: torch.Tensor, cuda_policy: bool = True) -> OpCounter:
    """Operators of one ``forward`` + ``sum().backward()`` of ``model(x)`` under CPU autocast bf16 (parameters
    float32, as in training), with CUDA's float32 policy for layer_norm/softmax emulated when ``cuda_policy``. The
    optimizer step is not counted (the fused AdamW is a few launches per parameter list)."""
    counter = OpCounter()
    with counter:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            if cuda_policy:
                with CudaFp32Policy():
                    out = model(x)
            else:
                out = model(x)
        out.float().sum().backward()
    return counter


def unfuse_offset_mask(model: torch.nn.Module) -> int:
    """Every DCNv3 layer computes offset and mask logits with its two Linears called separately (as the official
    module, and as under ZeRO-3), instead of one GEMM. Returns how many layers were changed."""
    from pretrain.ops import DCNv3

    changed = 0
    for m in model.modules():
        if isinstance(m, DCNv3):
            m._offset_and_mask = lambda x1, m=m: (m.offset(x1), m.mask(x1))
            changed += 1
    return changed


def build(name: str, block: bool):
    import timm

    import pretrain.models  # noqa: F401 - registers the models

    if block:
        model = timm.create_model('internimage_t', core_op='DCNv3', drop_path_rate=0.1)
        layer = model.levels[0].blocks[1]  # non-zero drop path, as in training
        layer.train()
        return layer, torch.randn(2, 16, 16, layer.channels, requires_grad=True)
    kwargs = {'core_op': 'DCNv3'} if name.startswith('internimage') else {}
    model = timm.create_model(name, drop_path_rate=0.1, **kwargs)
    model.train()
    return model, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='internimage_t')
    p.add_argument('--block', action='store_true', help="one InternImage-T stage-1 block, input (2, 16, 16, 64)")
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--top', type=int, default=30, help='rows of the by-op table')
    p.add_argument('--unfused', action='store_true', help='offset and mask by two Linears (before the fusion)')
    p.add_argument('--cpu-policy', action='store_true', help="CPU autocast's own policy (no CUDA emulation)")
    p.add_argument('--json', type=Path, help='also write the counts here')
    args = p.parse_args()
    torch.manual_seed(0)
    model, x = build(args.model, args.block)
    if x is None:
        x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    if args.unfused and not unfuse_offset_mask(model):
        p.error(f'--unfused: {args.model} has no DCNv3 layer')
    count_step(model, x, not args.cpu_policy)  # warm-up: extension load, first-call caches
    model.zero_grad(set_to_none=True)
    if x.grad is not None:
        x.grad = None
    counter = count_step(model, x, not args.cpu_policy)
    summary = summarise(counter.counts)
    what = 'InternImage-T stage-1 block' if args.block else f'{args.model}, batch {args.batch}, {args.img_size} px'
    what += ', offset/mask unfused' if args.unfused else ''
    policy = 'CPU autocast policy' if args.cpu_policy else "CUDA's float32 policy for layer_norm/softmax"
    print(f'{what}: one forward+backward under CPU autocast bf16 ({policy}), torch {torch.__version__}')
    print('  ' + ', '.join(f'{k} {v}' for k, v in summary.items()))
    print('  casts by dtype: ' + ', '.join(f'{k} {v}' for k, v in counter.casts.most_common()))
    for name, c in counter.counts.most_common(args.top):
        print(f'  {c:6d}  {name}')
    if args.json:
        args.json.write_text(json.dumps({'what': what, 'policy': policy, 'summary': summary,
                                         'casts': dict(counter.casts), 'counts': dict(counter.counts)}, indent=1))


if __name__ == '__main__':
    main()
