"""InternImage (DCNv3 ConvNets), module tree and state_dict keys identical to the official release.

Paper: `InternImage: Exploring Large-Scale Vision Foundation Models with Deformable Convolutions`
(Wang et al., CVPR 2023). The module/attribute names, the ``nn.Sequential`` wrappers around norms (which give the
``.0.`` / ``.1.`` key indices), the forward variants (pre-norm, post-norm, res-post-norm, layer scale, level-2 post
norms, center feature scale) and the initialisation follow ``classification/models/intern_image.py`` of
OpenGVLab/InternImage, so released ``.pth`` files load with ``strict=True`` and our weights load in downstream repos.

Layouts: the model takes NCHW images ``(B, 3, H, W)``. Between layers the backbone works channels-last
``(B, H', W', C)`` (the DCNv3 operator is NHWC); convolutions run NCHW with permutes around them.

Beyond the official model (nothing here changes keys or numerics):
* timm interface: ``forward_features`` / ``forward_head`` / ``forward_intermediates`` / ``reset_classifier`` /
  ``group_matcher`` / ``set_grad_checkpointing(enable, every=k)`` and ``features_only=True`` via the registry;
* non-reentrant per-block activation checkpointing (``with_cp`` maps to it).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_module
from timm.models._features import feature_take_indices

from pretrain.ops import CORE_OPS, DCNv3, build_act_layer, build_norm_layer

__all__ = ['InternImage', 'CORE_OP_BACKENDS', 'checkpoint_filter_fn']

# Official ``core_op`` names -> backend of our operator (both official ops have identical parameters and keys).
CORE_OP_BACKENDS = CORE_OPS

# Constants of the H/G classification head (fixed in the official code, not constructor arguments).
CLIP_PRETRAIN_EMBED_DIM = 1024
CLIP_EMBED_DIM = 768
CLIP_ATTNPOOL_NUM_HEADS = 16
CLIP_UPSAMPLE_STRIDE = 2


def _nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nchw_to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class StemLayer(nn.Module):
    """Two stride-2 3x3 convs: ``(B, in_chans, H, W)`` NCHW -> ``(B, H/4, W/4, out_chans)`` NHWC."""

    def __init__(self, in_chans: int = 3, out_chans: int = 96, act_layer: str = 'GELU', norm_layer: str = 'BN'):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = build_norm_layer(out_chans // 2, norm_layer, 'channels_first', 'channels_first')
        self.act = build_act_layer(act_layer)
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, kernel_size=3, stride=2, padding=1)
        self.norm2 = build_norm_layer(out_chans, norm_layer, 'channels_first', 'channels_last')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.norm1(x)
        x = self.act(x)
        x = self.conv2(x)
        return self.norm2(x)


class DownsampleLayer(nn.Module):
    """Stride-2 3x3 conv doubling channels: ``(B, H, W, C)`` NHWC -> ``(B, H/2, W/2, 2C)`` NHWC."""

    def __init__(self, channels: int, norm_layer: str = 'LN'):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = build_norm_layer(2 * channels, norm_layer, 'channels_first', 'channels_last')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(_nhwc_to_nchw(x))
        return self.norm(x)


class MLPLayer(nn.Module):
    """Channel MLP on the last dim: ``(..., C) -> (..., out_features)``."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: str = 'GELU', drop: float = 0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = build_act_layer(act_layer)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        return self.drop(x)


