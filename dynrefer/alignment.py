"""Alignment of each view's RoI features to the t=0 view's: the official DCNv4 block.

value projection -> DCNv4 sampling -> output projection, with no residual. Offsets and modulation masks come
from a grouped depthwise conv over cat[view, reference] followed by a zero-initialised linear layer, so at
initialisation every aligned view is exactly zero (the official behaviour: the fusion MLP starts from the t=0
view alone). DCNv4's sampling is computed with ``torchvision.ops.deform_conv2d``: with an all-ones depthwise
weight (one 3x3 kernel per channel) and ``offset_groups = groups`` it is the same masked sum of bilinear samples,
once DCNv4's per-pixel layout of offsets and masks is permuted into torchvision's.

DCNv4's layout, per pixel and group g (``K = k*k`` taps, ``3K`` values per group, the total padded to a
multiple of 8): ``dx`` of tap n at ``3K*g + 2n``, ``dy`` at ``3K*g + 2n + 1``, the mask at ``3K*g + 2K + n``; tap
``n = k*i + j`` samples ``(x + i - pad + dx, y + j - pad + dy)`` (x-major). torchvision wants per group
``(dy, dx)`` pairs of taps ordered row-major (``k*row + col``) and the masks apart.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import deform_conv2d

from dynrefer.config import AlignmentConfig


def offset_mask_channels(groups: int, kernel_size: int) -> int:
    """Channels of the offset/mask predictor: 3 values per tap and group, padded to a multiple of 8 (112 for the
    official 4 groups x 9 taps)."""
    return int(math.ceil(groups * kernel_size ** 2 * 3 / 8) * 8)


def dcnv4_to_torchvision(offset_mask: torch.Tensor, groups: int, kernel_size: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """DCNv4's (N, H, W, >= 3*G*K) offsets and masks -> torchvision's offset (N, 2*G*K, H, W) and mask (N, G*K, H, W).

    Padding channels beyond ``3*G*K`` are ignored.
    """
    n, h, w, _ = offset_mask.shape
    k = kernel_size
    kk = k * k
    per_group = offset_mask[..., : groups * 3 * kk].unflatten(-1, (groups, 3 * kk))  # (N, H, W, G, 3K)
    xy = per_group[..., : 2 * kk].unflatten(-1, (k, k, 2))  # (N, H, W, G, i=x tap, j=y tap, (dx, dy))
    mask = per_group[..., 2 * kk:].unflatten(-1, (k, k))  # (N, H, W, G, i, j)
    yx = xy.flip(-1).transpose(-3, -2)  # (N, H, W, G, row=j, col=i, (dy, dx))
    offset = yx.flatten(-4).permute(0, 3, 1, 2)  # (N, G*K*2, H, W)
    mask = mask.transpose(-2, -1).flatten(-3).permute(0, 3, 1, 2)  # (N, G*K, H, W)
    return offset.contiguous(), mask.contiguous()


class ViewAlignment(nn.Module):
    """The official CustomDCNv4 block; parameter names and shapes as in its checkpoints (``cvem_align.*``)."""

    def __init__(self, dim: int, cfg: AlignmentConfig):
        super().__init__()
        k, g = cfg.kernel_size, cfg.groups
        if dim % g:
            raise ValueError(f"alignment: feature dim {dim} is not divisible by groups {g}")
        self.kernel_size, self.groups, self.offset_scale = k, g, cfg.offset_scale
        self.value_proj = nn.Linear(dim, dim)
        # output channel c reads input channels 2c and 2c+1 of cat[view, reference]
        self.offset_mask_dw = nn.Conv2d(2 * dim, dim, cfg.dw_kernel_size, padding=cfg.dw_kernel_size // 2,
                                        groups=dim)
        self.offset_mask = nn.Linear(dim, offset_mask_channels(g, k))
        self.output_proj = nn.Linear(dim, dim)
        self.register_buffer("taps", torch.ones(dim, 1, k, k), persistent=False)  # all-ones depthwise kernel
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, view: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """view, reference: (N, C, H, W) -> the view's features resampled onto the reference, (N, C, H, W)."""
        value = self.value_proj(view.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (N, C, H, W)
        context = self.offset_mask_dw(torch.cat([view, reference], dim=1))  # (N, C, H, W)
        offset_mask = self.offset_mask(context.permute(0, 2, 3, 1))  # (N, H, W, 112)
        offset, mask = dcnv4_to_torchvision(offset_mask, self.groups, self.kernel_size)
        sampled = deform_conv2d(value, offset * self.offset_scale, self.taps.to(value.dtype),
                                padding=self.kernel_size // 2, mask=mask)  # (N, C, H, W)
        return self.output_proj(sampled.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
