"""The two query-based decoders on the region representation: tags and region-text contrastive.

Both are the official code's "tagging" BERT: text embeddings from the frozen CLIP text tower (raw, not
L2-normalised), projected, are the queries; the projected region queries are keys and values; each layer is
cross-attention then a feed-forward block, post-LN as in BERT, with no self-attention (so every text is scored
independently of the others) and no embeddings. Parameter names follow BERT's, so official weights map 1:1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dynrefer.config import ContrastiveConfig, DecoderConfig, TagConfig


class _Projections(nn.Module):
    """BERT's attention projections: query from the texts, key and value from the regions."""

    def __init__(self, dim: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)


class _Residual(nn.Module):
    """Linear, dropout, then LayerNorm of the sum with the block's input (BERT's post-LN)."""

    def __init__(self, d_in: int, dim: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class CrossAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.heads, self.dropout = cfg.num_heads, cfg.dropout
        self.self = _Projections(cfg.dim)
        self.output = _Residual(cfg.dim, cfg.dim, cfg.dropout, cfg.layer_norm_eps)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """queries: (B, K, D), memory: (B, Q, D) -> (B, K, D)."""
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, h, L, D/h)

        p = self.self
        context = F.scaled_dot_product_attention(
            heads(p.query(queries)), heads(p.key(memory)), heads(p.value(memory)),
            dropout_p=self.dropout if self.training else 0.0)  # (B, h, K, D/h)
        return self.output(context.transpose(1, 2).flatten(2), queries)


