"""The Q-former: learned queries that compress the fused multi-view tokens into the region representation.

It is BLIP-2's (``transformers.Blip2QFormerModel``), so real BLIP-2 weights load into it unchanged. The official
Q-former starts from BLIP-2's weights, whose queries were aligned with text by BLIP-2's first stage; a model built
from scratch can stand in for that stage with :class:`QueryTextContrast` (``loss.itc``) before DynRefer's training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from dynrefer import storage
from dynrefer.config import QFormerConfig
from dynrefer.decoders import gather_batches


def read_blip2(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a BLIP-2 Hugging Face directory's ``*.safetensors`` files."""
    from pathlib import Path

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no *.safetensors files (expected a BLIP-2 Hugging Face directory)")
    return {k: v for file in files for k, v in load_file(str(file)).items()}


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig, encoder_dim: int, storage_options: storage.StorageOptions | None = None):
        super().__init__()
        self.cfg = cfg
        config = Blip2QFormerConfig(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size, cross_attention_frequency=cfg.cross_attention_frequency,
            encoder_hidden_size=encoder_dim, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, initializer_range=cfg.initializer_range,
        )
        self.qformer = Blip2QFormerModel(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden_size),
                                         requires_grad=not cfg.freeze_queries)
        nn.init.normal_(self.query_tokens, std=0.02)
        if cfg.path:
            self.load_blip2(storage.local_copy(cfg.path, storage_options))

    def load_blip2(self, directory: str) -> None:
        """Initialise from a BLIP-2 Hugging Face directory (its ``qformer.*`` and ``query_tokens`` tensors)."""
        state = {k: v[:, : self.cfg.num_queries] if k == "query_tokens" else v
                 for k, v in read_blip2(directory).items() if k.startswith("qformer.") or k == "query_tokens"}
        if not state:
            raise ValueError(f"{directory}: no 'qformer.*' tensors in its *.safetensors files")
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k.startswith("qformer.")]:
            raise ValueError(f"{directory}: Q-former weights do not match the config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T, C) fused view tokens -> region queries (B, Q, H)."""
        queries = self.query_tokens.expand(tokens.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state


class QueryTextContrast(nn.Module):
    """BLIP-2's first-stage image-text contrastive loss (ITC) on the region queries.

    A region's similarity to a text is the best of its queries' cosines to the text embedding (BLIP-2: max over
    queries), over a learned temperature (init 0.07, clamped to [0.001, 0.5]); cross-entropy with label smoothing
    0.1 in both directions, each worker's local rows against every worker's (the others' without gradient). The text
    side is the frozen CLIP text embedding itself, not a projection of it: the queries are pulled into the space
    the tag and region-text heads read their queries from.
    """

    def __init__(self, region_dim: int, text_dim: int):
        super().__init__()
        self.vision_proj = nn.Linear(region_dim, text_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))

    def similarity(self, regions: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """regions: (B, Q, H) projected and normalised here, texts: (K, D) normalised -> (B, K) over the temperature."""
        queries = F.normalize(self.vision_proj(regions), dim=-1)  # (B, Q, D)
        return torch.einsum("bqd,kd->bkq", queries, texts).amax(-1) / self.temp

    def loss(self, texts: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """texts: (B, D_text) CLIP embeddings of the regions' captions, regions: (B, Q, H); region i matches text i."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        texts = F.normalize(texts, dim=-1)
        all_texts, start = gather_batches(texts)  # (B_all, D)
        b = regions.shape[0]
        others, _ = gather_batches(regions)  # (B_all, Q, H), no gradient
        all_regions = torch.cat([others[:start], regions, others[start + b:]])  # the local rows keep theirs
        targets = start + torch.arange(b, device=regions.device)
        region_to_text = self.similarity(regions, all_texts)  # (B, B_all)
        text_to_region = self.similarity(all_regions, texts).transpose(0, 1)  # (B, B_all)
        return (F.cross_entropy(region_to_text, targets, label_smoothing=0.1)
                + F.cross_entropy(text_to_region, targets, label_smoothing=0.1)) / 2
