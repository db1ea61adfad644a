"""Contrastive pre-training of the encoder's open_clip model on region crops and their captions (no Ray here).

DynRefer keeps its CLIP frozen, so that CLIP must already tie image regions to words. The built-in tiny CLIP
has no published weights; this trains it as CLIP is trained (open_clip's ``ClipLoss``, the model's own
learnable logit scale) on each region's t=0 view, sometimes a larger view instead as augmentation (views come
from :mod:`dynrefer.batching`), and writes an ordinary open_clip checkpoint that ``EncoderConfig.checkpoint``
loads like any other.

Identical captions in one batch would be false negatives of the contrastive loss; every batch is reduced to
distinct captions first (:func:`distinct_captions`), across all ranks when the loss gathers their features.

Web captions teach a real CLIP single words and short phrases as well as sentences. With :class:`TextFacets`, a
step's texts are sometimes the captions, sometimes short phrases naming only some facets of each region
("the star", "the red star", "the striped"), the same facets for the whole batch (:func:`step_texts`): once
repeated phrases are removed, every other text of the batch differs from a region's own in a facet it names, so
there are no false negatives, and a phrase naming only the shape makes the step a lesson in shapes alone.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import open_clip
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from dynrefer import storage
from dynrefer.config import EncoderConfig
from dynrefer.encoder import build_clip, clip_pixels, clip_tokenizer, model_config, pixel_statistics

#: open_clip's training clamps the logit scale to ln(100) (a temperature of at least 0.01).
MAX_LOGIT_SCALE = math.log(100.0)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def caption_key(text: str) -> str:
    """A caption as the loss tells captions apart: lower case, single spaces."""
    return " ".join(text.lower().split())


def distinct_captions(per_rank: Sequence[Sequence[str]], rank: int) -> list[int]:
    """Indices of the samples ``rank`` keeps so that no caption repeats across all ranks' batches, and every rank
    keeps the same number (the loss gathers equal-sized batches). The ranks take turns, each keeping its next
    caption not yet kept by any, until one runs out; so a batch of few distinct texts (short phrases) is shared
    out evenly instead of going mostly to the first rank."""
    seen: set[str] = set()
    kept: list[list[int]] = [[] for _ in per_rank]
    position = [0] * len(per_rank)
    while True:
        for r, captions in enumerate(per_rank):
            while position[r] < len(captions) and caption_key(captions[position[r]]) in seen:
                position[r] += 1
            if position[r] == len(captions):
                return kept[rank][:min(len(k) for k in kept)]
            seen.add(caption_key(captions[position[r]]))
            kept[r].append(position[r])
            position[r] += 1


@dataclass(frozen=True)
class TextFacets:
    """How to read facets off a caption: per facet, the words that state it and the answer each states
    (``{"pattern": {"stripes": "striped", ...}}``); the order facets are written in; and the words that end a
    caption's own subject (a relation to another object, whose words are not the region's)."""

    words: Mapping[str, Mapping[str, str]]
    order: tuple[str, ...]
    stop_words: frozenset[str] = frozenset()

    def subsets(self) -> list[tuple[str, ...]]:
        """Every non-empty set of facets, in writing order."""
        return [c for n in range(1, len(self.order) + 1) for c in itertools.combinations(self.order, n)]


def synthetic_text_facets() -> TextFacets:
    """The built-in corpus's visible facets: colour, pattern (its adjective or noun) and shape. Size is left out:
    it is relative to the whole image, which the t=0 crop does not show."""
    from dynrefer import synth

    pattern = {p: p for p in synth.PATTERNS} | {noun: p for p, noun in synth.PATTERN_NOUNS.items()}
    stop = {phrase.split()[0] for phrases in synth.RELATION_PHRASES.values() for phrase in phrases}
    return TextFacets(words={"colour": {c: c for c in synth.COLOURS}, "pattern": pattern,
                             "shape": {s: s for s in synth.SHAPES}},
                      order=("colour", "pattern", "shape"), stop_words=frozenset(stop))


def caption_facets(caption: str, facets: TextFacets) -> dict[str, str]:
    """The answer a caption's subject (its words up to the first stop word) gives to each facet, where it gives
    one: the first word of that facet's vocabulary."""
    words = caption.lower().split()
    end = next((i for i, w in enumerate(words) if i > 0 and w in facets.stop_words), len(words))
    out: dict[str, str] = {}
    for name in facets.order:
        vocabulary = facets.words[name]
        hit = next((vocabulary[w] for w in words[:end] if w in vocabulary), None)
        if hit is not None:
            out[name] = hit
    return out


def facet_text(values: Mapping[str, str], chosen: Sequence[str], order: Sequence[str]) -> str | None:
    """A short phrase naming the chosen facets ("the red star"); None when the region has no answer for one."""
    if any(f not in values for f in chosen):
        return None
    return "the " + " ".join(values[f] for f in order if f in chosen)


