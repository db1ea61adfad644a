"""Alignment of each view's RoI features to the t=0 view's: the official DCNv4 block.

value projection -> DCNv4 sampling -> output projection, with no residual. Offsets and modulation masks come
from a grouped depthwise conv over cat[view, reference] followed by a zero-initialised linear layer, so at
initialisation every aligned view is exactly zero (the official behaviour: the fusion MLP starts from the t=0
view alone). DCNv4's sampling (a masked sum of bilinear samples, zero outside the map) is computed with
``torch.nn.functional.grid_sample``, reading offsets and masks in DCNv4's own per-pixel layout, so official
weights map 1:1. On CPU it is ~13x faster in forward + backward than ``torchvision.ops.deform_conv2d`` with an
all-ones depthwise kernel, which computes the same sum (equal to 1e-14 in float64).

DCNv4's layout, per pixel and group g (``K = k*k`` taps, ``3K`` values per group, the total padded to a
multiple of 8): ``dx`` of tap n at ``3K*g + 2n``, ``dy`` at ``3K*g + 2n + 1``, the mask at ``3K*g + 2K + n``; tap
``n = k*i + j`` samples ``(x + i - pad + dx, y + j - pad + dy)`` (x-major).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dynrefer.config import AlignmentConfig


def offset_mask_channels(groups: int, kernel_size: int) -> int:
    """Channels of the offset/mask predictor: 3 values per tap and group, padded to a multiple of 8 (112 for the
    official 4 groups x 9 taps)."""
    return int(math.ceil(groups * kernel_size ** 2 * 3 / 8) * 8)


def dcnv4_sample(value: torch.Tensor, offset_mask: torch.Tensor, groups: int, kernel_size: int,
                 offset_scale: float = 1.0) -> torch.Tensor:
    """DCNv4's sampling: value (N, C, H, W), offsets and masks (N, H, W, >= 3*G*K) in DCNv4's layout -> (N, C, H, W).

    Output pixel (y, x) of group g is ``sum_n mask_n * bilinear(value_g, x + i - pad + dx_n, y + j - pad + dy_n)``
    over taps ``n = k*i + j``; channels beyond ``3*G*K`` (padding) are ignored.
    """
    n, c, h, w = value.shape
    k, g = kernel_size, groups
    kk, pad = k * k, k // 2
    per_group = offset_mask[..., : g * 3 * kk].unflatten(-1, (g, 3 * kk))  # (N, H, W, G, 3K)
    dxy = per_group[..., : 2 * kk].unflatten(-1, (kk, 2)) * offset_scale  # (N, H, W, G, K, (dx, dy))
    mask = per_group[..., 2 * kk:]  # (N, H, W, G, K)
    shift = torch.arange(k, dtype=value.dtype, device=value.device) - pad
    tap_x, tap_y = (s.flatten() for s in torch.meshgrid(shift, shift, indexing="ij"))  # tap n = k*i + j: (i, j)
    ys = torch.arange(h, dtype=value.dtype, device=value.device)[:, None, None, None]  # (H, 1, 1, 1)
    xs = torch.arange(w, dtype=value.dtype, device=value.device)[None, :, None, None]  # (1, W, 1, 1)
    x = xs + tap_x + dxy[..., 0]  # (N, H, W, G, K) pixel coordinates
    y = ys + tap_y + dxy[..., 1]
    # grid_sample's coordinates with align_corners=False: pixel p sits at (2p + 1) / size - 1
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1)  # (N, H, W, G, K, 2)
    grid = grid.permute(0, 3, 4, 1, 2, 5).reshape(n * g, kk * h, w, 2)  # (N*G, K*H, W, 2)
    sampled = F.grid_sample(value.reshape(n * g, c // g, h, w), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (N*G, C/G, K*H, W)
    sampled = sampled.view(n, g, c // g, kk, h, w)
    weights = mask.permute(0, 3, 4, 1, 2).unsqueeze(2)  # (N, G, 1, K, H, W)
    return (sampled * weights).sum(3).reshape(n, c, h, w)


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
        sampled = dcnv4_sample(value, offset_mask, self.groups, self.kernel_size, self.offset_scale)  # (N, C, H, W)
        return self.output_proj(sampled.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
