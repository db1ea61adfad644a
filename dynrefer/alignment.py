"""Alignment of each view's RoI features to the t=0 view's, by a modulated deformable convolution.

The official code uses a DCNv4 block; ``torchvision.ops.deform_conv2d`` (DCNv2-style, modulated) runs on
CPU and GPU alike. Offsets and masks come from the concatenation of the view's and the t=0 view's features,
and their predictor is zero-initialised, so the module starts as the identity (residual + zero mask).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import deform_conv2d

from dynrefer.config import AlignmentConfig


class ViewAlignment(nn.Module):
    def __init__(self, dim: int, cfg: AlignmentConfig):
        super().__init__()
        k, g = cfg.kernel_size, cfg.offset_groups
        if dim % g:
            raise ValueError(f"alignment: feature dim {dim} is not divisible by offset_groups {g}")
        self.kernel_size, self.offset_groups = k, g
        self.context = nn.Conv2d(2 * dim, 2 * dim, k, padding=k // 2, groups=2 * dim)  # depthwise
        self.offsets_masks = nn.Conv2d(2 * dim, 3 * g * k * k, 1)  # 2*g*k*k offsets + g*k*k masks
        nn.init.zeros_(self.offsets_masks.weight)
        nn.init.zeros_(self.offsets_masks.bias)
        self.weight = nn.Parameter(torch.empty(dim, dim, k, k))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, view: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """view, reference: (N, C, g, g) -> view resampled onto the reference, (N, C, g, g)."""
        g, kk = self.offset_groups, self.kernel_size ** 2
        om = self.offsets_masks(self.context(torch.cat([view, reference], dim=1)))  # (N, 3*g*kk, g, g)
        offset, mask = om.split([2 * g * kk, g * kk], dim=1)
        moved = deform_conv2d(view, offset, self.weight, padding=self.kernel_size // 2, mask=mask)
        return view + moved
