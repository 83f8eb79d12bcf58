"""Large depth-wise convolutions at PeLK's shapes: plain PyTorch against our native (cropped, channels-last) and FFT
paths, forward and forward+backward, as speed-ups over the plain one measured in the same run.

Shapes (``--model pelk_t``, batch ``--batch``, 224 px): the peripheral 3/8 of each stage's channels with the stage's
kernel, i.e. (C, H, k) = (46, 56, 51), (93, 28, 49), (187, 14, 47), (374, 7, 13) for PeLK-T.
Implementations:

* ``plain``: ``F.conv2d(x, w, padding=k//2, groups=C)``, NCHW, the full kernel (the baseline);
* ``native``: ours, the kernel cropped to the taps that reach the map, channels-last;
* ``fft``: ours, ``torch.fft`` (float32), cropped kernel;
* ``auto``: what the model runs (``pretrain.ops.dwconv.choose_impl``), shown as ``auto=<forward>/<with grad>``.

Each row also gives the largest difference from ``plain``'s output. ``--sweep`` times ``native`` against ``fft``
over square kernels 3..31 on 56/28/14/7 maps (64 channels) to find where the FFT starts to win; that is the rule
``auto`` uses. ``--model-step`` times a whole training step (forward, cross-entropy, backward) of ``--model`` at
``--img-size`` with ``conv_impl='native'`` against ``'auto'``, alternating the two. Times are medians of
``--repeats`` after one warm-up, wall clock (``--clock cpu``: process CPU time, steadier on a shared machine).

    python benchmarks/large_kernel.py                 # PeLK-T shapes, batch 4, CPU, 1 thread (~1 min here)
    python benchmarks/large_kernel.py --sweep --batch 4
    python benchmarks/large_kernel.py --model-step --batch 2
    python benchmarks/large_kernel.py --device cuda --threads 0 --repeats 50
    python benchmarks/large_kernel.py --table                         # PeLK paper's comparison table (~1 min)
    python benchmarks/large_kernel.py --table --snip-images 8 --threads 2    # + MACs at SNIP densities (~15 min)
    python benchmarks/large_kernel.py --table --step-time --device cuda --threads 0 --batch 32

``--table``: parameters (dense, and non-zero when every 2-D/4-D weight keeps 60%, SLaK's and PeLK's 40% sparsity)
and multiply-accumulates at ``--img-size`` for ConvNeXt-T/S/B, RepLKNet-31B, SLaK-T/S/B and PeLK-T/S/B beside the
published figures (PeLK paper Table 4; the RepLKNet, SLaK and ConvNeXt READMEs). MACs are counted from shapes
on the meta device, fvcore's convention: every convolution and linear layer, ``out elements x in/groups x kh x kw``
with the whole (uncropped) kernel, norms and activations not counted; PeLK's peripheral convolution counts its
expanded k x k kernel on its 3/8 of the channels. Sparse MACs scale each masked layer's MACs by its density:
0.6 everywhere, and with ``--snip-images N`` also the per-layer densities SNIP gives (SLaK's and PeLK's
initialisation) on N real ImageNet photos, for each of ``--snip-seeds``. SNIP keeps the high-resolution early
layers sparser than 0.6, so their MACs come out lower; SLaK's README figures agree with this rule (docs/MODELS.md).
``--step-time`` adds a training step's time (forward, cross-entropy, backward) and peak memory at ``--batch`` x
``--img-size`` with ``conv_impl`` native and fft (RepLKNet, SLaK, PeLK; ConvNeXt has one path).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.models.pelk import MODEL_ARGS  # noqa: E402
from pretrain.ops.dwconv import choose_impl, dwconv2d  # noqa: E402

CONV_RATIO = 3 / 8  # PeLK's default share of peripheral channels
IMPLS = ('plain', 'native', 'fft', 'auto')
SWEEP_SIZES = (56, 28, 14, 7)
SWEEP_KERNELS = (3, 5, 7, 9, 11, 13, 15, 17, 21, 31)


def plain(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, padding=w.shape[-1] // 2, groups=x.shape[1])


def timed(fn, repeats: int, device: str, clock: str) -> float:
    now = time.process_time if clock == 'cpu' else time.perf_counter
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = now()
        fn()
        sync()
        times.append(now() - t0)
    return statistics.median(times)


def measure(impl: str, batch: int, channels: int, size: int, kernel: int, *, dtype: torch.dtype, device: str,
            repeats: int, clock: str, reference: torch.Tensor | None = None) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(channels, 1, kernel, kernel, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    grad = torch.randn(batch, channels, size, size, generator=gen).to(device, dtype)
    if impl == 'plain':
        def fn():
            return plain(x, w)
    else:
        def fn():
            return dwconv2d(x, w, impl=impl)

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        fn().backward(grad)
        x.grad = w.grad = None

    with torch.no_grad():
        out = fn().float()
    auto = f'auto={choose_impl(kernel, kernel, size, size, False)}/{choose_impl(kernel, kernel, size, size, True)}'
    row = {'impl': impl if impl != 'auto' else auto,
           'shape': (batch, channels, size, kernel), 'fwd_s': timed(fwd, repeats, device, clock),
           'fwd_bwd_s': timed(fwd_bwd, repeats, device, clock)}
    row['max_abs_diff'] = (out - reference).abs().max().item() if reference is not None else 0.0
    return row, out


def stage_rows(args) -> list[dict]:
    dims, kernels = MODEL_ARGS[args.model]['dims'], MODEL_ARGS[args.model]['kernel_sizes']
    size = args.img_size // 4
    rows = []
    for dim, kernel in zip(dims, kernels):
        channels = int(dim * CONV_RATIO)
        ref = None
        for impl in IMPLS:
            row, out = measure(impl, args.batch, channels, size, kernel, dtype=args.dtype, device=args.device,
                               repeats=args.repeats, clock=args.clock, reference=ref)
            ref = out if impl == 'plain' else ref
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        size //= 2
    return rows


def stage_table(rows: list[dict]) -> str:
    out = ['| shape (B, C, H=W, k) | impl | fwd ms | fwd speed-up | fwd+bwd ms | fwd+bwd speed-up | max abs diff |',
           '|---|---|---|---|---|---|---|']
    base = {}
    for r in rows:
        if r['impl'] == 'plain':
            base[r['shape']] = r
        b = base[r['shape']]
        out.append(f"| {r['shape']} | {r['impl']} | {r['fwd_s'] * 1e3:.1f} | {b['fwd_s'] / r['fwd_s']:.1f}x | "
                   f"{r['fwd_bwd_s'] * 1e3:.1f} | {b['fwd_bwd_s'] / r['fwd_bwd_s']:.1f}x | {r['max_abs_diff']:.1e} |")
    return '\n'.join(out)


def sweep(args) -> str:
    """native / fft time ratios over kernel sizes (columns) and map sizes (rows), forward and forward+backward."""
    ratios = {'fwd_s': {}, 'fwd_bwd_s': {}}
    for size in SWEEP_SIZES:
        for kernel in SWEEP_KERNELS:
            if kernel > 2 * size - 1:
                continue  # cropped to a kernel already in the row
            t = {impl: measure(impl, args.batch, 64, size, kernel, dtype=args.dtype, device=args.device,
                               repeats=args.repeats, clock=args.clock)[0] for impl in ('native', 'fft')}
            for key in ratios:
                ratios[key][size, kernel] = t['native'][key] / t['fft'][key]
            print(f'H={size} k={kernel}: {t}', file=sys.stderr, flush=True)
    lines = []
    for key, title in (('fwd_s', 'forward (no grad)'), ('fwd_bwd_s', 'forward+backward')):
        lines += [f'{title}: time native / fft (> 1: the FFT is faster), 64 channels, batch {args.batch}',
                  '| H=W | ' + ' | '.join(f'k={k}' for k in SWEEP_KERNELS) + ' |',
                  '|---|' + '---|' * len(SWEEP_KERNELS)]
        for size in SWEEP_SIZES:
            cells = [f'{ratios[key][size, k]:.2f}' if (size, k) in ratios[key] else '-' for k in SWEEP_KERNELS]
            lines.append(f'| {size} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    return '\n'.join(lines)


def model_step(args) -> str:
    """Median forward+backward step time of the model with each conv_impl, alternating step by step."""
    import timm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(args.device, args.dtype)
    y = torch.randint(0, 1000, (args.batch,), generator=gen).to(args.device)
    models = {}
    for impl in ('native', 'auto'):
        torch.manual_seed(0)
        models[impl] = timm.create_model(args.model, conv_impl=impl).to(args.device, args.dtype).train()

    def step(model):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), y).backward()

    times = {impl: [] for impl in models}
    for i in range(args.repeats + 1):
        for impl, model in models.items():
            t = timed(lambda model=model: step(model), 1, args.device, args.clock) if i else step(model)
            if i:
                times[impl].append(t)
                print(f'{impl}: {t:.2f} s', file=sys.stderr, flush=True)
    med = {impl: statistics.median(v) for impl, v in times.items()}
    return (f'{args.model} training step (fwd + cross-entropy + bwd), batch {args.batch}, {args.img_size} px, '
            f'median of {args.repeats}:\n' + '\n'.join(f'  conv_impl={impl:7s} {t:8.2f} s' for impl, t in med.items())
            + f'\n  speed-up of auto over native: {med["native"] / med["auto"]:.1f}x')


# name: (published params in M, published GMACs at 224, what the published params count, source)
PUBLISHED = {
    'convnext_tiny': (28.6, 4.5, 'dense', 'ConvNeXt README'),
    'convnext_small': (50.2, 8.7, 'dense', 'ConvNeXt README'),
    'convnext_base': (88.6, 15.4, 'dense', 'ConvNeXt README'),
    'replknet_31b': (79, 15.3, 'dense', 'RepLKNet README; PeLK Table 4'),
    'slak_t': (30, 5.0, 'non-zero', 'SLaK README; PeLK Table 4'),
    'slak_s': (55, 9.8, 'non-zero', 'SLaK README; PeLK Table 4'),
    'slak_b': (95, 17.1, 'non-zero', 'SLaK README; PeLK Table 4'),
    'pelk_t': (29, 5.6, 'non-zero', 'PeLK Table 4'),
    'pelk_s': (50, 10.7, 'non-zero', 'PeLK Table 4'),
    'pelk_b': (89, 18.3, 'non-zero', 'PeLK Table 4'),
}
SPARSITY = 0.4  # SLaK and PeLK: every 2-D / 4-D weight at 40% sparsity


def module_macs(model: torch.nn.Module, img_size: int) -> dict[str, int]:
    """Module name -> MACs of one ``img_size`` image, for every convolution, linear layer and peripheral convolution
    (see the module docstring for the convention), from forward hooks; runs on the model's device (meta works)."""
    from pretrain.models.pelk import PartialPeripheralConv

    counts: dict[str, int] = {}

    def hook(name):
        def count(m, inp, out):
            if isinstance(m, PartialPeripheralConv):
                b, h, w, _ = out.shape
                n = b * h * w * m.conv_channels * m.kernel_size ** 2
            elif isinstance(m, torch.nn.Linear):
                n = out.numel() * m.in_features
            else:
                n = out.numel() * m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
            counts[name] = counts.get(name, 0) + n
        return count

    kinds = (torch.nn.Conv2d, torch.nn.Linear, PartialPeripheralConv)
    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, kinds)]
    device = next(model.parameters()).device
    with torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size, device=device))
    for h in hooks:
        h.remove()
    return counts


