"""SLaK (Liu et al., "More ConvNets in the 2020s: Scaling up Kernels Beyond 51x51 using Sparsity", ICLR 2023),
registered with timm as ``slak_t``, ``slak_s`` and ``slak_b``.

The module tree and state_dict keys are the official ones (VITA-Group/SLaK ``models/SLaK.py``; facts in
``shared/spec/objectives-and-models.md`` §D.2 and ``tests/official_layouts.py``): ConvNeXt's ``downsample_layers``
(stem 4x4/4 conv + channels-first LayerNorm; LayerNorm + 2x2/2 conv), ``stages.i.j`` blocks, ``norm`` (LayerNorm
after global average pooling) and ``head``, with every width ``int(1.3 * C)``. A block is
``x + drop_path(gamma * pwconv2(gelu(pwconv1(norm(large_kernel(x))))))`` where ``large_kernel`` is the decomposed
depth-wise kernel ``BN(W_{MxN} * x) + BN(W_{NxM} * x) + BN(W_{NxN} * x)`` (keys ``LoRA1``, ``LoRA2``,
``small_conv``; M = 51/49/47/13 per stage, N = 5). The release's later ``Decom1`` / ``Decom2`` names load too.
The stripes run through :func:`pretrain.ops.dwconv.dwconv2d` (native or FFT by the measured rule, ``conv_impl``).

Sparsity is not part of the model: SLaK trains with 40% dynamic sparsity (SNIP initialisation, magnitude pruning,
random growth), our ``pretrain.engine.sparsity`` callback (``sparsity.enabled: true``, ``init: snip``). SLaK's
published parameter counts (30M / 55M / 95M) are the non-zeros at that sparsity; :func:`parameter_counts` gives both.
Layout: NCHW between blocks.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from pretrain.models.factory import build_staged
from pretrain.models.replknet import ConvBN, StagedCNN

__all__ = ['SLaK', 'SLaKBlock', 'DecomposedLargeKernelConv', 'parameter_counts', 'MODEL_ARGS']

# Names of the two stripe branches in older / newer versions of the official file (checkpoints use either).
_RENAMED = {'Decom1.': 'LoRA1.', 'Decom2.': 'LoRA2.'}


class DecomposedLargeKernelConv(nn.Module):
    """Depth-wise ``BN(W_{MxN} x) + BN(W_{NxM} x) + BN(W_{NxN} x)`` (``decompose``), or ``BN(W_{MxM} x) +
    BN(W_{NxN} x)`` (SLaK's dense ablation, key ``lkb_origin``); the NxN branch only when N < M.
    ``(B, C, H, W)`` -> same."""

    def __init__(self, channels: int, kernel_size: int, small_kernel: int, decompose: bool = True,
                 conv_impl: str = 'auto'):
        super().__init__()
        self.kernel_size, self.small_kernel = kernel_size, small_kernel
        if decompose:
            self.LoRA1 = ConvBN(channels, channels, (kernel_size, small_kernel), groups=channels, conv_impl=conv_impl)
            self.LoRA2 = ConvBN(channels, channels, (small_kernel, kernel_size), groups=channels, conv_impl=conv_impl)
        else:
            self.lkb_origin = ConvBN(channels, channels, kernel_size, groups=channels, conv_impl=conv_impl)
        if small_kernel < kernel_size:
            self.small_conv = ConvBN(channels, channels, small_kernel, groups=channels, conv_impl=conv_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.LoRA1(x) + self.LoRA2(x) if hasattr(self, 'LoRA1') else self.lkb_origin(x)
        if hasattr(self, 'small_conv'):
            out = out + self.small_conv(x)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in _RENAMED.items():  # newer official files name the stripes Decom1 / Decom2
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SLaKBlock(nn.Module):
    """NCHW ``x + drop_path(gamma * MLP(LN(large_kernel(x))))``, the MLP channels-last (Linear 4x, GELU)."""

    def __init__(self, dim: int, kernel_size: int, small_kernel: int, drop_path: float = 0.0,
                 ls_init_value: float = 1e-6, decompose: bool = True, conv_impl: str = 'auto'):
        super().__init__()
        # gamma is the block's own parameter, so it comes first in the state_dict (as in the official file)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value > 0 else None
        self.large_kernel = DecomposedLargeKernelConv(dim, kernel_size, small_kernel, decompose, conv_impl)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.large_kernel(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class SLaKStage(nn.Sequential):
    """The official ``nn.Sequential`` of blocks (keys ``stages.i.j``); ``blocks`` names the same container for
    :func:`pretrain.models.factory.checkpointable_blocks`."""

    @property
    def blocks(self) -> nn.Sequential:
        return self


class SLaK(StagedCNN):
    """SLaK classifier / backbone. Input ``(B, in_chans, H, W)``; ``forward`` returns ``(B, num_classes)``;
    ``forward_features`` the last stage ``(B, dims[-1], H/32, W/32)`` NCHW; ``forward_head`` average pool,
    LayerNorm, Linear.

    Official arguments: ``depths``, ``dims`` (before ``width_factor``), ``kernel_size`` (the 4 stage sizes then the
    short edge N, e.g. (51, 49, 47, 13, 5)), ``width_factor`` (1.3), ``Decom`` (stripes; False: dense MxM),
    ``layer_scale_init_value``, ``head_init_scale``. Ours: ``conv_impl``, timm's ``global_pool``, ``drop_rate``."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            depths: Sequence[int] = (3, 3, 9, 3),
            dims: Sequence[int] = (96, 192, 384, 768),
            drop_path_rate: float = 0.0,
            layer_scale_init_value: float = 1e-6,
            head_init_scale: float = 1.0,
            kernel_size: Sequence[int] = (51, 49, 47, 13, 5),
            width_factor: float = 1.3,
            Decom: bool = True,  # noqa: N803 - the official argument name
            conv_impl: str = 'auto',
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        super().__init__()
        if not len(depths) == len(dims) == len(kernel_size) - 1 == 4:
            raise ValueError(f'depths {list(depths)} and dims {list(dims)} need 4 values and kernel_size '
                             f'{list(kernel_size)} 5 (4 stage sizes, then the short edge)')
        dims = [int(d * width_factor) for d in dims]
        self.num_classes, self.global_pool, self.drop_rate = num_classes, global_pool, drop_rate
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()  # meta-device safe
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(4):
            rates = dpr[sum(depths[:i]):sum(depths[:i + 1])]
            self.stages.append(SLaKStage(*[
                SLaKBlock(dims[i], kernel_size[i], kernel_size[-1], rates[j], layer_scale_init_value, Decom,
                          conv_impl) for j in range(depths[i])]))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # As the official file: trunc-normal(.02) for convs and linears, zero biases; BN keeps PyTorch's init.
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------------------
    # timm interface
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Stem, then blocks in forward order (a downsampling layer joins its stage's first block), then the head."""
        return dict(
            stem=r'^downsample_layers\.0\.',
            blocks=r'^(?:stages|downsample_layers)\.(\d+)' if coarse else [
                (r'^downsample_layers\.(\d+)', (0,)),
                (r'^stages\.(\d+)\.(\d+)', None),
            ],
        )

    def _stages_forward(self, x: torch.Tensor, max_stage: int | None = None) -> list[torch.Tensor]:
        outs = []
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            x = stage(down(x))
            outs.append(x)
            if max_stage is not None and i >= max_stage:
                break
        return outs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average pool, LayerNorm, (dropout,) Linear: ``(B, num_classes)`` or ``(B, num_features)``."""
        if self.global_pool:
            x = self.norm(x.mean((-2, -1)))
        x = F.dropout(x, self.drop_rate, self.training) if self.drop_rate else x
        return x if pre_logits else self.head(x)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last requested one and, with ``prune_head``, the classifier."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


def parameter_counts(model: nn.Module, sparsity: float = 0.4) -> tuple[int, int]:
    """``(dense, non-zero)`` parameter counts when every 2-D and 4-D weight (SLaK's default masking) keeps
    ``1 - sparsity`` of its entries."""
    dense = sum(p.numel() for p in model.parameters())
    masked = sum(p.numel() for p in model.parameters() if p.ndim in (2, 4))
    return dense, dense - round(sparsity * masked)


def _cfg(**kwargs) -> dict:
    return {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875,
            'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
            'first_conv': 'downsample_layers.0.0', 'classifier': 'head', **kwargs}


# Released weights are on Google Drive / Surfdrive (no timm hub files): load them with checkpoint_path=.
default_cfgs = generate_default_cfgs({'slak_t': _cfg(), 'slak_s': _cfg(), 'slak_b': _cfg()})

# The official SLaK_tiny / small / base arguments with the README's training settings (1.3x width, 51-49-47-13 + 5
# stripes, drop path 0.1 / 0.4 / 0.5).
MODEL_ARGS: dict[str, dict] = {
    'slak_t': dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), kernel_size=(51, 49, 47, 13, 5), width_factor=1.3,
                   drop_path_rate=0.1),
    'slak_s': dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), kernel_size=(51, 49, 47, 13, 5),
                   width_factor=1.3, drop_path_rate=0.4),
    'slak_b': dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), kernel_size=(51, 49, 47, 13, 5),
                   width_factor=1.3, drop_path_rate=0.5),
}


def _create(variant: str, pretrained: bool, kwargs: dict) -> SLaK:
    return build_staged(SLaK, variant, pretrained, MODEL_ARGS[variant], kwargs)


@register_model
def slak_t(pretrained: bool = False, **kwargs) -> SLaK:
    """SLaK-T: depths 3-3-9-3, widths 124-998, 51x5 / 49x5 / 47x5 / 13x5 stripes + 5x5 (30M non-zero, 5.0G)."""
    return _create('slak_t', pretrained, kwargs)


@register_model
def slak_s(pretrained: bool = False, **kwargs) -> SLaK:
    """SLaK-S: depths 3-3-27-3, widths 124-998 (55M non-zero, 9.8G)."""
    return _create('slak_s', pretrained, kwargs)


@register_model
def slak_b(pretrained: bool = False, **kwargs) -> SLaK:
    """SLaK-B: depths 3-3-27-3, widths 166-1331 (95M non-zero, 17.1G)."""
    return _create('slak_b', pretrained, kwargs)
