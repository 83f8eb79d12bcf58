"""RepLKNet (Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022), registered with timm as ``replknet_31b``,
``replknet_31l`` and ``replknet_xl``.

The module tree, attribute names and ``nn.Sequential`` wrappers are those of the official PyTorch release
(DingXiaoH/RepLKNet-pytorch ``replknet.py``, facts in ``shared/spec/objectives-and-models.md`` §D.1 and
``tests/fixtures/replknet_keys.py``), so its ``state_dict`` keys, shapes and order equal the released checkpoints'
and they load with ``strict=True``:

* ``stem.{0..3}``: conv-BN-ReLU (3x3/2, 3x3 depth-wise, 1x1, 3x3/2 depth-wise), keys ``conv``/``bn``;
* ``stages.i.blocks.{2j}``: :class:`RepLKBlock` ``x + drop_path(pw2(relu(large_kernel(pw1(prelkb_bn(x))))))``;
* ``stages.i.blocks.{2j+1}``: :class:`ConvFFN` ``x + drop_path(pw2(gelu(pw1(preffn_bn(x)))))`` (4x);
* ``transitions.i``: 1x1 conv-BN-ReLU, then 3x3/2 depth-wise conv-BN-ReLU;
* ``norm`` (BatchNorm), average pool, ``head`` (Linear).

Structural re-parameterisation: :class:`ReparamLargeKernelConv` trains ``BN(W_K * x) + BN(W_5 * x)``;
``reparameterize()`` (called by ``timm.utils.reparameterize_model``) folds each BN into its kernel, pads the 5x5 to
K x K and sums them into one K x K depth-wise conv with bias, ``large_kernel.lkb_reparam`` (the official deploy keys,
what ``small_kernel_merged=True`` builds directly). The large depth-wise kernels run through
:func:`pretrain.ops.dwconv.dwconv2d` (native or FFT by the measured rule; ``conv_impl`` forces one). Layout: NCHW
throughout. BatchNorm is ``nn.BatchNorm2d`` (the official default ``use_sync_bn=True`` only changes the class).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from pretrain.models.factory import build_staged, set_grad_checkpointing
from pretrain.ops.dwconv import IMPLS, dwconv2d

__all__ = ['RepLKNet', 'ReparamLargeKernelConv', 'RepLKBlock', 'ConvFFN', 'LargeDepthwiseConv', 'ConvBN',
           'fuse_conv_bn', 'StagedCNN', 'MODEL_ARGS']


class LargeDepthwiseConv(nn.Conv2d):
    """A depth-wise, stride-1, 'same'-padded ``nn.Conv2d`` (same parameters and keys) computed by
    :func:`pretrain.ops.dwconv.dwconv2d` with ``conv_impl`` ('auto' | 'native' | 'fft'). Odd kernels only."""

    def __init__(self, channels: int, kernel_size: int | tuple[int, int], bias: bool = False,
                 conv_impl: str = 'auto'):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        super().__init__(channels, channels, (kh, kw), stride=1, padding=(kh // 2, kw // 2), groups=channels,
                         bias=bias)
        if conv_impl not in IMPLS:
            raise ValueError(f'conv_impl must be one of {IMPLS}, got {conv_impl!r}')
        self.conv_impl = conv_impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dwconv2d(x, self.weight, self.bias, impl=self.conv_impl)


class ConvBN(nn.Sequential):
    """``conv`` (no bias) then ``bn``, and ``nonlinear`` (ReLU) when ``relu``: the official ``conv_bn`` /
    ``conv_bn_relu`` Sequential, keys ``conv.weight``, ``bn.*``. A depth-wise stride-1 kernel above 5 uses
    :class:`LargeDepthwiseConv` (the official code's large-kernel rule)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 groups: int = 1, relu: bool = False, conv_impl: str = 'auto'):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        large = in_chs == out_chs == groups and stride == 1 and max(kh, kw) > 5
        if large:
            self.add_module('conv', LargeDepthwiseConv(out_chs, (kh, kw), conv_impl=conv_impl))
        else:
            self.add_module('conv', nn.Conv2d(in_chs, out_chs, (kh, kw), stride, (kh // 2, kw // 2),
                                              groups=groups, bias=False))
        self.add_module('bn', nn.BatchNorm2d(out_chs))
        if relu:
            self.add_module('nonlinear', nn.ReLU())


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of the conv that equals ``bn(conv(x))`` in eval mode: ``w * t``, ``beta - mean * t`` with
    ``t = gamma / sqrt(var + eps)`` per output channel (the conv's own bias, if any, is folded in too)."""
    t = bn.weight / (bn.running_var + bn.eps).sqrt()
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * t.reshape(-1, 1, 1, 1), bn.bias + (bias - bn.running_mean) * t


class ReparamLargeKernelConv(nn.Module):
    """Depth-wise ``BN(W_K * x) + BN(W_s * x)`` (``lkb_origin``, ``small_conv``; no small branch when
    ``small_kernel`` is None), or after :meth:`reparameterize` / with ``small_kernel_merged`` one K x K conv with
    bias, ``lkb_reparam``. ``(B, C, H, W)`` -> same."""

    def __init__(self, channels: int, kernel_size: int, small_kernel: int | None, small_kernel_merged: bool = False,
                 conv_impl: str = 'auto'):
        super().__init__()
        if small_kernel is not None and not (small_kernel <= kernel_size and small_kernel % 2 == 1):
            raise ValueError(f'small_kernel must be odd and <= kernel_size {kernel_size}, got {small_kernel}')
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.conv_impl = conv_impl
        if small_kernel_merged:
            self.lkb_reparam = LargeDepthwiseConv(channels, kernel_size, bias=True, conv_impl=conv_impl)
        else:
            self.lkb_origin = ConvBN(channels, channels, kernel_size, groups=channels, conv_impl=conv_impl)
            if small_kernel is not None:
                self.small_conv = ConvBN(channels, channels, small_kernel, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, 'lkb_reparam'):
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if hasattr(self, 'small_conv'):
            out = out + self.small_conv(x)
        return out

    @torch.no_grad()
    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, 1, K, K)`` kernel and ``(C,)`` bias of the merged conv (eval-mode BN statistics)."""
        kernel, bias = fuse_conv_bn(self.lkb_origin.conv, self.lkb_origin.bn)
        if hasattr(self, 'small_conv'):
            small, small_bias = fuse_conv_bn(self.small_conv.conv, self.small_conv.bn)
            pad = (self.kernel_size - self.small_kernel) // 2
            kernel = kernel + F.pad(small, [pad] * 4)  # the 5x5 lands on the centre taps
            bias = bias + small_bias
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace ``lkb_origin`` (+ ``small_conv``) by ``lkb_reparam`` in place; a no-op once merged."""
        if hasattr(self, 'lkb_reparam'):
            return
        kernel, bias = self.equivalent_kernel_bias()
        conv = LargeDepthwiseConv(kernel.shape[0], self.kernel_size, bias=True, conv_impl=self.conv_impl)
        conv.to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        self.lkb_reparam = conv
        del self.lkb_origin
        if hasattr(self, 'small_conv'):
            del self.small_conv


class RepLKBlock(nn.Module):
    """``x + drop_path(pw2(relu(large_kernel(pw1(prelkb_bn(x))))))``, pw1 ``C -> dw_channels`` with BN and ReLU,
    pw2 back with BN. NCHW."""

    def __init__(self, in_chs: int, dw_chs: int, kernel_size: int, small_kernel: int | None, drop_path: float = 0.0,
                 small_kernel_merged: bool = False, conv_impl: str = 'auto'):
        super().__init__()
        # Registration order is the official one (it fixes the state_dict order).
        self.pw1 = ConvBN(in_chs, dw_chs, 1, relu=True)
        self.pw2 = ConvBN(dw_chs, in_chs, 1)
        self.large_kernel = ReparamLargeKernelConv(dw_chs, kernel_size, small_kernel, small_kernel_merged, conv_impl)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(in_chs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw2(self.lk_nonlinear(self.large_kernel(self.pw1(self.prelkb_bn(x)))))
        return x + self.drop_path(out)

    def reparameterize(self) -> None:
        """Merge the large kernel's branches (see :meth:`ReparamLargeKernelConv.reparameterize`)."""
        self.large_kernel.reparameterize()


class ConvFFN(nn.Module):
    """``x + drop_path(pw2(gelu(pw1(preffn_bn(x)))))``, 1x1 convs with BN, hidden width ``hidden_chs``. NCHW."""

    def __init__(self, in_chs: int, hidden_chs: int, drop_path: float = 0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.preffn_bn = nn.BatchNorm2d(in_chs)
        self.pw1 = ConvBN(in_chs, hidden_chs, 1)
        self.pw2 = ConvBN(hidden_chs, in_chs, 1)
        self.nonlinear = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x)))))


