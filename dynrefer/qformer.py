"""The Q-former: learned queries that compress the fused multi-view tokens into the region representation.

It is BLIP-2's (``transformers.Blip2QFormerModel``), so real BLIP-2 weights load into it unchanged.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from dynrefer import storage
from dynrefer.config import QFormerConfig


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
