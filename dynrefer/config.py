"""Model configuration: one dataclass per component, read from YAML files under ``configs/model/``.

Every knob lives in a config file, never in code; these dataclasses only give the defaults and types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dynrefer.paths import repo_path
from dynrefer.views import CANDIDATE_TS


@dataclass
class EncoderConfig:
    """A frozen open_clip model: a built-in name, a JSON model-config file, or an inline config (``model_cfg``)."""

    name: str = "ViT-B-16"  # built-in open_clip name, or a local/s3:// path to an open_clip model-config JSON
    model_cfg: dict[str, Any] | None = None
    checkpoint: str | None = None  # local path or s3:// URI of an open_clip checkpoint
    layer: int = -1  # transformer block whose patch tokens are used (-2: drop the last block, as BLIP-2)
    freeze: bool = True
    ln_vision_eps: float = 1e-5  # the separate LayerNorm over the tokens (BLIP-2's ln_vision)
    # "sincos": a fixed 2-D sine-cosine code of each RoI token's place in the region, added before the Q-former.
    # A ViT's tokens carry their position (the official model's do), a conv trunk's stage does not: without it the
    # Q-former attends to an unordered bag of local features and cannot read a shape. "none": the official model.
    grid_positions: str = "none"


@dataclass
class ViewConfig:
    """How many views per region and which coefficients t they are drawn from (t=0 is always kept)."""

    num_views: int = 3
    candidate_ts: list[float] = field(default_factory=lambda: list(CANDIDATE_TS))
    selection: str = "phash"  # inference: "phash" (greedy over pHASH codes) or "fixed"
    fixed_ts: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    train_selection: str = "random"  # training: "random" (the method: drawn anew per sighting) or "fixed" (ablations)
    hash: str = "imagehash"  # pHASH codes computed at inference: "imagehash" or "official" (see dynrefer.phash)


@dataclass
class AlignmentConfig:
    """The official DCNv4 alignment block (see :mod:`dynrefer.alignment`)."""

    kernel_size: int = 3
    groups: int = 4  # DCNv4 groups: each samples C / groups channels with its own offsets and masks
    dw_kernel_size: int = 3  # the depthwise conv over cat[view, reference] that predicts offsets and masks
    offset_scale: float = 1.0
    enabled: bool = True


@dataclass
class QFormerConfig:
    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    dropout: float = 0.1
    path: str | None = None  # BLIP-2 Hugging Face directory to initialise from (keys "qformer.*", "query_tokens")
    freeze_queries: bool = True  # the official code trains the Q-former but keeps BLIP-2's query tokens frozen
    # Std of the Q-former's weights at random init (BLIP-2's 0.02; loaded weights replace them). A Q-former trained
    # from scratch at 0.02 passes ~1% of its input through its cross-attention at first.
    initializer_range: float = 0.02


@dataclass
class DecoderConfig:
    """A query-based decoder (tags or contrastive): the official post-LN BERT layers of cross-attention and a
    feed-forward block (no self-attention) over the region queries."""

    dim: int = 256
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int | None = None  # feed-forward width; None: 4 * dim (the official 1024)
    dropout: float = 0.1  # on attention probabilities and both residual branches, as BERT
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02  # BERT's: the std of the layers' linear weights at initialisation
    projection_init_std: float | None = None  # text/region projections and fc: None = PyTorch's default (official)

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.dim


@dataclass
class TagConfig:
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vocabulary: list[str] = field(default_factory=list)
    threshold: float = 0.7
    gamma_neg: float = 7.0
    gamma_pos: float = 0.0
    clip: float = 0.05


@dataclass
class ContrastiveConfig:
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    init_logit_scale: float = 2.302585  # log 10
    init_logit_bias: float = -10.0


def _ovad_templates() -> dict[str, list[str]]:
    return {"is": ["the {attr} {noun}", "the {noun} is {attr}"],
            "has": ["the {attr} {dobj} {noun}", "the {noun} has {attr} {dobj}"]}


def _ovad_synonyms() -> dict[str, list[str]]:
    return {"young/baby": ["kid", "kids", "child", "toddler", "boy", "girl"], "adult/old/aged": ["teen", "elder"]}


@dataclass
class RecognitionConfig:
    """Open-vocabulary recognition through the contrastive head, with the official prompts (see
    :mod:`dynrefer.recognition`). Empty lists turn it off; the training pipeline fills them from the data."""

    categories: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)  # OVAD names ("type:syn1/syn2") or plain words
    category_prompt: str = "the {category}"
    attribute_templates: dict[str, list[str]] = field(default_factory=_ovad_templates)  # by kind: "is" / "has"
    attribute_kinds: dict[str, str] = field(default_factory=dict)  # attribute -> "has"; the rest are "is"
    attribute_synonyms: dict[str, list[str]] = field(default_factory=_ovad_synonyms)  # extra synonyms, by list
    attribute_noun: str = ""  # the {noun} of the templates: empty in the official code
    attribute_threshold: float = 0.5  # attributes reported per region: probability at least this


@dataclass
class LanguageConfig:
    """A Hugging Face LM (encoder-decoder or decoder-only) from a directory, or built from ``arch``."""

    path: str | None = None  # local dir or s3:// URI of a Hugging Face model directory
    arch: dict[str, Any] | None = None  # transformers config dict (model_type, sizes) for random init
    vocabulary: list[str] | None = None  # word list for a built-in word-level tokenizer when no path is given
    freeze: bool = True
    dense_act_fn: str | None = None  # set on a loaded LM's config; the official Flan-T5 uses "gelu"
    max_text_len: int = 32  # tokens of the control string and of the caption target, EOS included
    num_beams: int = 2
    max_new_tokens: int = 20
    min_length: int = 1
    length_penalty: float = 0.0  # the official setting: beams ranked by summed log-probability
    repetition_penalty: float = 1.5
    control_words: bool = True
    drop_all_tags: float = 0.5  # training: no control words at all with this probability
    drop_each_tag: float = 0.5  # training: otherwise each control word dropped with this probability


@dataclass
class LossConfig:
    caption: float = 1.0
    tags: float = 0.01
    contrastive: float = 0.5
    # BLIP-2's first-stage image-text contrastive loss on the region queries (dynrefer.qformer.QueryTextContrast).
    # Not part of DynRefer's training: a run with only this loss on stands in for BLIP-2's pre-trained Q-former
    # when the model is built from scratch; the next run starts from its export (``init_from``).
    itc: float = 0.0


@dataclass
class DynReferConfig:
    image_size: int = 224
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    tags: TagConfig = field(default_factory=TagConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DynReferConfig":
        return _build(cls, data, "model")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "DynReferConfig":
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


T = TypeVar("T")


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build a (nested) dataclass from a dict, rejecting unknown keys so that typos fail loudly."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default) and value is not None:
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, recursively for nested mappings (model_overrides, dotted flags)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_path(name_or_path: str) -> Path:
    """Resolve ``tiny`` to ``configs/model/tiny.yaml`` in this repository, or return the given path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return Path(repo_path("configs", "model", f"{name_or_path}.yaml"))


def load_config(name_or_path: str) -> DynReferConfig:
    path = config_path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"model config {name_or_path!r} not found (looked for {path})")
    return DynReferConfig.from_yaml(path)