class RepLKNetStage(nn.Module):
    """``depth`` pairs (RepLKBlock, ConvFFN) in ``blocks``; ``norm`` is Identity (the official BN here is for XL on
    downstream tasks only)."""

    def __init__(self, channels: int, depth: int, kernel_size: int, small_kernel: int | None,
                 drop_path_rates: Sequence[float], dw_ratio: float, ffn_ratio: float, small_kernel_merged: bool,
                 conv_impl: str):
        super().__init__()
        blocks = []
        for j in range(depth):
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), kernel_size, small_kernel,
                                     drop_path_rates[j], small_kernel_merged, conv_impl))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), drop_path_rates[j]))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


class StagedCNN(nn.Module):
    """The timm interface shared by RepLKNet and SLaK (NCHW stage models): subclasses provide ``_stages_forward(x,
    max_stage)`` (per-stage outputs), ``forward_head``, ``head``, ``num_features``, ``stages``, ``global_pool`` and
    ``_init_weights``."""

    block_layout = 'NCHW'  # its blocks take channels-first input (pretrain.objectives.masking.block_layout)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Non-reentrant activation checkpointing of every ``every``-th block
        (:func:`pretrain.models.factory.set_grad_checkpointing`)."""
        set_grad_checkpointing(self, enable, every=every)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New ``head`` (``Linear(num_features, num_classes)``, Identity if 0)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        p = next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=p.device, dtype=p.dtype) if num_classes > 0
                     else nn.Identity())
        self._init_weights(self.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> the last stage ``(B, num_features, H/32, W/32)`` (before the head's norm)."""
        return self._stages_forward(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False):
        """Per-stage outputs (NCHW), as timm's CNNs: ``indices`` last n / all / a list. Returns the intermediates,
        or ``(forward_features(x), intermediates)``."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        outs = self._stages_forward(x, max_stage=max_index if (stop_early and intermediates_only) else None)
        intermediates = [outs[i] for i in take_indices]
        return intermediates if intermediates_only else (outs[-1], intermediates)


class RepLKNet(StagedCNN):
    """RepLKNet classifier / backbone. Input ``(B, in_chans, H, W)`` (H, W multiples of 32); ``forward`` returns
    ``(B, num_classes)``; ``forward_features`` the last stage ``(B, channels[-1], H/32, W/32)`` NCHW.

    Official arguments: ``large_kernel_sizes``, ``layers``, ``channels`` (per stage), ``small_kernel`` (None: no
    parallel branch), ``dw_ratio``, ``ffn_ratio``, ``small_kernel_merged`` (build the deploy form). Ours:
    ``conv_impl`` ('auto' | 'native' | 'fft') for the large kernels, timm's ``in_chans``, ``drop_rate``,
    ``global_pool`` ('avg' or '' for the pooled / unpooled head input)."""

    deploy_kwargs = {'small_kernel_merged': True}  # builds what reparameterize_model leaves (pretrain.export --deploy)

    def __init__(
            self,
            large_kernel_sizes: Sequence[int] = (31, 29, 27, 13),
            layers: Sequence[int] = (2, 2, 18, 2),
            channels: Sequence[int] = (128, 256, 512, 1024),
            drop_path_rate: float = 0.0,
            small_kernel: int | None = 5,
            dw_ratio: float = 1.0,
            ffn_ratio: float = 4.0,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            small_kernel_merged: bool = False,
            conv_impl: str = 'auto',
    ):
        super().__init__()
        n = len(layers)
        if not len(large_kernel_sizes) == len(channels) == n:
            raise ValueError(f'large_kernel_sizes {list(large_kernel_sizes)}, layers {list(layers)} and channels '
                             f'{list(channels)} need one value per stage')
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        c0 = channels[0]
        self.stem = nn.ModuleList([
            ConvBN(in_chans, c0, 3, stride=2, relu=True),
            ConvBN(c0, c0, 3, groups=c0, relu=True),
            ConvBN(c0, c0, 1, relu=True),
            ConvBN(c0, c0, 3, stride=2, groups=c0, relu=True)])
        dpr = torch.linspace(0, drop_path_rate, sum(layers), device='cpu').tolist()  # meta-device safe
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.feature_info = []
        for i in range(n):
            self.stages.append(RepLKNetStage(channels[i], layers[i], large_kernel_sizes[i], small_kernel,
                                             dpr[sum(layers[:i]):sum(layers[:i + 1])], dw_ratio, ffn_ratio,
                                             small_kernel_merged, conv_impl))
            self.feature_info.append(dict(num_chs=channels[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
            if i < n - 1:
                self.transitions.append(nn.Sequential(
                    ConvBN(channels[i], channels[i + 1], 1, relu=True),
                    ConvBN(channels[i + 1], channels[i + 1], 3, stride=2, groups=channels[i + 1], relu=True)))
        self.num_features = self.head_hidden_size = channels[-1]
        self.norm = nn.BatchNorm2d(channels[-1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The official file leaves PyTorch's defaults; trunc-normal(.02) linears with zero bias as timm's CNNs.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------------------
    # timm interface
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Stem, then blocks in forward order (transition i its own layer after stage i), then the head."""
        return dict(
            stem=r'^stem',
            blocks=r'^(?:stages|transitions)\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^transitions\.(\d+)', (9999,)),  # its own layer after stage i's blocks (99999 is timm's 'previous')
            ],
        )

    def _stages_forward(self, x: torch.Tensor, max_stage: int | None = None) -> list[torch.Tensor]:
        for layer in self.stem:
            x = layer(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(x)
            if max_stage is not None and i >= max_stage:
                break
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return outs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """BN, average pool, (dropout,) Linear: ``(B, num_classes)``, or ``(B, num_features)`` with ``pre_logits``."""
        x = self.norm(x)
        if self.global_pool:
            x = torch.flatten(self.avgpool(x), 1)
        x = F.dropout(x, self.drop_rate, self.training) if self.drop_rate else x
        return x if pre_logits else self.head(x)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last requested one and, with ``prune_head``, the classifier."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.transitions = self.transitions[:max_index]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


def _cfg(**kwargs) -> dict:
    return {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875,
            'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
            'first_conv': 'stem.0.conv', 'classifier': 'head', **kwargs}


# Released weights are on Google Drive / Baidu (no timm hub files): load them with checkpoint_path=.
default_cfgs = generate_default_cfgs({
    'replknet_31b': _cfg(), 'replknet_31l': _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
    'replknet_xl': _cfg(input_size=(3, 320, 320), pool_size=(10, 10), crop_pct=1.0)})

# The official create_RepLKNet31B / 31L / XL arguments (drop path: the official 0.3 default; 31B's recipe is 0.5).
MODEL_ARGS: dict[str, dict] = {
    'replknet_31b': dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024),
                         small_kernel=5, drop_path_rate=0.3),
    'replknet_31l': dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(192, 384, 768, 1536),
                         small_kernel=5, drop_path_rate=0.3),
    'replknet_xl': dict(large_kernel_sizes=(27, 27, 27, 13), layers=(2, 2, 18, 2), channels=(256, 512, 1024, 2048),
                        small_kernel=None, dw_ratio=1.5, drop_path_rate=0.3),
}


def _create(variant: str, pretrained: bool, kwargs: dict) -> RepLKNet:
    return build_staged(RepLKNet, variant, pretrained, MODEL_ARGS[variant], kwargs)


@register_model
def replknet_31b(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31B: kernels 31/29/27/13 + 5x5, layers 2-2-18-2, channels 128-1024 (79M, 15.3G at 224)."""
    return _create('replknet_31b', pretrained, kwargs)


@register_model
def replknet_31l(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31L: as 31B with channels 192-1536 (172M, 96G at 384)."""
    return _create('replknet_31l', pretrained, kwargs)


@register_model
def replknet_xl(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-XL: kernels 27/27/27/13, no small kernel, dw_ratio 1.5, channels 256-2048 (335M, 128.7G at 320)."""
    return _create('replknet_xl', pretrained, kwargs)
