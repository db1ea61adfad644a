"""The two query-based decoders on the region representation: tags and region-text contrastive.

Both have one shape (as in the method): text embeddings from the frozen CLIP text tower, projected, are the
queries; the projected region queries are keys and values; cross-attention-only layers (no self-attention,
so each query is scored independently); a linear layer gives one logit per query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynrefer.config import ContrastiveConfig, DecoderConfig, TagConfig


class CrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(queries)
        queries = queries + self.attn(q, memory, memory, need_weights=False)[0]
        return queries + self.ff(self.norm_ff(queries))


class QueryDecoder(nn.Module):
    """Scores K text queries against each region: (K, D_text) x (B, Q, H) -> (B, K) logits."""

    def __init__(self, cfg: DecoderConfig, text_dim: int, region_dim: int):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, cfg.dim)
        self.region_proj = nn.Linear(region_dim, cfg.dim)
        self.layers = nn.ModuleList(CrossAttentionLayer(cfg.dim, cfg.num_heads) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, 1)

    def forward(self, texts: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """texts: (K, D_text), regions: (B, Q, H) -> logits (B, K)."""
        memory = self.region_proj(regions)  # (B, Q, D)
        queries = self.text_proj(texts).unsqueeze(0).expand(regions.shape[0], -1, -1)  # (B, K, D)
        for layer in self.layers:
            queries = layer(queries, memory)
        return self.head(self.norm(queries)).squeeze(-1)


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 7.0,
                    gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021) for multi-label tags: easy negatives are down-weighted and shifted.

    logits, targets: (B, K); returns the sum over tags averaged over regions, as the official code does.
    """
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p  # probability shifting of negatives
    loss_pos = targets * torch.log(p.clamp(min=eps)) * (1 - p) ** gamma_pos
    loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=eps)) * p_neg ** gamma_neg
    return -(loss_pos + loss_neg).sum() / logits.shape[0]


def siglip_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss on a (B_regions, B_texts) logit matrix; positives marks matching pairs.

    open_clip's SigLipLoss takes feature vectors and scores pairs by a dot product; here every pair is
    scored by the decoder, so the loss is applied to the logit matrix with the same definition.
    """
    labels = 2.0 * positives.to(logits.dtype) - 1.0
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


class TagHead(nn.Module):
    """Open-vocabulary tags: every vocabulary tag is a query; sigmoid > threshold tags the region."""

    def __init__(self, cfg: TagConfig, text_dim: int, region_dim: int):
        super().__init__()
        self.cfg = cfg
        self.decoder = QueryDecoder(cfg.decoder, text_dim, region_dim)
        self.register_buffer("tag_embeddings", torch.zeros(len(cfg.vocabulary), text_dim))
        self.index = {t: i for i, t in enumerate(cfg.vocabulary)}

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.tag_embeddings, regions)  # (B, K)

    def targets(self, tags: list[list[str]]) -> torch.Tensor:
        """Multi-hot targets (B, K); tags outside the vocabulary are ignored."""
        out = torch.zeros(len(tags), len(self.cfg.vocabulary), device=self.tag_embeddings.device)
        for i, region_tags in enumerate(tags):
            idx = [self.index[t] for t in region_tags if t in self.index]
            out[i, idx] = 1.0
        return out

    def loss(self, logits: torch.Tensor, tags: list[list[str]]) -> torch.Tensor:
        c = self.cfg
        return asymmetric_loss(logits, self.targets(tags), c.gamma_neg, c.gamma_pos, c.clip)

    def decode(self, logits: torch.Tensor) -> list[list[tuple[str, float]]]:
        """Tags above the threshold, best first, with their probabilities."""
        probs = torch.sigmoid(logits.float())
        out = []
        for row in probs:
            keep = torch.nonzero(row > self.cfg.threshold).flatten()
            order = keep[row[keep].argsort(descending=True)]
            out.append([(self.cfg.vocabulary[i], float(row[i])) for i in order.tolist()])
        return out


class ContrastiveHead(nn.Module):
    """Region-text matching: a caption's text embedding is the query; logits = scale * score + bias."""

    def __init__(self, cfg: ContrastiveConfig, text_dim: int, region_dim: int):
        super().__init__()
        self.decoder = QueryDecoder(cfg.decoder, text_dim, region_dim)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.init_logit_bias))

    def forward(self, texts: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """texts: (K, D_text), regions: (B, Q, H) -> calibrated logits (B, K)."""
        return self.decoder(texts, regions) * self.logit_scale.exp() + self.logit_bias