class InternImageLayer(nn.Module):
    """One DCNv3 block, ``(B, H, W, C)`` NHWC in and out.

    Norm placement (official precedence): ``post_norm`` > ``res_post_norm`` > pre-norm; ``res_post_norm`` is ignored
    when ``layer_scale`` is set. ``gamma1``/``gamma2`` exist only when ``layer_scale`` is not None.
    """

    def __init__(
            self,
            core_op: str,
            channels: int,
            groups: int,
            mlp_ratio: float = 4.0,
            drop: float = 0.0,
            drop_path: float = 0.0,
            act_layer: str = 'GELU',
            norm_layer: str = 'LN',
            post_norm: bool = False,
            layer_scale: float | None = None,
            offset_scale: float = 1.0,
            with_cp: bool = False,
            dw_kernel_size: int | None = None,
            res_post_norm: bool = False,
            center_feature_scale: bool = False,
            remove_center: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.groups = groups
        self.mlp_ratio = mlp_ratio
        self.grad_checkpointing = with_cp
        self.norm1 = build_norm_layer(channels, 'LN')
        self.post_norm = post_norm
        self.dcn = DCNv3(
            channels=channels,
            kernel_size=3,
            stride=1,
            pad=1,
            dilation=1,
            group=groups,
            offset_scale=offset_scale,
            act_layer=act_layer,
            norm_layer=norm_layer,
            dw_kernel_size=dw_kernel_size,
            center_feature_scale=center_feature_scale,
            remove_center=remove_center,
            backend=CORE_OP_BACKENDS[core_op],
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = build_norm_layer(channels, 'LN')
        self.mlp = MLPLayer(in_features=channels, hidden_features=int(channels * mlp_ratio), act_layer=act_layer,
                            drop=drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(channels), requires_grad=True)
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(channels), requires_grad=True)
        self.res_post_norm = res_post_norm
        if res_post_norm:
            self.res_post_norm1 = build_norm_layer(channels, 'LN')
            self.res_post_norm2 = build_norm_layer(channels, 'LN')

    def _inner_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.layer_scale:
            if self.post_norm:
                x = x + self.drop_path(self.norm1(self.dcn(x)))
                x = x + self.drop_path(self.norm2(self.mlp(x)))
            elif self.res_post_norm:
                x = x + self.drop_path(self.res_post_norm1(self.dcn(self.norm1(x))))
                x = x + self.drop_path(self.res_post_norm2(self.mlp(self.norm2(x))))
            else:
                x = x + self.drop_path(self.dcn(self.norm1(x)))
                x = x + self.drop_path(self.mlp(self.norm2(x)))
            return x
        if self.post_norm:
            x = x + self.drop_path(self.gamma1 * self.norm1(self.dcn(x)))
            x = x + self.drop_path(self.gamma2 * self.norm2(self.mlp(x)))
        else:
            x = x + self.drop_path(self.gamma1 * self.dcn(self.norm1(x)))
            x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            # Non-reentrant: works when the input does not require grad and with autograd.grad / DeepSpeed.
            return torch.utils.checkpoint.checkpoint(self._inner_forward, x, use_reentrant=False)
        return self._inner_forward(x)


class InternImageBlock(nn.Module):
    """One level: ``depth`` layers, optional extra post norms (level 2 of H/G), level norm, optional downsample.

    ``forward(x)``: ``(B, H, W, C)`` NHWC -> ``(B, H/2, W/2, 2C)`` (or unchanged size without downsample).
    ``forward(x, return_wo_downsample=True)`` also returns the level output before downsampling, ``(B, H, W, C)``.
    """

    def __init__(
            self,
            core_op: str,
            channels: int,
            depth: int,
            groups: int,
            downsample: bool = True,
            mlp_ratio: float = 4.0,
            drop: float = 0.0,
            drop_path: float | Sequence[float] = 0.0,
            act_layer: str = 'GELU',
            norm_layer: str = 'LN',
            post_norm: bool = False,
            offset_scale: float = 1.0,
            layer_scale: float | None = None,
            with_cp: bool = False,
            dw_kernel_size: int | None = None,
            post_norm_block_ids: Sequence[int] | None = None,
            res_post_norm: bool = False,
            center_feature_scale: bool = False,
            remove_center: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.depth = depth
        self.post_norm = post_norm
        self.center_feature_scale = center_feature_scale
        self.blocks = nn.ModuleList([
            InternImageLayer(
                core_op=core_op,
                channels=channels,
                groups=groups,
                mlp_ratio=mlp_ratio,
                drop=drop,
                drop_path=drop_path[i] if isinstance(drop_path, Sequence) else drop_path,
                act_layer=act_layer,
                norm_layer=norm_layer,
                post_norm=post_norm,
                layer_scale=layer_scale,
                offset_scale=offset_scale,
                with_cp=with_cp,
                dw_kernel_size=dw_kernel_size,
                res_post_norm=res_post_norm,
                center_feature_scale=center_feature_scale,
                remove_center=remove_center,
            )
            for i in range(depth)
        ])
        # Post-norm models keep the level norm only with center_feature_scale (G); pre-norm models always have it.
        if not self.post_norm or center_feature_scale:
            self.norm = build_norm_layer(channels, 'LN')
        self.post_norm_block_ids = list(post_norm_block_ids) if post_norm_block_ids is not None else None
        if self.post_norm_block_ids is not None:
            self.post_norms = nn.ModuleList([build_norm_layer(channels, 'LN') for _ in self.post_norm_block_ids])
        self.downsample = DownsampleLayer(channels=channels, norm_layer=norm_layer) if downsample else None

    def forward(self, x: torch.Tensor, return_wo_downsample: bool = False):
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if self.post_norm_block_ids is not None and i in self.post_norm_block_ids:
                x = self.post_norms[self.post_norm_block_ids.index(i)](x)
        if not self.post_norm or self.center_feature_scale:
            x = self.norm(x)
        x_ = x
        if self.downsample is not None:
            x = self.downsample(x)
        if return_wo_downsample:
            return x, x_
        return x


class CrossAttention(nn.Module):
    """Multi-head cross attention, q: ``(B, N, C)``, k/v: ``(B, N_k, C)`` -> ``(B, N, out_dim)``.

    q/k/v projections have no bias of their own; ``q_bias``/``k_bias``/``v_bias`` are separate parameters (official
    layout, keys ``cross_dcn.q_bias`` ...).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, attn_head_dim: int | None = None,
                 out_dim: int | None = None):
        super().__init__()
        out_dim = out_dim or dim
        self.num_heads = num_heads
        head_dim = attn_head_dim or dim // num_heads
        all_head_dim = head_dim * num_heads
        self.scale = qk_scale or head_dim ** -0.5
        assert all_head_dim == dim, 'official CrossAttention requires num_heads * head_dim == dim'
        self.q = nn.Linear(dim, all_head_dim, bias=False)
        self.k = nn.Linear(dim, all_head_dim, bias=False)
        self.v = nn.Linear(dim, all_head_dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.k_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(all_head_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = F.linear(x, self.q.weight, self.q_bias).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        k = F.linear(k, self.k.weight, self.k_bias).reshape(b, k.shape[1], self.num_heads, -1).transpose(1, 2)
        v = F.linear(v, self.v.weight, self.v_bias).reshape(b, v.shape[1], self.num_heads, -1).transpose(1, 2)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
        x = x.transpose(1, 2).reshape(b, n, -1)
        x = self.proj(x)
        return self.proj_drop(x)


class AttentiveBlock(nn.Module):
    """LayerNorms on q/k/v then cross attention (no residual): ``(B, N, C), (B, N_k, C) -> (B, N, out_dim)``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: float | None = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer: str = 'LN',
                 attn_head_dim: int | None = None, out_dim: int | None = None):
        super().__init__()
        self.norm1_q = build_norm_layer(dim, norm_layer)
        self.norm1_k = build_norm_layer(dim, norm_layer)
        self.norm1_v = build_norm_layer(dim, norm_layer)
        self.cross_dcn = CrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                        attn_drop=attn_drop, proj_drop=drop, attn_head_dim=attn_head_dim,
                                        out_dim=out_dim)
        # Defined (and unused) in the official block; it has no parameters, kept for module-tree parity.
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, pos_q=0, pos_k=0) -> torch.Tensor:
        x_q = self.norm1_q(x_q + pos_q)
        x_k = self.norm1_k(x_kv + pos_k)
        x_v = self.norm1_v(x_kv)
        return self.cross_dcn(x_q, k=x_k, v=x_v)


