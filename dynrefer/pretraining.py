"""Contrastive pre-training of the encoder's open_clip model on region crops and their captions (no Ray here).

DynRefer keeps its CLIP frozen, so that CLIP must already tie image regions to words. The built-in tiny CLIP
has no published weights; this trains it as CLIP is trained (open_clip's ``ClipLoss``, the model's own
learnable logit scale) on each region's t=0 view, sometimes a larger view instead as augmentation (views come
from :mod:`dynrefer.batching`), and writes an ordinary open_clip checkpoint that ``EncoderConfig.checkpoint``
loads like any other.

Identical captions in one batch would be false negatives of the contrastive loss; every batch is reduced to
distinct captions first (:func:`distinct_captions`), across all ranks when the loss gathers their features.
"""

from __future__ import annotations

import math
from typing import Sequence

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
    keeps the same number (the loss gathers equal-sized batches): the first sighting of a caption in rank order
    wins, then each rank's list is cut to the shortest one."""
    seen: set[str] = set()
    kept: list[list[int]] = []
    for captions in per_rank:
        mine = []
        for i, caption in enumerate(captions):
            key = caption_key(caption)
            if key not in seen:
                seen.add(key)
                mine.append(i)
        kept.append(mine)
    return kept[rank][:min(len(k) for k in kept)]


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
