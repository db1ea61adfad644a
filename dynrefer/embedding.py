"""Stochastic multi-view embedding: views -> CLIP patch grids -> RoI-Align -> alignment -> fusion -> Q-former."""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from torch import nn
from torchvision.ops import roi_align

from dynrefer.alignment import ViewAlignment
from dynrefer.config import DynReferConfig
from dynrefer.encoder import ImageEncoder, ViewFeatures
from dynrefer.qformer import QFormer


def roi_tokens(features: ViewFeatures, rois: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """RoI-Align each RoI (in view pixels) on the patch grid of view ``index`` (default: RoI i on view i), keeping
    the grid size.

    features.grid: (N, C, g, g), rois: (M, 4), index: (M,) into the N views -> the RoI grids (M, C, g, g).
    """
    n, c, g, _ = features.grid.shape
    if index is None:
        index = torch.arange(n, device=rois.device)
    boxes = torch.cat([index.to(rois.dtype)[:, None], rois], dim=1)  # (M, 5)
    return roi_align(features.grid, boxes.to(features.grid.dtype), output_size=(g, g),
                     spatial_scale=1.0 / features.patch_size, sampling_ratio=2, aligned=False)  # as official


class ViewFusion(nn.Module):
    """Concatenate the aligned views per token along channels, then an MLP back to C: (n*C) -> C -> C."""

    def __init__(self, dim: int, num_views: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(num_views * dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, V, T, C) -> (B, T, C)."""
        b, v, t, c = tokens.shape
        return self.mlp(tokens.permute(0, 2, 1, 3).reshape(b, t, v * c))


def grid_position_code(kind: str, grid: int, dim: int) -> torch.Tensor | None:
    """The code added to the fused tokens by ``encoder.grid_positions``: zero for the CLS token, timm's 2-D
    sine-cosine embedding of (row, column) for the g*g RoI tokens; None for "none".  # (1, 1 + g*g, C)"""
    if kind == "none":
        return None
    if kind != "sincos":
        raise ValueError(f"encoder.grid_positions {kind!r}: expected 'none' or 'sincos'")
    if dim % 4:
        raise ValueError(f"encoder.grid_positions 'sincos' needs a token width divisible by 4, not {dim}")
    code = build_sincos2d_pos_embed([grid, grid], dim=dim)  # (g*g, C), row-major as the flattened RoI grid
    return torch.cat([torch.zeros(1, dim), code]).unsqueeze(0)


class MultiViewEmbedding(nn.Module):
    def __init__(self, cfg: DynReferConfig, encoder: ImageEncoder, storage_options=None):
        super().__init__()
        self.encoder = encoder
        dim = encoder.width
        self.alignment = ViewAlignment(dim, cfg.alignment) if cfg.alignment.enabled else None
        self.fusion = ViewFusion(dim, cfg.views.num_views)
        code = grid_position_code(cfg.encoder.grid_positions, cfg.image_size // encoder.patch_size, dim)
        self.register_buffer("positions", code, persistent=False)  # (1, 1 + g*g, C) or None
        self.qformer = QFormer(cfg.qformer, dim, storage_options)

    def region_tokens(self, views: torch.Tensor, view_index: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """views: (N, S, S, 3) uint8, each distinct view once; view_index: (B, V) into them; rois: (B, V, 4)
        -> aligned per-view tokens (B, V, 1 + g*g, C). A view shared by several regions is encoded once."""
        b, v = view_index.shape
        index = view_index.flatten()  # (B*V,)
        features = self.encoder(views)  # grid (N, C, g, g), cls (N, C)
        grid = roi_tokens(features, rois.flatten(0, 1).float(), index)  # (B*V, C, g, g)
        grid = grid.unflatten(0, (b, v))  # (B, V, C, g, g)
        if self.alignment is not None and v > 1:
            reference = grid[:, :1].expand(-1, v - 1, -1, -1, -1).flatten(0, 1)
            moved = self.alignment(grid[:, 1:].flatten(0, 1), reference).unflatten(0, (b, v - 1))
            grid = torch.cat([grid[:, :1], moved], dim=1)
        cls = features.cls[index].unflatten(0, (b, v)).unsqueeze(2)  # (B, V, 1, C)
        return torch.cat([cls, grid.flatten(3).transpose(2, 3)], dim=2)  # (B, V, 1 + g*g, C)

    def forward(self, views: torch.Tensor, view_index: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """-> region representation (B, Q, H)."""
        tokens = self.fusion(self.region_tokens(views, view_index, rois))  # (B, 1 + g*g, C)
        if self.positions is not None:
            tokens = tokens + self.positions.to(tokens.dtype)
        return self.qformer(tokens)