def step_texts(captions: Sequence[str], facets: TextFacets | None, full_caption: float,
               rng: np.random.Generator, weights: Sequence[float] | None = None) -> list[str]:
    """The texts one step pairs with its regions: with probability ``full_caption`` (or without facets) the
    captions; otherwise short phrases of one set of facets drawn for the whole step (from
    :meth:`TextFacets.subsets`, by ``weights`` or uniformly). A region whose caption misses a chosen facet keeps its
    caption. Every rank must pass a generator in the same state, so that all draw the same facets."""
    if facets is None or rng.random() < full_caption:
        return list(captions)
    subsets = facets.subsets()
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    chosen = subsets[int(rng.choice(len(subsets), p=p))]
    texts = [facet_text(caption_facets(c, facets), chosen, facets.order) for c in captions]
    return [t if t is not None else c for t, c in zip(texts, captions)]


def pick_crops(views: np.ndarray, larger: float, rng: np.random.Generator) -> np.ndarray:
    """One crop per region: its t=0 view, or with probability ``larger`` its second (larger, randomly drawn) view.

    views: (B, V, S, S, 3) uint8 with t=0 first -> (B, S, S, 3) uint8.
    """
    if views.ndim != 5:
        raise ValueError(f"views must be (B, V, S, S, 3), got shape {views.shape}")
    index = np.zeros(len(views), dtype=np.int64)
    if views.shape[1] > 1 and larger > 0:
        index = (rng.random(len(views)) < larger).astype(np.int64)
    return views[np.arange(len(views)), index]


class ContrastivePretrainer(nn.Module):
    """An open_clip model, its tokenizer and open_clip's ``ClipLoss``; ``forward`` is one training loss."""

    def __init__(self, cfg: EncoderConfig, storage_options: storage.StorageOptions | None = None,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        custom = model_config(cfg, storage_options)
        self.clip = build_clip(cfg, custom, storage_options)  # from cfg.checkpoint when one is given
        self.tokenizer = clip_tokenizer(cfg, custom)
        mean, std = pixel_statistics(self.clip.visual)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.loss = open_clip.ClipLoss(gather_with_grad=True, rank=rank, world_size=world_size)

    def features(self, images: torch.Tensor, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm image and caption embeddings: images (B, S, S, 3) uint8 -> (B, D), (B, D)."""
        tokens = self.tokenizer(list(captions)).to(images.device)  # (B, L)
        image = self.clip.encode_image(clip_pixels(images, self.mean, self.std), normalize=True)
        return image, self.clip.encode_text(tokens, normalize=True)

    def forward(self, images: torch.Tensor, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """images (B, S, S, 3) uint8, B captions -> {"loss", "logit_scale"} (scalars)."""
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        image, text = self.features(images, captions)  # (B, D), (B, D)
        scale = self.clip.logit_scale.exp()
        return {"loss": self.loss(image, text, scale), "logit_scale": scale.detach()}

    @torch.no_grad()
    def embed(self, images: torch.Tensor, captions: Sequence[str], batch_size: int = 256
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of many regions, in batches, in eval mode.  # (N, D), (N, D)"""
        was_training = self.training
        self.eval()
        parts = [self.features(images[i:i + batch_size], captions[i:i + batch_size])
                 for i in range(0, len(images), batch_size)]
        self.train(was_training)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def retrieval_scores(image_features: torch.Tensor, text_features: torch.Tensor, captions: Sequence[str]
                     ) -> dict[str, float]:
    """Region -> caption retrieval among the distinct captions given: recall@1, recall@5, mean and median rank
    (1 is best) of each region's own caption. Features are unit-norm (N, D); regions sharing a caption share it
    as the target."""
    if len(image_features) != len(captions) or len(text_features) != len(captions) or not len(captions):
        raise ValueError(f"need one image and one text embedding per caption, got {len(image_features)}, "
                         f"{len(text_features)} for {len(captions)} captions")
    keys = [caption_key(c) for c in captions]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    pool = sorted(first.values())  # one text per distinct caption
    column = {keys[i]: j for j, i in enumerate(pool)}
    target = torch.tensor([column[k] for k in keys])
    sims = image_features.float() @ text_features[pool].float().T  # (N, K)
    own = sims[torch.arange(len(keys)), target]  # (N,)
    ranks = 1 + (sims > own[:, None]).sum(dim=1).double()  # (N,)
    return {"recall@1": float((ranks <= 1).double().mean()), "recall@5": float((ranks <= 5).double().mean()),
            "mean_rank": float(ranks.mean()), "median_rank": float(ranks.median()), "candidates": float(len(pool)),
            "regions": float(len(keys))}


def clip_state(clip: nn.Module) -> dict[str, torch.Tensor]:
    """The open_clip model's state dict as stand-alone CPU tensors (what a checkpoint stores)."""
    return {k: v.detach().contiguous().cpu().clone() for k, v in clip.state_dict().items()}


def save_clip(clip: nn.Module, uri: str, storage_options: storage.StorageOptions | None = None) -> None:
    """Write an ordinary open_clip checkpoint (``open_clip.load_checkpoint`` reads it): safetensors for a
    ``.safetensors`` name, else a ``{"state_dict": ...}`` torch file as open_clip's training writes."""
    if not uri.endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(f"{uri}: an open_clip checkpoint name ends with one of {CHECKPOINT_SUFFIXES}")
    state = clip_state(clip)
    if uri.endswith(".safetensors"):
        data = save_safetensors(state, metadata={"format": "pt"})
    else:
        import io

        buffer = io.BytesIO()
        torch.save({"state_dict": state}, buffer)
        data = buffer.getvalue()
    storage.write_bytes(uri, data, storage_options)
