"""Region recognition and attribute scoring with the region-text contrastive head, with the official prompts.

Categories: one prompt per class, ``"the {class}"`` (lowercased); the region's category is the best-scoring one.
Attributes, named as OVAD names them (``"type:syn1/syn2"``, or a plain word such as ``"red"``): one prompt per
synonym and template, the templates depending on whether the attribute "is" ("the {attr} {noun}", "the {noun} is
{attr}") or "has" ("the {attr} {dobj} {noun}", "the {noun} has {attr} {dobj}"; ``dobj`` is the type without
" tone"), with the noun left empty as the official code does; an attribute's score is the max over its prompts.
Scores are ``sigmoid`` of the head's uncalibrated score (no learned scale or bias at inference, as official). The
prompts' CLIP text embeddings are fixed for a model, so they are computed once, not per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynrefer.config import RecognitionConfig


@dataclass
class Recognition:
    """One region's category (best class prompt) and attributes (every attribute's probability)."""

    category: str | None
    category_score: float | None
    category_scores: dict[str, float]
    attributes: list[tuple[str, float]]  # those at or above the threshold, best first
    attribute_scores: dict[str, float]


def attribute_synonyms(name: str, extra: dict[str, list[str]]) -> tuple[str, list[str]]:
    """(type, synonyms) of an attribute name: ``"maturity:young/baby"`` -> ("maturity", ["young", "baby", ...])."""
    kind, _, words = name.rpartition(":")
    return kind, [*words.split("/"), *extra.get(words, [])]


def attribute_prompts(cfg: RecognitionConfig, name: str) -> list[str]:
    """Every prompt of one attribute: each synonym in each template of its kind ("is" unless listed as "has")."""
    kind, synonyms = attribute_synonyms(name, cfg.attribute_synonyms)
    is_has = cfg.attribute_kinds.get(name, "is")
    if is_has not in cfg.attribute_templates:
        raise ValueError(f"recognition: attribute {name!r} is of kind {is_has!r}, which has no templates")
    dobj = kind.replace(" tone", "")
    return [" ".join(t.format(attr=syn, noun=cfg.attribute_noun, dobj=dobj).split())
            for syn in synonyms for t in cfg.attribute_templates[is_has]]


def prompts(cfg: RecognitionConfig) -> list[str]:
    """The category prompts followed by every attribute's prompts (attribute by attribute)."""
    return ([cfg.category_prompt.format(category=c.lower()) for c in cfg.categories]
            + [p for a in cfg.attributes for p in attribute_prompts(cfg, a)])


class RecognitionPrompts(nn.Module):
    """Holds the prompts' text embeddings and turns contrastive scores over them into :class:`Recognition`."""

    def __init__(self, cfg: RecognitionConfig, text_dim: int):
        super().__init__()
        self.cfg = cfg
        if "{category}" not in cfg.category_prompt:
            raise ValueError(f"recognition.category_prompt must contain {{category}}, got {cfg.category_prompt!r}")
        self.counts = [len(attribute_prompts(cfg, a)) for a in cfg.attributes]
        count = len(cfg.categories) + sum(self.counts)
        self.register_buffer("embeddings", torch.zeros(count, text_dim), persistent=False)  # (K, D_text)

    def __len__(self) -> int:
        return len(self.cfg.categories) + sum(self.counts)

    def decode(self, scores: torch.Tensor) -> list[Recognition]:
        """scores: (B, K) uncalibrated head scores over :func:`prompts` -> one :class:`Recognition` per region."""
        probs = torch.sigmoid(scores.float()).cpu()  # (B, K)
        n = len(self.cfg.categories)
        per_attribute = [p.max(dim=1).values for p in probs[:, n:].split(self.counts, dim=1)] if self.counts else []
        attribute_probs = torch.stack(per_attribute, dim=1) if per_attribute else probs[:, :0]  # (B, A)
        out = []
        for row, attrs in zip(probs, attribute_probs):
            categories = dict(zip(self.cfg.categories, row[:n].tolist()))
            attributes = dict(zip(self.cfg.attributes, attrs.tolist()))
            best = max(categories, key=categories.__getitem__) if categories else None
            kept = sorted(((a, s) for a, s in attributes.items() if s >= self.cfg.attribute_threshold),
                          key=lambda a_s: -a_s[1])
            out.append(Recognition(best, categories.get(best), categories, kept, attributes))
        return out