def count_macs(model: torch.nn.Module, img_size: int) -> tuple[int, int]:
    """(dense MACs, MACs with every 2-D/4-D weight at ``1 - SPARSITY`` density) of one ``img_size`` image."""
    dense = sum(module_macs(model, img_size).values())
    return dense, round(dense * (1 - SPARSITY))  # every counted layer's weight is 2-D or 4-D: all are masked


def snip_macs(name: str, img_size: int, images: int, seed: int) -> tuple[float, dict[str, float]]:
    """MACs of ``name`` (timm) when each layer keeps the density SNIP gives it (``pretrain.engine.sparsity``, SLaK's
    ``--sparse_init snip``: one cross-entropy batch of ``images`` real ImageNet photos from the shared data, at
    initialisation seeded by ``seed``, a global top-60% of ``|w * grad|`` over every 2-D/4-D weight). Returns
    (MACs, layer name -> density). The photos are taken in file order with their WordNet-id labels."""
    import timm
    from PIL import Image

    from pretrain.demo import REAL_DATA as root  # ../shared/data/real beside the repository
    from pretrain.engine.sparsity import snip_densities, snip_scores

    files = sorted((root / 'imagenet-1k-samples').glob('*.JPEG'))[:images]
    if len(files) < images:
        raise FileNotFoundError(f'{root / "imagenet-1k-samples"}: {len(files)} photos, --snip-images asks {images}')
    wnids = (root / 'imagenet-1k-wnids.txt').read_text().split()
    transform = timm.data.create_transform(img_size)  # eval: resize, centre crop, ImageNet mean/std
    batch = {'image': torch.stack([transform(Image.open(f).convert('RGB')) for f in files]),
             'label': torch.tensor([wnids.index(f.name.split('_')[0]) for f in files])}
    torch.manual_seed(seed)
    model = timm.create_model(name, conv_impl='fft' if name.startswith('pelk') else 'native')
    masked = [n for n, p in model.named_parameters() if p.ndim in (2, 4)]
    densities = snip_densities(snip_scores(model, masked, batch), 1 - SPARSITY)
    layer_density = {n.rsplit('.', 1)[0]: d for n, d in densities.items() if n.endswith('.weight')}
    macs = module_macs(model.eval(), img_size)
    unmasked = sorted(set(macs) - set(layer_density))
    if unmasked:  # every counted layer has a 2-D/4-D weight; a miss would count it dense without a word
        raise RuntimeError(f'{name}: no SNIP density for the counted layers {unmasked[:3]}')
    return sum(v * layer_density[m] for m, v in macs.items()), densities