class _Intermediate(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class DecoderLayer(nn.Module):
    """Cross-attention to the region queries, then the feed-forward block; each post-LN with a residual."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.crossattention = CrossAttention(cfg)
        self.intermediate = _Intermediate(cfg.dim, cfg.ffn_size)
        self.output = _Residual(cfg.ffn_size, cfg.dim, cfg.dropout, cfg.layer_norm_eps)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        attended = self.crossattention(queries, memory)  # (B, K, D)
        return self.output(self.intermediate(attended), attended)


class _Encoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))


def bert_init(module: nn.Module, std: float) -> None:
    """BERT's initialisation, as the official heads get it from their BertModel: linear weights normal(0, std),
    biases zero, LayerNorms the identity. The projections and ``fc`` around the BERT layers keep PyTorch's default,
    as in the official code, unless ``projection_init_std`` says otherwise."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class QueryDecoder(nn.Module):
    """Reads K text queries against each region: (K, D_text) x (B, Q, H) -> hidden states (B, K, D)."""

    def __init__(self, cfg: DecoderConfig, text_dim: int, region_dim: int):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, cfg.dim)
        self.region_proj = nn.Linear(region_dim, cfg.dim)
        self.encoder = _Encoder(cfg)
        self.encoder.apply(lambda m: bert_init(m, cfg.initializer_range))
        self.fc = nn.Linear(cfg.dim, 1)
        if cfg.projection_init_std is not None:
            for proj in (self.text_proj, self.region_proj, self.fc):
                bert_init(proj, cfg.projection_init_std)

    def hidden(self, texts: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """texts: (K, D_text) shared by every region, or (B, K, D_text) per region; regions: (B, Q, H)."""
        memory = self.region_proj(regions)  # (B, Q, D)
        queries = self.text_proj(texts)
        if queries.ndim == 2:
            queries = queries.unsqueeze(0).expand(regions.shape[0], -1, -1)  # (B, K, D)
        for layer in self.encoder.layer:
            queries = layer(queries, memory)
        return queries


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 7.0,
                    gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021) for multi-label tags, summed over regions and tags as the official code.

    logits, targets: (B, K). The negative probability is shifted by ``clip`` and the focusing weight
    ``(1 - p_t) ** gamma`` is a constant (no gradient flows through it), as with ASL's
    ``disable_torch_grad_focal_loss``.
    """
    p = torch.sigmoid(logits)
    p_neg = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p  # probability of "not this tag", shifted
    loss = targets * torch.log(p.clamp(min=eps)) + (1 - targets) * torch.log(p_neg.clamp(min=eps))
    with torch.no_grad():
        p_t = p * targets + p_neg * (1 - targets)
        weight = torch.pow(1 - p_t, gamma_pos * targets + gamma_neg * (1 - targets))
    return -(loss * weight).sum()


def siglip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss on a (B_local, B_other) logit matrix, labels +1 / -1, divided by B_local.

    open_clip's SigLipLoss scores pairs by a dot product of features; here the decoder scores every pair, so the
    same definition is applied to the logit matrix.
    """
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def gather_batches(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every worker's ``x`` (B_r, ...) concatenated in rank order, without gradient, and where this rank's rows
    start; ranks may hold different batch sizes. Outside torch.distributed (or with one worker): ``x``, 0."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach(), 0
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    counts = [int(s) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), sum(counts[:rank])


class TagHead(nn.Module):
    """Open-vocabulary tags: every vocabulary tag is a query; sigmoid > threshold tags the region."""

    def __init__(self, cfg: TagConfig, text_dim: int, region_dim: int):
        super().__init__()
        self.cfg = cfg
        self.decoder = QueryDecoder(cfg.decoder, text_dim, region_dim)
        self.register_buffer("tag_embeddings", torch.zeros(len(cfg.vocabulary), text_dim))
        self.index = {t: i for i, t in enumerate(cfg.vocabulary)}

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """regions: (B, Q, H) -> logits (B, K) over the vocabulary."""
        return self.decoder.fc(self.decoder.hidden(self.tag_embeddings, regions)).squeeze(-1)

    def targets(self, tags: list[list[str]]) -> torch.Tensor:
        """Multi-hot targets (B, K); tags outside the vocabulary are ignored."""
        out = torch.zeros(len(tags), len(self.cfg.vocabulary), device=self.tag_embeddings.device)
        for i, region_tags in enumerate(tags):
            idx = [self.index[t] for t in region_tags if t in self.index]
            out[i, idx] = 1.0
        return out

    def loss(self, logits: torch.Tensor, tags: list[list[str]]) -> torch.Tensor:
        c = self.cfg
        return asymmetric_loss(logits.float(), self.targets(tags), c.gamma_neg, c.gamma_pos, c.clip)

    def decode(self, logits: torch.Tensor) -> list[list[tuple[str, float]]]:
        """Tags above the threshold with their probabilities, best first."""
        probs = torch.sigmoid(logits.float())
        out = []
        for row in probs:
            keep = torch.nonzero(row > self.cfg.threshold).flatten()
            order = keep[row[keep].argsort(descending=True, stable=True)]
            out.append([(self.cfg.vocabulary[i], float(row[i])) for i in order.tolist()])
        return out

    def control_words(self, tags: list[list[tuple[str, float]]]) -> list[list[str]]:
        """Decoded tags as the LM's control words: the official code passes the set of predicted tags; vocabulary
        order is that set's deterministic form."""
        return [sorted((t for t, _ in region), key=self.index.__getitem__) for region in tags]


def calibrated_threshold(probs: torch.Tensor, targets: torch.Tensor, min_precision: float,
                         candidates: tuple[float, ...] = tuple(i / 100 for i in range(50, 100))
                         ) -> tuple[float, float, float] | None:
    """The lowest candidate threshold whose tag precision on held-out regions reaches ``min_precision`` (the
    most precise one when none does), with its precision and recall; None when no candidate keeps a tag.

    probs, targets: (N, K) tag probabilities and 0/1 truth. Predicted tags are the LM's control words, so a
    threshold that passes every tag of an undiscriminating head feeds it noise; this picks where tags start to be
    right instead of a fixed 0.7.
    """
    truth = targets > 0
    scored = []
    for t in candidates:
        kept = probs > t
        if kept.any():
            hits = (kept & truth).sum().item()
            scored.append((t, hits / kept.sum().item(), hits / max(truth.sum().item(), 1)))
    if not scored:
        return None
    reaching = [s for s in scored if s[1] >= min_precision]
    return reaching[0] if reaching else max(scored, key=lambda s: (s[1], -s[0]))


class ContrastiveHead(nn.Module):
    """Region-text matching: a text embedding is the query; the score is ``fc(L2normalise(h))``."""

    def __init__(self, cfg: ContrastiveConfig, text_dim: int, region_dim: int):
        super().__init__()
        self.cfg = cfg
        self.decoder = QueryDecoder(cfg.decoder, text_dim, region_dim)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.init_logit_bias))

    def forward(self, texts: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """texts: (K, D_text), regions: (B, Q, H) -> uncalibrated scores (B, K); ``sigmoid`` of them is what the
        official code reports at inference."""
        return self.decoder.fc(F.normalize(self.decoder.hidden(texts, regions), dim=-1)).squeeze(-1)

    def logits(self, scores: torch.Tensor) -> torch.Tensor:
        """Training logits: ``score * exp(t) + b``."""
        return scores * self.logit_scale.exp() + self.logit_bias

    def loss(self, texts: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """SigLIP across workers, both directions averaged: local texts against every worker's regions, and every
        worker's texts against the local regions (the gathered side carries no gradient). A region matches its own
        caption only. texts: (B, D_text), regions: (B, Q, H)."""
        b = regions.shape[0]
        all_regions, start = gather_batches(regions)  # (B_all, Q, H)
        all_texts, _ = gather_batches(texts)  # (B_all, D_text)
        labels = -torch.ones(b, all_regions.shape[0], device=regions.device, dtype=regions.dtype)
        labels[torch.arange(b), start + torch.arange(b)] = 1.0
        # text i (local) against region j (all): each gathered region is a batch row, the local texts its queries
        text_to_region = self(texts, all_regions).transpose(0, 1)  # (B, B_all)
        region_to_text = self(all_texts, regions)  # (B, B_all): local region i against text j (all)
        loss = siglip_loss(self.logits(text_to_region), labels) + siglip_loss(self.logits(region_to_text), labels)
        return loss / 2