class AttentionPoolingBlock(AttentiveBlock):
    """Attention pooling with the token mean as query: ``(B, N, C) -> (B, out_dim)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x_q = x.mean(1, keepdim=True)
        return super().forward(x_q, x).squeeze(1)


class InternImage(nn.Module):
    """InternImage classifier / backbone with the official constructor arguments and defaults.

    Input ``(B, in_chans, H, W)`` NCHW with H, W multiples of 32 (16 suffices for T..XL classification).
    ``forward`` returns logits ``(B, num_classes)``.

    Head, T..XL (``use_clip_projector=False``): stage-4 map -> ``conv_head`` (1x1 conv to ``int(C4*cls_scale)``, BN,
    act) -> global average pool -> ``head``.
    Head, H/G (``use_clip_projector=True``): stage-3 output (1x1 conv to 1024) + stage-4 output (1x1 conv to 4096,
    PixelShuffle(2)) at stride 16 -> tokens -> attention pooling to 768 -> ``fc_norm`` -> ``head``.

    timm split: ``forward_features`` ends with the map the pooling head consumes, NCHW:
    ``(B, int(C4*cls_scale), H/32, W/32)`` after ``conv_head`` (T..XL) or ``(B, 1024, H/16, W/16)`` (H/G);
    ``forward_head`` pools and classifies. ``num_features`` / ``output_stride`` are that map's channels and stride,
    ``head_hidden_size`` the pooled width (768 for T and for H/G); ``feature_info`` describes the four levels.
    ``global_pool=''`` (constructor or :meth:`reset_classifier`) skips the pooling: ``forward_head`` then returns
    the NCHW map (the head, if any, applied per position). TorchScript is not supported (docs/MODELS.md).
    """

    block_layout = 'NHWC'  # its blocks take channels-last input (pretrain.objectives.masking.block_layout)

    def __init__(
            self,
            core_op: str = 'DCNv3',
            channels: int = 64,
            depths: Sequence[int] = (3, 4, 18, 5),
            groups: Sequence[int] = (3, 6, 12, 24),
            num_classes: int = 1000,
            mlp_ratio: float = 4.0,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.2,
            drop_path_type: str = 'linear',
            act_layer: str = 'GELU',
            norm_layer: str = 'LN',
            layer_scale: float | None = None,
            offset_scale: float = 1.0,
            post_norm: bool = False,
            cls_scale: float = 1.5,
            with_cp: bool = False,
            dw_kernel_size: int | None = None,
            use_clip_projector: bool = False,
            level2_post_norm: bool = False,
            level2_post_norm_block_ids: Sequence[int] | None = None,
            res_post_norm: bool = False,
            center_feature_scale: bool = False,
            remove_center: bool = False,
            in_chans: int = 3,
            global_pool: str = 'avg',
    ):
        super().__init__()
        _check_pool(global_pool)
        if core_op not in CORE_OP_BACKENDS:
            raise ValueError(f'core_op must be one of {sorted(CORE_OP_BACKENDS)}, got {core_op!r}')
        if drop_path_type not in ('linear', 'uniform'):
            raise ValueError(f"drop_path_type must be 'linear' or 'uniform', got {drop_path_type!r}")
        if len(depths) != len(groups):
            raise ValueError(f'depths {list(depths)} and groups {list(groups)} must have the same length')
        self.core_op = core_op
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_levels = len(depths)
        self.depths = list(depths)
        self.channels = channels
        last_channels = int(channels * 2 ** (self.num_levels - 1))
        self.post_norm = post_norm
        self.mlp_ratio = mlp_ratio
        self.use_clip_projector = use_clip_projector
        self.level2_post_norm_block_ids = level2_post_norm_block_ids
        self.remove_center = remove_center
        self.cls_scale = cls_scale
        self.act_layer = act_layer
        self.drop_rate = drop_rate

        self.patch_embed = StemLayer(in_chans=in_chans, out_chans=channels, act_layer=act_layer,
                                     norm_layer=norm_layer)
        self.pos_drop = nn.Dropout(p=drop_rate)

        # Computed on the CPU explicitly: the model may be built under a meta device context.
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        if drop_path_type == 'uniform':
            dpr = [drop_path_rate] * len(dpr)

        self.levels = nn.ModuleList()
        self.feature_info = []
        for i in range(self.num_levels):
            post_norm_block_ids = level2_post_norm_block_ids if (level2_post_norm and i == 2) else None
            level_channels = int(channels * 2 ** i)
            self.levels.append(InternImageBlock(
                core_op=core_op,
                channels=level_channels,
                depth=depths[i],
                groups=groups[i],
                mlp_ratio=mlp_ratio,
                drop=drop_rate,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                act_layer=act_layer,
                norm_layer=norm_layer,
                post_norm=post_norm,
                downsample=(i < self.num_levels - 1),
                layer_scale=layer_scale,
                offset_scale=offset_scale,
                with_cp=with_cp,
                dw_kernel_size=dw_kernel_size,
                post_norm_block_ids=post_norm_block_ids,
                res_post_norm=res_post_norm,
                center_feature_scale=center_feature_scale,
                remove_center=remove_center,
            ))
            self.feature_info.append(dict(num_chs=level_channels, reduction=4 * 2 ** i, module=f'levels.{i}'))

        # timm's metadata, as its EfficientNet (whose forward_features also ends with a conv head) publishes it:
        # num_features = channels of forward_features's map, head_hidden_size = width of forward_head(pre_logits=True),
        # output_stride = pixels per cell of that map (H/G fuse stage 3 with the upsampled stage 4 at stride 16).
        if not use_clip_projector:
            self.num_features = self.head_hidden_size = int(last_channels * cls_scale)
            self.output_stride = self.feature_info[-1]['reduction']
            self.conv_head = nn.Sequential(
                nn.Conv2d(last_channels, self.head_hidden_size, kernel_size=1, bias=False),
                build_norm_layer(self.head_hidden_size, 'BN', 'channels_first', 'channels_first'),
                build_act_layer(act_layer),
            )
            self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        else:
            self.num_features, self.head_hidden_size = CLIP_PRETRAIN_EMBED_DIM, CLIP_EMBED_DIM
            self.output_stride = self.feature_info[-2]['reduction']
            self.dcnv3_head_x4 = nn.Sequential(
                nn.Conv2d(last_channels, CLIP_PRETRAIN_EMBED_DIM * CLIP_UPSAMPLE_STRIDE ** 2, kernel_size=1),
                nn.PixelShuffle(CLIP_UPSAMPLE_STRIDE),
            )
            self.dcnv3_head_x3 = nn.Conv2d(last_channels // 2, CLIP_PRETRAIN_EMBED_DIM, kernel_size=1)
            self.clip_projector = AttentionPoolingBlock(
                dim=CLIP_PRETRAIN_EMBED_DIM, num_heads=CLIP_ATTNPOOL_NUM_HEADS, qkv_bias=True, qk_scale=None,
                drop=0.0, attn_drop=0.0, norm_layer=norm_layer, out_dim=CLIP_EMBED_DIM)
            self.fc_norm = build_norm_layer(CLIP_EMBED_DIM, norm_layer)
            self.head = nn.Linear(CLIP_EMBED_DIM, num_classes) if num_classes > 0 else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_layers = len(depths)
        self.stem_checkpointing = False
        self.set_grad_checkpointing(with_cp)

        self.apply(self._init_weights)
        self.apply(self._init_deform_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Official: Linear -> trunc_normal(std .02) (a=-2, b=2 absolute bounds), bias 0; LayerNorm -> 1 / 0.
        # Conv2d and BatchNorm keep the PyTorch defaults.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @staticmethod
    def _init_deform_weights(m: nn.Module) -> None:
        if isinstance(m, DCNv3):
            m._reset_parameters()

    # ----------------------------------------------------------------------------------------------------------
    # timm interface
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Parameter groups in forward order, for timm's layer-wise lr decay / parameter grouping.

        ``coarse``: stem, one group per level, then the head. Fine (a callable, as timm's ``group_with_matcher``
        accepts): the official ``lr_decay_keywords`` mapping, so ``timm.optim.param_groups_layer_decay`` gives the
        official scales: one group per block ``levels.i.blocks.j`` in order; ``patch_embed`` shares the group of
        ``levels.0.blocks.0``; ``levels.i.downsample`` / ``levels.i.norm`` (i < last) share the group of the first
        block of level i+1; everything else (last level norm, level-2 post norms, heads) shares the group of the
        last block (lr scale 1.0).
        """
        if coarse:
            return dict(stem=r'^patch_embed', blocks=r'^levels\.(\d+)')
        last = (len(self.levels) - 1, len(self.levels[-1].blocks) - 1)
        num_levels = len(self.levels)

        def ordinal(name: str) -> tuple[int, int]:
            if name.startswith('patch_embed.'):
                return 0, 0
            m = re.match(r'levels\.(\d+)\.blocks\.(\d+)\.', name)
            if m:
                return int(m[1]), int(m[2])
            m = re.match(r'levels\.(\d+)\.(?:downsample|norm)\.', name)
            if m and int(m[1]) < num_levels - 1:
                return int(m[1]) + 1, 0
            return last

        return ordinal

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Per-block non-reentrant activation checkpointing (plus the stem when it has no BatchNorm).

        ``every=k`` checkpoints every k-th block (global block index ``% k == 0``), trading memory for recompute.
        The stem runs at stride 2-4, where its activations are the largest of the network; recomputing it costs
        ~1% of the FLOPs. (BatchNorm stems are not checkpointed: recomputation would update running stats twice.)
        """
        if every < 1:
            raise ValueError(f'every must be >= 1, got {every}')
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.patch_embed.modules())
        self.stem_checkpointing = bool(enable) and not has_bn
        idx = 0
        for level in self.levels:
            for blk in level.blocks:
                blk.grad_checkpointing = bool(enable) and idx % every == 0
                idx += 1

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace ``head`` by a fresh ``Linear(head_hidden_size, num_classes)`` (Identity if ``num_classes <= 0``).

        ``global_pool``: None keeps the current pooling, 'avg' pools (average for T..XL, attention for H/G),
        '' leaves the map unpooled.
        """
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        device, dtype = self._param_device_dtype()
        self.head = (nn.Linear(self.head_hidden_size, num_classes, device=device, dtype=dtype)
                     if num_classes > 0 else nn.Identity())
        if num_classes > 0:
            self._init_weights(self.head)

    def _param_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.patch_embed.parameters())
        return p.device, p.dtype

    def _levels_forward(self, x: torch.Tensor, max_level: int | None = None) -> list[torch.Tensor]:
        """Stem + levels; returns each level's output before downsampling, NHWC ``(B, H/4/2^i, W/4/2^i, C_i)``."""
        if self.stem_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = torch.utils.checkpoint.checkpoint(self.patch_embed, x, use_reentrant=False)
        else:
            x = self.patch_embed(x)
        x = self.pos_drop(x)
        outs = []
        for i, level in enumerate(self.levels):
            x, x_ = level(x, return_wo_downsample=True)
            outs.append(x_)
            if max_level is not None and i >= max_level:
                break
        return outs

    def _head_features(self, level_outs: Sequence[torch.Tensor]) -> torch.Tensor:
        """From per-level NHWC outputs to the NCHW map consumed by the pooling head."""
        if not self.use_clip_projector:
            return self.conv_head(_nhwc_to_nchw(level_outs[-1]))
        x = self.dcnv3_head_x4(_nhwc_to_nchw(level_outs[-1]))
        return x + self.dcnv3_head_x3(_nhwc_to_nchw(level_outs[-2]))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> NCHW map before pooling (see the class docstring for its shape)."""
        return self._head_features(self._levels_forward(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NCHW map from ``forward_features`` -> ``(B, num_classes)``; ``(B, head_hidden_size)`` if pre_logits.
        Unpooled (``global_pool=''``): the map itself, or ``(B, num_classes, H, W)`` through the head."""
        if not self.global_pool:
            return x if pre_logits else self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if not self.use_clip_projector:
            x = torch.flatten(self.avgpool(x), 1)
        else:
            x = self.clip_projector(x.flatten(2).transpose(1, 2))
            x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def __prepare_scriptable__(self):
        # An explicit opt-out (torch.jit.script calls this first): DCNv3 is not scriptable, and torch 2.14 deprecates
        # scripting; torch.compile, torch.export and ONNX (docs/EXPORT.md) are the supported routes.
        raise RuntimeError('InternImage does not support TorchScript (torch.jit.script); use torch.compile, '
                           'torch.export or the ONNX export instead (docs/MODELS.md)')

    def forward_features_seq_out(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Official name used by detection/segmentation: per-level outputs, NHWC, before downsampling."""
        return self._levels_forward(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-level features (after the level norm, before downsampling, as downstream repos use them).

        Args:
            indices: take the last n levels if int, all if None, the given level indices if a list.
            norm: accepted for timm compatibility; the level norms are always applied (they are part of the levels).
            stop_early: stop after the last requested level (only with ``intermediates_only``).
            output_fmt: 'NCHW' ``(B, C_i, H/4/2^i, W/4/2^i)`` or 'NHWC'.
        Returns:
            the intermediates, or ``(forward_features(x), intermediates)``.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.levels), indices)
        stop = max_index if (stop_early and intermediates_only) else None
        outs = self._levels_forward(x, max_level=stop)
        intermediates = [outs[i] if output_fmt == 'NHWC' else _nhwc_to_nchw(outs[i]) for i in take_indices]
        if intermediates_only:
            return intermediates
        return self._head_features(outs), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop levels after the last requested one and (optionally) the head; returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.levels), indices)
        self.levels = self.levels[:max_index + 1]
        if prune_head:
            for name in ('conv_head', 'dcnv3_head_x4', 'dcnv3_head_x3', 'clip_projector', 'fc_norm'):
                if hasattr(self, name):
                    delattr(self, name)
            self.head = nn.Identity()
            self.num_classes = 0
        return take_indices


def _check_pool(global_pool: str) -> None:
    if global_pool not in ('', 'avg'):
        raise ValueError(f"InternImage's global_pool must be 'avg' (pooled: average for T..XL, attention for H/G) or "
                         f"'' (unpooled), got {global_pool!r}")


# FX (timm's feature extraction, torch.fx) keeps DCNv3 as one call: its argument checks depend on tensor shapes.
register_notrace_module(DCNv3)


def checkpoint_filter_fn(state_dict: dict, model: InternImage) -> dict:
    """timm pretrained-weight filter: unwraps the official ``{'model': ...}`` file and renames other layouts."""
    from pretrain.models.weights import convert_state_dict

    return convert_state_dict(state_dict, model)[0]


def _create_internimage(variant: str, pretrained: bool = False, **kwargs) -> InternImage:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        InternImage, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


_HF_URL = 'https://huggingface.co/OpenGVLab/InternImage/resolve/main/'


def _cfg(file: str = '', **kwargs) -> dict:
    # Official eval: resize to the input size then center crop the same size (crop ratio 1.0), bicubic.
    return {
        'url': _HF_URL + file if file else '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 1.0, 'interpolation': 'bicubic', 'crop_mode': 'center',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.conv1', 'classifier': 'head',
        'license': 'mit', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'internimage_t.in1k': _cfg('internimage_t_1k_224.pth'),
    'internimage_s.in1k': _cfg('internimage_s_1k_224.pth'),
    'internimage_b.in1k': _cfg('internimage_b_1k_224.pth'),
    'internimage_l.in22k_ft_in1k': _cfg('internimage_l_22kto1k_384.pth', input_size=(3, 384, 384),
                                        pool_size=(12, 12)),
    'internimage_l.in22k': _cfg('internimage_l_22k_192to384.pth', input_size=(3, 384, 384), pool_size=(12, 12),
                                num_classes=21841),
    'internimage_xl.in22k_ft_in1k': _cfg('internimage_xl_22kto1k_384.pth', input_size=(3, 384, 384),
                                         pool_size=(12, 12)),
    'internimage_xl.in22k': _cfg('internimage_xl_22k_192to384.pth', input_size=(3, 384, 384), pool_size=(12, 12),
                                 num_classes=21841),
    'internimage_h.m3i_in22k_ft_in1k': _cfg('internimage_h_22kto1k_640.pth', input_size=(3, 640, 640),
                                            pool_size=(40, 40)),
    'internimage_h.m3i_in22k': _cfg('internimage_h_jointto22k_384.pth', input_size=(3, 384, 384),
                                    pool_size=(24, 24), num_classes=21841),
    'internimage_g.m3i_in22k_ft_in1k': _cfg('internimage_g_22kto1k_512.pth', input_size=(3, 512, 512),
                                            pool_size=(32, 32)),
    'internimage_g.m3i_in22k': _cfg('internimage_g_pretrainto22k_384.pth', input_size=(3, 384, 384),
                                    pool_size=(24, 24), num_classes=21841),
})

# Per-size constructor arguments (official yaml files; drop_path_rate is the training-recipe value).
MODEL_ARGS: dict[str, dict] = {
    'internimage_t': dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), mlp_ratio=4.0,
                          layer_scale=None, offset_scale=1.0, post_norm=False, drop_path_rate=0.1),
    'internimage_s': dict(channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), mlp_ratio=4.0,
                          layer_scale=1e-5, offset_scale=1.0, post_norm=True, drop_path_rate=0.4),
    'internimage_b': dict(channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), mlp_ratio=4.0,
                          layer_scale=1e-5, offset_scale=1.0, post_norm=True, drop_path_rate=0.5),
    'internimage_l': dict(channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80), mlp_ratio=4.0,
                          layer_scale=1e-5, offset_scale=2.0, post_norm=True, drop_path_rate=0.1),
    'internimage_xl': dict(channels=192, depths=(5, 5, 24, 5), groups=(12, 24, 48, 96), mlp_ratio=4.0,
                           layer_scale=1e-5, offset_scale=2.0, post_norm=True, drop_path_rate=0.2),
    'internimage_h': dict(channels=320, depths=(6, 6, 32, 6), groups=(10, 20, 40, 80), mlp_ratio=4.0,
                          layer_scale=None, offset_scale=1.0, post_norm=False, dw_kernel_size=5,
                          res_post_norm=True, level2_post_norm=True, level2_post_norm_block_ids=(5, 11, 17, 23, 29),
                          center_feature_scale=True, use_clip_projector=True, drop_path_rate=0.2),
    'internimage_g': dict(channels=512, depths=(2, 2, 48, 4), groups=(16, 32, 64, 128), mlp_ratio=4.0,
                          layer_scale=None, offset_scale=1.0, post_norm=True, dw_kernel_size=5,
                          res_post_norm=False, level2_post_norm=True,
                          level2_post_norm_block_ids=(5, 11, 17, 23, 29, 35, 41, 47),
                          center_feature_scale=True, use_clip_projector=True, drop_path_rate=0.4),
}


def _create(variant: str, pretrained: bool, kwargs: dict) -> InternImage:
    return _create_internimage(variant, pretrained=pretrained, **{**MODEL_ARGS[variant], **kwargs})


@register_model
def internimage_t(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-T, 29.9M params, 5G FLOPs at 224."""
    return _create('internimage_t', pretrained, kwargs)


@register_model
def internimage_s(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-S, 50.1M params, 8G FLOPs at 224."""
    return _create('internimage_s', pretrained, kwargs)


@register_model
def internimage_b(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-B, 97.5M params, 16G FLOPs at 224."""
    return _create('internimage_b', pretrained, kwargs)


@register_model
def internimage_l(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-L, 223.3M params, 108G FLOPs at 384."""
    return _create('internimage_l', pretrained, kwargs)


@register_model
def internimage_xl(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-XL, 334.8M params, 163G FLOPs at 384."""
    return _create('internimage_xl', pretrained, kwargs)


@register_model
def internimage_h(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-H, 1.09B params, attention-pooling (clip projector) head."""
    return _create('internimage_h', pretrained, kwargs)


@register_model
def internimage_g(pretrained: bool = False, **kwargs) -> InternImage:
    """InternImage-G, 3.08B params, attention-pooling (clip projector) head."""
    return _create('internimage_g', pretrained, kwargs)