def table(args) -> str:
    """The comparison table (markdown)."""
    import timm

    import pretrain.models  # noqa: F401  (registers RepLKNet, SLaK, PeLK)

    seeds = [int(s) for s in args.snip_seeds.split(',')] if args.snip_images else []
    snip_head = ' MACs at SNIP densities (G) | SNIP / published |' if seeds else ''
    rows = ['| model | params dense (M) | params non-zero at 40% (M) | MACs dense (G) | MACs sparse (G) | '
            'published params (M) | published MACs (G) | ours / published (params, MACs) |' + snip_head,
            '|---|---|---|---|---|---|---|---|' + '---|---|' * bool(seeds)]
    entries = [(name, name, {}) for name in PUBLISHED]
    entries.insert(4, ('replknet_31b (deploy)', 'replknet_31b', {'small_kernel_merged': True}))
    if args.only:
        entries = [e for e in entries if e[1] in args.only.split(',')]
    for label, name, extra in entries:
        p_pub, g_pub, kind, _ = PUBLISHED[name]
        kwargs = {**({} if name.startswith('convnext') else {'conv_impl': 'native'}), **extra}
        with torch.device('meta'):
            model = timm.create_model(name, **kwargs).eval()
        dense = sum(p.numel() for p in model.parameters())
        nonzero = dense - round(SPARSITY * sum(p.numel() for p in model.parameters() if p.ndim in (2, 4)))
        macs, macs_sparse = count_macs(model, args.img_size)
        sparse_model = kind == 'non-zero'
        p_ours = (nonzero if sparse_model else dense) / 1e6
        g_ours = (macs_sparse if sparse_model else macs) / 1e9
        rows.append(f'| {label} | {dense / 1e6:.1f} | {nonzero / 1e6:.1f} | {macs / 1e9:.2f} | {macs_sparse / 1e9:.2f} '
                    f'| {p_pub} ({kind}) | {g_pub} | {p_ours / p_pub:.3f}, {g_ours / g_pub:.3f} |')
        if seeds and sparse_model:
            snip = [snip_macs(name, args.img_size, args.snip_images, seed)[0] / 1e9 for seed in seeds]
            rows[-1] += (f' {min(snip):.2f}-{max(snip):.2f} | {min(snip) / g_pub:.3f}-{max(snip) / g_pub:.3f} |'
                         if len(snip) > 1 else f' {snip[0]:.2f} | {snip[0] / g_pub:.3f} |')
        elif seeds:
            rows[-1] += ' - | - |'
        print(rows[-1], file=sys.stderr, flush=True)
    return '\n'.join(rows)


