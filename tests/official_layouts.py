"""The state_dict layouts of the official RepLKNet (DingXiaoH/RepLKNet-pytorch ``replknet.py``) and SLaK
(VITA-Group/SLaK ``models/SLaK.py``) releases, written down as facts (module names, registration order, shapes), not
from our model code: ``replknet_layout(...)`` / ``slak_layout(...)`` give the ordered ``[(key, shape)]`` of the
official model built with those arguments.

RepLKNet facts: ``conv_bn`` is ``nn.Sequential(conv (bias=False), bn)``, ``conv_bn_relu`` adds ``nonlinear`` (ReLU,
no keys); the model registers ``stem`` (ModuleList of 4 conv_bn_relu: 3x3/2 C_in->C0, 3x3 dw, 1x1, 3x3/2 dw),
``stages`` (``RepLKNetStage.blocks``: per layer a RepLKBlock then a ConvFFN; ``norm`` Identity for
classification), ``transitions`` (Sequential of conv_bn_relu 1x1 C_i->C_{i+1} and 3x3/2 dw), then ``norm`` (BN),
``avgpool``, ``head`` (Linear). RepLKBlock registers ``pw1`` (conv_bn_relu 1x1 C->dw), ``pw2`` (conv_bn 1x1 dw->C),
``large_kernel`` (``lkb_origin`` conv_bn KxK dw, ``small_conv`` conv_bn 5x5 dw when small_kernel is set; merged:
``lkb_reparam`` conv with bias), ``lk_nonlinear``, ``prelkb_bn``. ConvFFN registers ``drop_path``, ``preffn_bn``,
``pw1`` (conv_bn 1x1 C->4C), ``pw2`` (conv_bn 1x1 4C->C), ``nonlinear``. dw channels = int(C * dw_ratio).

SLaK facts: ConvNeXt's layout with ``dims = [int(d * width_factor)]``: ``downsample_layers.0`` = Sequential(Conv2d
4x4/4 with bias, LayerNorm channels_first (weight, bias)), ``downsample_layers.{1,2,3}`` = Sequential(LayerNorm,
Conv2d 2x2/2 with bias); ``stages.i.j`` Block registering ``gamma`` (a parameter of the block itself, so first),
``large_kernel`` (Decom: ``LoRA1`` conv_bn (M, N) dw, ``LoRA2`` conv_bn (N, M) dw, ``small_conv`` conv_bn NxN dw
when N < M), ``norm`` (LayerNorm), ``pwconv1`` (Linear C->4C), ``act``, ``pwconv2`` (Linear 4C->C), ``drop_path``;
then ``norm`` (nn.LayerNorm) and ``head`` (Linear).
"""
from __future__ import annotations

BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f'{prefix}.{k}', () if k == 'num_batches_tracked' else (c,)) for k in BN]


def _conv_bn(prefix: str, cin: int, cout: int, kh: int, kw: int | None = None, groups: int = 1):
    return [(f'{prefix}.conv.weight', (cout, cin // groups, kh, kw or kh))] + _bn(f'{prefix}.bn', cout)


def replknet_layout(large_kernel_sizes, layers, channels, small_kernel=5, dw_ratio=1.0, ffn_ratio=4.0,
                    num_classes=1000, in_chans=3, small_kernel_merged=False) -> list[tuple[str, tuple[int, ...]]]:
    """Ordered (key, shape) of the official RepLKNet with these constructor arguments."""
    c0 = channels[0]
    out = _conv_bn('stem.0', in_chans, c0, 3) + _conv_bn('stem.1', c0, c0, 3, groups=c0) + \
        _conv_bn('stem.2', c0, c0, 1) + _conv_bn('stem.3', c0, c0, 3, groups=c0)
    for i, (k, n, c) in enumerate(zip(large_kernel_sizes, layers, channels)):
        dw, hidden = int(c * dw_ratio), int(c * ffn_ratio)
        for j in range(n):
            p = f'stages.{i}.blocks.{2 * j}'
            out += _conv_bn(f'{p}.pw1', c, dw, 1) + _conv_bn(f'{p}.pw2', dw, c, 1)
            if small_kernel_merged:
                out += [(f'{p}.large_kernel.lkb_reparam.weight', (dw, 1, k, k)),
                        (f'{p}.large_kernel.lkb_reparam.bias', (dw,))]
            else:
                out += _conv_bn(f'{p}.large_kernel.lkb_origin', dw, dw, k, groups=dw)
                if small_kernel is not None:
                    out += _conv_bn(f'{p}.large_kernel.small_conv', dw, dw, small_kernel, groups=dw)
            out += _bn(f'{p}.prelkb_bn', c)
            p = f'stages.{i}.blocks.{2 * j + 1}'
            out += _bn(f'{p}.preffn_bn', c) + _conv_bn(f'{p}.pw1', c, hidden, 1) + _conv_bn(f'{p}.pw2', hidden, c, 1)
    for i in range(len(channels) - 1):
        a, b = channels[i], channels[i + 1]
        out += _conv_bn(f'transitions.{i}.0', a, b, 1) + _conv_bn(f'transitions.{i}.1', b, b, 3, groups=b)
    out += _bn('norm', channels[-1]) + [('head.weight', (num_classes, channels[-1])), ('head.bias', (num_classes,))]
    return out


def slak_layout(depths, dims, kernel_sizes, width_factor=1.3, num_classes=1000, in_chans=3):
    """Ordered (key, shape) of the official SLaK (``Decom=True``, ``bn=True``); ``kernel_sizes`` = the 4 stage
    sizes then the short edge N, e.g. (51, 49, 47, 13, 5)."""
    dims = [int(d * width_factor) for d in dims]
    n = kernel_sizes[-1]
    out = [('downsample_layers.0.0.weight', (dims[0], in_chans, 4, 4)), ('downsample_layers.0.0.bias', (dims[0],)),
           ('downsample_layers.0.1.weight', (dims[0],)), ('downsample_layers.0.1.bias', (dims[0],))]
    for i in range(3):
        out += [(f'downsample_layers.{i + 1}.0.weight', (dims[i],)), (f'downsample_layers.{i + 1}.0.bias', (dims[i],)),
                (f'downsample_layers.{i + 1}.1.weight', (dims[i + 1], dims[i], 2, 2)),
                (f'downsample_layers.{i + 1}.1.bias', (dims[i + 1],))]
    for i, (depth, c, m) in enumerate(zip(depths, dims, kernel_sizes[:4])):
        for j in range(depth):
            p = f'stages.{i}.{j}'
            out += [(f'{p}.gamma', (c,))]
            out += _conv_bn(f'{p}.large_kernel.LoRA1', c, c, m, n, groups=c)
            out += _conv_bn(f'{p}.large_kernel.LoRA2', c, c, n, m, groups=c)
            if n < m:
                out += _conv_bn(f'{p}.large_kernel.small_conv', c, c, n, groups=c)
            out += [(f'{p}.norm.weight', (c,)), (f'{p}.norm.bias', (c,)),
                    (f'{p}.pwconv1.weight', (4 * c, c)), (f'{p}.pwconv1.bias', (4 * c,)),
                    (f'{p}.pwconv2.weight', (c, 4 * c)), (f'{p}.pwconv2.bias', (c,))]
    out += [('norm.weight', (dims[-1],)), ('norm.bias', (dims[-1],)),
            ('head.weight', (num_classes, dims[-1])), ('head.bias', (num_classes,))]
    return out
