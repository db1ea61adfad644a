"""Region recognition and attribute scoring with the region-text contrastive head.

The paper reads categories and attributes off the contrastive head: each class name and each attribute becomes a
text prompt ("the {category}", "the {attribute} object"), and the head's sigmoid score of a region against a
prompt is the probability of that label. The prompts' CLIP text embeddings are fixed for a model, so they are
computed once (when the model is built or loaded), not per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynrefer.config import RecognitionConfig


@dataclass
class Recognition:
    """One region's category (best class prompt) and attributes (every attribute prompt's probability)."""

    category: str | None
    category_score: float | None
    category_scores: dict[str, float]
    attributes: list[tuple[str, float]]  # those at or above the threshold, best first
    attribute_scores: dict[str, float]


def prompts(cfg: RecognitionConfig) -> list[str]:
    """The category prompts followed by the attribute prompts."""
    return ([cfg.category_prompt.format(category=c) for c in cfg.categories]
            + [cfg.attribute_prompt.format(attribute=a) for a in cfg.attributes])


class RecognitionPrompts(nn.Module):
    """Holds the prompts' text embeddings and turns contrastive logits over them into :class:`Recognition`."""

    def __init__(self, cfg: RecognitionConfig, text_dim: int):
        super().__init__()
        self.cfg = cfg
        for name, template in (("category_prompt", "{category}"), ("attribute_prompt", "{attribute}")):
            if template not in getattr(cfg, name):
                raise ValueError(f"recognition.{name} must contain {template}, got {getattr(cfg, name)!r}")
        count = len(cfg.categories) + len(cfg.attributes)
        self.register_buffer("embeddings", torch.zeros(count, text_dim), persistent=False)  # (K, D_text)

    def __len__(self) -> int:
        return len(self.cfg.categories) + len(self.cfg.attributes)

    def decode(self, logits: torch.Tensor) -> list[Recognition]:
        """logits: (B, K) over :func:`prompts` -> one :class:`Recognition` per region."""
        probs = torch.sigmoid(logits.float()).cpu()
        n = len(self.cfg.categories)
        out = []
        for row in probs:
            categories = dict(zip(self.cfg.categories, row[:n].tolist()))
            attributes = dict(zip(self.cfg.attributes, row[n:].tolist()))
            best = max(categories, key=categories.__getitem__) if categories else None
            kept = sorted(((a, s) for a, s in attributes.items() if s >= self.cfg.attribute_threshold),
                          key=lambda a_s: -a_s[1])
            out.append(Recognition(best, categories.get(best), categories, kept, attributes))
        return out