def step_times(args) -> str:
    """Training-step time and peak memory of each table model with conv_impl native and fft (markdown)."""
    import timm

    import pretrain.models  # noqa: F401

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(args.device)
    y = torch.randint(0, 1000, (args.batch,), generator=gen).to(args.device)
    rows = ['| model | conv_impl | step (s) | peak memory (GiB) |', '|---|---|---|---|']
    for name in PUBLISHED:
        for impl in (['-'] if name.startswith('convnext') else ['native', 'fft']):
            torch.manual_seed(0)
            model = timm.create_model(name, **({} if impl == '-' else {'conv_impl': impl})).to(args.device).train()

            def step(model=model):
                model.zero_grad(set_to_none=True)
                with torch.autocast(args.device, dtype=args.dtype, enabled=args.dtype != torch.float32):
                    loss = F.cross_entropy(model(x).float(), y)
                loss.backward()

            if args.device == 'cuda':
                torch.cuda.reset_peak_memory_stats()
            try:
                t = timed(step, args.repeats, args.device, args.clock)
            except torch.OutOfMemoryError:
                rows.append(f'| {name} | {impl} | out of memory | - |')
                continue
            finally:
                del model
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device == 'cuda' else float('nan')
            rows.append(f'| {name} | {impl} | {t:.3f} | {mem:.1f} |')
            print(rows[-1], file=sys.stderr, flush=True)
            if args.device == 'cuda':
                torch.cuda.empty_cache()
    return (f'training step (fwd + cross-entropy + bwd), batch {args.batch}, {args.img_size} px, '
            f'{str(args.dtype).removeprefix("torch.")} autocast, median of {args.repeats}\n' + '\n'.join(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', choices=sorted(MODEL_ARGS), default='pelk_t', help='stage shapes of this model')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--repeats', type=int, default=3, help='timed repetitions per measurement (median)')
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads (0: leave the default)')
    parser.add_argument('--clock', choices=['wall', 'cpu'], default='wall')
    parser.add_argument('--sweep', action='store_true', help='native vs fft over kernel and map sizes instead')
    parser.add_argument('--model-step', action='store_true', help='whole-model training step, native vs auto')
    parser.add_argument('--table', action='store_true', help="the PeLK paper's params / MACs comparison instead")
    parser.add_argument('--step-time', action='store_true', help='with --table: step time and memory per model')
    parser.add_argument('--snip-images', type=int, default=0,
                        help='with --table: also MACs at the per-layer densities SNIP gives on this many real '
                             'ImageNet photos (SLaK, PeLK; slow: a real forward+backward per model and seed)')
    parser.add_argument('--snip-seeds', default='0,1', help='with --snip-images: initialisation seeds (comma list)')
    parser.add_argument('--only', help='with --table: these models only (comma list of timm names)')
    parser.add_argument('--json', type=Path, help='also write the raw rows here')
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, '
          f'clock {args.clock}, {str(args.dtype).removeprefix("torch.")}'
          + (f', GPU {torch.cuda.get_device_name()}' if args.device == 'cuda' else ''))
    if args.table:
        print(f'params and multiply-accumulates at {args.img_size} px')
        print(table(args))
        if args.step_time:
            print(step_times(args))
        return 0
    if args.sweep:
        print(sweep(args))
        return 0
    if args.model_step:
        print(model_step(args))
        return 0
    rows = stage_rows(args)
    print(f'{args.model} stage shapes at {args.img_size} px (peripheral {CONV_RATIO:.3f} of the channels), '
          f'batch {args.batch}, median of {args.repeats}')
    print(stage_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
