"""Model configuration: one dataclass per component, read from YAML files under ``configs/model/``.

Every knob lives in a config file, never in code; these dataclasses only give the defaults and types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dynrefer.views import CANDIDATE_TS


@dataclass
class EncoderConfig:
    """A frozen open_clip model: a built-in name, a JSON model-config file, or an inline config (``model_cfg``)."""

    name: str = "ViT-B-16"  # built-in open_clip name, or a local/s3:// path to an open_clip model-config JSON
    model_cfg: dict[str, Any] | None = None
    checkpoint: str | None = None  # local path or s3:// URI of an open_clip checkpoint
    layer: int = -1  # transformer block whose patch tokens are used (-2: drop the last block, as BLIP-2)
    freeze: bool = True


@dataclass
class ViewConfig:
    """How many views per region and which coefficients t they are drawn from (t=0 is always kept)."""

    num_views: int = 3
    candidate_ts: list[float] = field(default_factory=lambda: list(CANDIDATE_TS))
    selection: str = "phash"  # inference: "phash" (greedy over pHASH codes) or "fixed"
    fixed_ts: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    train_selection: str = "random"  # training: "random" (the method: drawn anew per sighting) or "fixed" (ablations)


@dataclass
class AlignmentConfig:
    kernel_size: int = 3
    offset_groups: int = 4
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


@dataclass
class DecoderConfig:
    """A query-based decoder (tags or contrastive): cross-attention-only layers over the region queries."""

    dim: int = 256
    num_layers: int = 2
    num_heads: int = 4


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


@dataclass
class RecognitionConfig:
    """Open-vocabulary recognition through the contrastive head, as the paper does it: class prompts give each
    region a category, attribute prompts its attributes. Empty lists turn it off; the training pipeline fills
    them from the data's categories and attributes."""

    categories: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)
    category_prompt: str = "the {category}"
    attribute_prompt: str = "the {attribute} object"
    attribute_threshold: float = 0.5  # attributes reported per region: probability at least this


@dataclass
class LanguageConfig:
    """A Hugging Face LM (encoder-decoder or decoder-only) from a directory, or built from ``arch``."""

    path: str | None = None  # local dir or s3:// URI of a Hugging Face model directory
    arch: dict[str, Any] | None = None  # transformers config dict (model_type, sizes) for random init
    vocabulary: list[str] | None = None  # word list for a built-in word-level tokenizer when no path is given
    freeze: bool = True
    max_text_len: int = 32
    num_beams: int = 2
    max_new_tokens: int = 20
    repetition_penalty: float = 1.5
    control_words: bool = True
    drop_all_tags: float = 0.5
    drop_each_tag: float = 0.5


@dataclass
class LossConfig:
    caption: float = 1.0
    tags: float = 0.01
    contrastive: float = 0.5


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


def config_path(name_or_path: str) -> Path:
    """Resolve ``tiny`` to ``configs/model/tiny.yaml`` in this repository, or return the given path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return Path(__file__).resolve().parent.parent / "configs" / "model" / f"{name_or_path}.yaml"


def load_config(name_or_path: str) -> DynReferConfig:
    path = config_path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"model config {name_or_path!r} not found (looked for {path})")
    return DynReferConfig.from_yaml(path)
