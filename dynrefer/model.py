"""DynRefer: one region model for captioning, dense captioning, attribute detection and region recognition.

A region arrives as V views (view 0 is t=0) with its RoI in each view's pixel frame. The multi-view embedding
gives Q region queries; three heads read them: tags, region-text contrastive, and the language model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dynrefer import storage
from dynrefer.config import DynReferConfig
from dynrefer.decoders import ContrastiveHead, TagHead
from dynrefer.embedding import MultiViewEmbedding
from dynrefer.encoder import ImageEncoder
from dynrefer.language import LanguageHead, normalize_caption
from dynrefer.qformer import QueryTextContrast, read_blip2
from dynrefer.recognition import Recognition, RecognitionPrompts, prompts


@dataclass
class RegionPrediction:
    caption: str
    tags: list[tuple[str, float]]
    text_scores: dict[str, float] = field(default_factory=dict)
    recognition: Recognition | None = None  # category and attributes, when the config names any
    caption_score: float | None = None  # the caption's probability under the LM, exp(beam score)


class DynRefer(nn.Module):
    def __init__(self, cfg: DynReferConfig, storage_options: storage.StorageOptions | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg.encoder, storage_options)
        self.embedding = MultiViewEmbedding(cfg, self.encoder, storage_options)
        region_dim, text_dim = cfg.qformer.hidden_size, self.encoder.text_dim
        self.tags = TagHead(cfg.tags, text_dim, region_dim)
        self.contrastive = ContrastiveHead(cfg.contrastive, text_dim, region_dim)
        self.language = LanguageHead(cfg.language, region_dim, storage_options)
        self.recognition = RecognitionPrompts(cfg.recognition, text_dim)
        self.itc = QueryTextContrast(region_dim, text_dim) if cfg.loss.itc > 0 else None  # a stage-1 run only
        if cfg.qformer.path:  # BLIP-2's language projection initialises the LM projection (t5_proj)
            self.load_blip2_projection(storage.local_copy(cfg.qformer.path, storage_options))
        promote_scalar_parameters(self)
        self.refresh_text_embeddings()

    def load_blip2_projection(self, directory: str) -> None:
        state = {k.removeprefix("language_projection."): v for k, v in read_blip2(directory).items()
                 if k.startswith("language_projection.")}
        shapes = {k: tuple(v.shape) for k, v in self.language.proj.state_dict().items()}
        if {k: tuple(v.shape) for k, v in state.items()} != shapes:
            raise ValueError(f"{directory}: language_projection {({k: tuple(v.shape) for k, v in state.items()})} "
                             f"does not match the LM projection {shapes}")
        self.language.proj.load_state_dict(state)

    def refresh_text_embeddings(self) -> None:
        """Tag queries and recognition prompts are frozen CLIP text embeddings; recompute after encoder weights
        change."""
        for texts, target in ((self.cfg.tags.vocabulary, self.tags.tag_embeddings),
                              (prompts(self.cfg.recognition), self.recognition.embeddings)):
            if not texts or target.is_meta:
                continue
            chunks = [self.encoder.encode_text(texts[i: i + 512]) for i in range(0, len(texts), 512)]
            target.copy_(torch.cat(chunks).to(target.dtype))

    def freeze_unused_heads(self) -> None:
        """Freeze the heads whose loss is off, so that optimizers (and DDP) only hold parameters that get gradients."""
        w = self.cfg.loss
        for head, used in ((self.tags, w.tags > 0 and len(self.cfg.tags.vocabulary) > 0),
                           (self.contrastive, w.contrastive > 0), (self.language, w.caption > 0)):
            if not used:
                head.requires_grad_(False)

    def forward(self, views: torch.Tensor, view_index: torch.Tensor, rois: torch.Tensor, captions: list[str],
                tags: list[list[str]]) -> dict[str, torch.Tensor]:
        """views: (N, S, S, 3) uint8, view_index: (B, V) into views, rois: (B, V, 4) (as in
        :class:`dynrefer.batching.ModelInputs`); returns each enabled loss and their weighted sum."""
        w = self.cfg.loss
        captions = [normalize_caption(c) for c in captions]
        regions = self.embedding(views, view_index, rois)  # (B, Q, H)
        losses: dict[str, torch.Tensor] = {}
        if w.tags > 0 and len(self.cfg.tags.vocabulary):
            losses["tags"] = self.tags.loss(self.tags(regions), tags)
        if w.contrastive > 0 or self.itc is not None:
            texts = self.encoder.encode_text(captions).to(regions.dtype)  # (B, D_text)
            if w.contrastive > 0:
                losses["contrastive"] = self.contrastive.loss(texts, regions)
            if self.itc is not None:
                losses["itc"] = self.itc.loss(texts, regions)
        if w.caption > 0:
            controls = self.language.control_words(tags, captions) if self.training else tags
            losses["caption"] = self.language.loss(regions, controls, captions)
        losses["loss"] = sum(getattr(w, name) * value for name, value in losses.items())
        return losses

    @torch.no_grad()
    def predict(self, views: torch.Tensor, view_index: torch.Tensor, rois: torch.Tensor,
                texts: list[str] | None = None, caption: bool = True) -> list[RegionPrediction]:
        """Per region (inputs as for ``forward``): a caption (predicted tags as control words) and its probability,
        tags with scores, category and attributes (when the config names any), and ``sigmoid`` scores of the given
        texts."""
        b = view_index.shape[0]
        regions = self.embedding(views, view_index, rois)  # (B, Q, H)
        tags = self.tags.decode(self.tags(regions)) if len(self.cfg.tags.vocabulary) else [[] for _ in range(b)]
        captions, caption_scores = (self.language.generate(regions, self.tags.control_words(tags)) if caption
                                    else (["" for _ in range(b)], [None] * b))
        scores: list[dict[str, float]] = [{} for _ in range(b)]
        if texts:
            probs = torch.sigmoid(self.contrastive(self.encoder.encode_text(texts).to(regions.dtype), regions))
            scores = [dict(zip(texts, row.tolist())) for row in probs.float()]
        recognized: list[Recognition | None] = [None] * b
        if len(self.recognition):
            prompt_embeddings = self.recognition.embeddings.to(regions.dtype)  # (K, D_text)
            recognized = self.recognition.decode(self.contrastive(prompt_embeddings, regions))
        return [RegionPrediction(*fields) for fields in zip(captions, tags, scores, recognized, caption_scores)]


def promote_scalar_parameters(module: nn.Module) -> None:
    """Give every 0-dim parameter (the logit scales) shape (1,), which broadcasts the same in every formula.

    DeepSpeed fails on 0-dim parameters: it broadcasts them as byte views and clips their gradients in place by
    a (1,)-shaped coefficient.
    """
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(m, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters, counting tied tensors once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    return total, sum(p.numel() for p in seen.values() if p.requires_grad)
