"""Class-agnostic region proposals: where to caption when no boxes are given.

DynRefer's paper captions the boxes of another detector (GRiT). We train our own: a torchvision detector with
two classes (background and "region"), from scratch, on any corpus of region records (the synthetic one by
default). Everything is plain torch: :func:`optimizer_step` (schedule, :func:`train_step`, clipping, update) and
:func:`augment` are the one training step that :func:`fit`, the single-process loop for tests and the demo, and the
Ray Train pipeline (``pipelines/proposals.py``) both call; :class:`Proposer` turns a PIL image into scored boxes.

Why FCOS on ResNet-18 by default: trained from scratch on 48 synthetic images at 256 px on 2 CPU cores for 40
steps of 4 images, torchvision's Faster R-CNN MobileNetV3-Large-FPN trained at 1.2 images/s and its held-out recall
(IoU 0.5, 100 proposals) fell from 0.14 (random boxes) to 0.03-0.07; FCOS on ResNet-18 in torchvision's layout
trained at 1.6 images/s to a recall of 0.52, and with the tiny config's narrower FPN (128), 2-conv head and halved
anchor sizes at 3.9 images/s to 0.61 (0.94 after 300 steps on 96 images). FCOS is anchor-free with a GroupNorm
head, so batches of 4 train, and has no second stage whose RoI sampling spends CPU time on few positives.

An export is ``config.json`` + ``model.safetensors`` (never a pickle), local or ``s3://``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
import yaml
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FrozenBatchNorm2d, batched_nms, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from dynrefer import storage
from dynrefer.config import _build
from dynrefer.imageio import decode_image
from dynrefer.paths import repo_path
from dynrefer.storage import StorageOptions

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: Label of every foreground box: the detector has one class besides background.
REGION_LABEL = 1


@dataclass
class ProposalTrainConfig:
    """Optimiser and sampling for :func:`fit` (the Ray Train pipeline reads the same fields)."""

    batch_size: int = 4
    optimizer: str = "adamw"  # "adamw" or "sgd" (with momentum); AdamW learnt faster from scratch here
    lr: float = 1.0e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1.0e-4
    warmup_steps: int = 10  # linear warmup from 1% of lr, then cosine decay to ``min_lr_ratio`` * lr
    min_lr_ratio: float = 0.05
    grad_clip: float = 10.0  # max gradient norm; 0 disables (from scratch, early steps can spike)
    hflip: float = 0.5  # probability of a horizontal flip per image
    seed: int = 0


@dataclass
class ProposalConfig:
    """A class-agnostic proposal model; every knob is read from ``configs/proposals/*.yaml``."""

    architecture: str = "fcos_resnet18_fpn"
    min_size: int = 320  # shorter image side the detector sees (images are resized, boxes mapped back)
    max_size: int = 512  # cap on the longer side
    score_threshold: float = 0.0
    nms_iou: float = 0.5
    max_detections: int = 100
    trainable_backbone_layers: int | None = None  # None: all; fewer only makes sense when starting from weights
    weights: str | None = None  # local or s3:// export (directory) or .safetensors file to start from
    anchor_sizes: list[int] | None = None  # FCOS compositions: one per level, P3-P7 (None: 8, 16, 32, 64, 128)
    fpn_channels: int | None = None  # FCOS compositions: FPN and head width (None: 256)
    head_convs: int | None = None  # FCOS compositions: 3x3 convs per head branch (None: 4)
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the torchvision model
    train: ProposalTrainConfig = field(default_factory=ProposalTrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProposalConfig:
        return _build(cls, data, "proposals")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ProposalConfig:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def load_proposal_config(name_or_path: str) -> ProposalConfig:
    """``tiny`` -> ``configs/proposals/tiny.yaml`` of this repository; anything with a .yaml suffix is a path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = Path(repo_path("configs", "proposals", f"{name_or_path}.yaml"))
    if not path.exists():
        raise FileNotFoundError(f"proposal config {name_or_path!r} not found (looked for {path})")
    return ProposalConfig.from_yaml(path)


# --- architectures ------------------------------------------------------------------------------------------------

def _anchors(cfg: ProposalConfig, default: list[int]) -> AnchorGenerator:
    """One square anchor per location and level; FCOS reads its size as the level's scale (objects whose
    largest centre-to-edge distance is 4-8 sizes go to that level)."""
    sizes = cfg.anchor_sizes or default
    if len(sizes) != len(default):
        raise ValueError(f"anchor_sizes: {cfg.architecture} has {len(default)} pyramid levels, got {len(sizes)}")
    return AnchorGenerator(tuple((int(s),) for s in sizes), ((1.0,),) * len(sizes))


def _detector_kwargs(cfg: ProposalConfig, family: str) -> dict[str, Any]:
    """The config's inference knobs under the names each torchvision family uses."""
    if family == "fasterrcnn":
        names = ("box_score_thresh", "box_nms_thresh", "box_detections_per_img")
    else:
        names = ("score_thresh", "nms_thresh", "detections_per_img")
    values = (cfg.score_threshold, cfg.nms_iou, cfg.max_detections)
    return {"min_size": cfg.min_size, "max_size": cfg.max_size, **dict(zip(names, values)), **cfg.options}


def _fcos_resnet(cfg: ProposalConfig, depth: str) -> nn.Module:
    """FCOS on a ResNet + FPN (P3-P7, strides 8-128), as torchvision's FCOS-R50 but with any depth, FPN width
    and head depth: the head's 3x3 convs over P3 dominate the cost at small image sizes."""
    channels = cfg.fpn_channels or 256
    resnet = torchvision.models.get_model(depth, weights=None)  # BatchNorm2d: trains from scratch
    widths = [resnet.inplanes // 4 * 2 ** i for i in range(3)]  # layer2-4: 128-512 (ResNet-18/34), 512-2048 (50)
    backbone = BackboneWithFPN(resnet, {"layer2": "0", "layer3": "1", "layer4": "2"}, widths, channels,
                               extra_blocks=LastLevelP6P7(channels, channels))
    head = FCOSHead(channels, num_anchors=1, num_classes=2, num_convs=cfg.head_convs or 4)
    generator = _anchors(cfg, [8, 16, 32, 64, 128])
    return FCOS(backbone, num_classes=2, anchor_generator=generator, head=head, **_detector_kwargs(cfg, "fcos"))


#: Architectures composed here from torchvision parts (FCOS learnt fastest from scratch on CPU: module docstring);
#: any other name of torchvision's Faster R-CNN, FCOS or RetinaNet builders is built by torchvision itself.
ARCHITECTURES: dict[str, Callable[[ProposalConfig], nn.Module]] = {
    f"fcos_{depth}_fpn": (lambda cfg, depth=depth: _fcos_resnet(cfg, depth)) for depth in ("resnet18", "resnet34",
                                                                                         "resnet50")
}
TORCHVISION_FAMILIES = ("fasterrcnn", "fcos", "retinanet")


def _torchvision_builder(cfg: ProposalConfig) -> nn.Module:
    names = torchvision.models.list_models(module=torchvision.models.detection)
    family = cfg.architecture.split("_")[0]
    if cfg.architecture not in names or family not in TORCHVISION_FAMILIES:
        known = sorted(set(ARCHITECTURES) | {n for n in names if n.split("_")[0] in TORCHVISION_FAMILIES})
        raise ValueError(f"architecture: unknown {cfg.architecture!r}; known: {known}")
    for key in ("anchor_sizes", "fpn_channels", "head_convs"):
        if getattr(cfg, key) is not None:
            raise ValueError(f"{key}: only for the architectures composed here ({sorted(ARCHITECTURES)}), "
                             f"not torchvision's {cfg.architecture}")
    return torchvision.models.get_model(cfg.architecture, weights=None, weights_backbone=None, num_classes=2,
                                        **_detector_kwargs(cfg, family))


def _backbone_stages(model: nn.Module) -> list[list[str]]:
    """Names of the backbone body's children per stage, bottom-up, counted as torchvision counts them
    (ResNet: stem, layer1-4; MobileNetV3: 6)."""
    names = [name for name, _ in model.backbone.body.named_children()]
    if "layer1" in names:
        starts = [0] + [i for i, name in enumerate(names) if name.startswith("layer")]
    else:
        modules = list(model.backbone.body.children())
        starts = [0] + [i for i, m in enumerate(modules) if getattr(m, "_is_cn", False)] + [len(names) - 1]
    bounds = starts + [len(names)]
    return [names[a:b] for a, b in itertools.pairwise(bounds)]


def _frozen(module: nn.Module) -> nn.Module:
    """``module`` without gradients and with fixed BatchNorm statistics (FrozenBatchNorm2d: the same tensors,
    no step counter), so a frozen stage computes the same in training as in evaluation."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(module, name).detach())
        return frozen
    for name, child in list(module.named_children()):
        setattr(module, name, _frozen(child))
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _architecture(cfg: ProposalConfig) -> nn.Module:
    """The randomly initialised detector with the configured backbone stages frozen (no weights read)."""
    builder = ARCHITECTURES.get(cfg.architecture, _torchvision_builder)
    model = builder(cfg)
    if cfg.trainable_backbone_layers is not None:
        stages = _backbone_stages(model)
        if not 0 <= cfg.trainable_backbone_layers <= len(stages):
            raise ValueError(f"trainable_backbone_layers: {cfg.architecture} has {len(stages)} backbone stages, "
                             f"got {cfg.trainable_backbone_layers}")
        body = model.backbone.body
        for stage in stages[:len(stages) - cfg.trainable_backbone_layers]:
            for name in stage:
                setattr(body, name, _frozen(getattr(body, name)))
    return model


def build_proposer(cfg: ProposalConfig, storage_options: StorageOptions | None = None) -> nn.Module:
    """The detector of ``cfg`` (a torchvision ``GeneralizedRCNN``/``FCOS``/``RetinaNet``), from ``cfg.weights`` if set.

    Freezing backbone stages of a random initialisation is refused: it would fix random features for good.
    """
    if cfg.weights is None and cfg.trainable_backbone_layers is not None:
        stages = len(_backbone_stages(_architecture(dataclasses.replace(cfg, trainable_backbone_layers=None))))
        if cfg.trainable_backbone_layers < stages:
            raise ValueError(f"trainable_backbone_layers={cfg.trainable_backbone_layers} freezes randomly "
                             f"initialised backbone stages; set weights, or leave it null to train all {stages}")
    model = _architecture(cfg)
    if cfg.weights is not None:
        uri = cfg.weights if cfg.weights.endswith(".safetensors") else storage.join(cfg.weights, WEIGHTS_FILE)
        _load_state(model, load_safetensors(storage.read_bytes(uri, storage_options)), uri)
    return model


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], uri: str) -> None:
    """Load every tensor or fail naming the mismatch. BatchNorm's step counters are not compared: a stage frozen
    here has none (FrozenBatchNorm2d), and one frozen in the source still loads into a trainable BatchNorm."""
    def names(keys: Any) -> set[str]:
        return {k for k in keys if not k.endswith("num_batches_tracked")}

    expected, given = names(model.state_dict()), names(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(f"{uri}: weights do not match the architecture (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.load_state_dict(state, strict=False)


# --- targets ------------------------------------------------------------------------------------------------------

def records_to_targets(records: Sequence[dict[str, Any]], sizes: Sequence[tuple[int, int]] | None = None,
                       scales: Sequence[tuple[float, float]] | None = None, min_side: float = 1.0
                       ) -> list[dict[str, torch.Tensor]]:
    """Detection targets (torchvision's format) from dataset records' region boxes.

    ``sizes`` are the decoded images' (width, height); without them each record's own width/height is used.
    Boxes are clipped to the image; what is left thinner than ``min_side`` pixels, or not finite, is skipped
    (torchvision rejects such boxes, and prepare records them as errors anyway). ``scales`` (x, y) multiply the
    boxes afterwards, for images resized before training. Each target: ``boxes`` (N, 4) float32 ``[x1, y1, x2, y2]``,
    ``labels`` (N,) int64, all :data:`REGION_LABEL`.
    """
    targets = []
    for i, record in enumerate(records):
        if sizes is not None:
            width, height = sizes[i]
        else:
            width, height = record.get("width"), record.get("height")
            if width is None or height is None:
                raise ValueError(f"record {record.get('image_id')!r}: no image size; pass sizes=")
        boxes = np.array([r["box"] for r in record["regions"] if "error" not in r], dtype=np.float64).reshape(-1, 4)
        finite = np.isfinite(boxes).all(axis=1)
        boxes = np.clip(boxes[finite], 0, [width, height, width, height])  # (N, 4)
        keep = (boxes[:, 2] - boxes[:, 0] >= min_side) & (boxes[:, 3] - boxes[:, 1] >= min_side)
        sx, sy = scales[i] if scales is not None else (1.0, 1.0)
        boxes = boxes[keep] * [sx, sy, sx, sy]
        targets.append({"boxes": torch.as_tensor(boxes, dtype=torch.float32),
                        "labels": torch.full((len(boxes),), REGION_LABEL, dtype=torch.int64)})
    return targets


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB floats in [0, 1], as torchvision's detectors take them.  # (3, H, W)"""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_for(image: Image.Image, cfg: ProposalConfig) -> tuple[Image.Image, tuple[float, float]]:
    """The image at the scale the detector will see it (shorter side ``min_size``, longer at most ``max_size``),
    and the (x, y) factors from the original's pixels to its.

    Resizing once here, not in every step, makes the detector's own resize a no-op and keeps decoded images small.
    """
    width, height = image.size
    scale = min(cfg.min_size / min(width, height), cfg.max_size / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR), (size[0] / width, size[1] / height)


# --- training -----------------------------------------------------------------------------------------------------

def train_step(model: nn.Module, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]]
               ) -> dict[str, torch.Tensor]:
    """torchvision's training losses for one batch, plus their sum under ``"loss"``.

    Only the forward pass: the caller backpropagates and steps, so DDP, DeepSpeed or a plain optimiser can own
    the update. ``images``: (3, H, W) floats in [0, 1], any sizes; ``targets``: from :func:`records_to_targets`.
    """
    model.train()
    losses = model(list(images), list(targets))
    losses["loss"] = sum(losses.values())
    return losses


def lr_factor(step: int, steps: int, train: ProposalTrainConfig) -> float:
    """Multiplier of ``train.lr`` at ``step`` of ``steps``: linear warmup from 1%, then cosine decay."""
    if step < train.warmup_steps:
        return 0.01 + 0.99 * step / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, steps - train.warmup_steps)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, train: ProposalTrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weights only: decaying norm scales and biases slows from-scratch training."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr)
    raise ValueError(f"train.optimizer: expected 'sgd' or 'adamw', got {train.optimizer!r}")


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: Sequence[torch.Tensor],
                   targets: Sequence[dict[str, torch.Tensor]], step: int, steps: int, train: ProposalTrainConfig
                   ) -> dict[str, float]:
    """One update at ``step`` of ``steps``: the schedule's lr, :func:`train_step`, backward, clipping, step.

    ``model`` may be wrapped (DDP): gradients are averaged by the wrapper during backward. Returns the losses.
    """
    for group in optimizer.param_groups:
        group["lr"] = train.lr * lr_factor(step, steps, train)
    out = train_step(model, images, targets)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], train.grad_clip)
    optimizer.step()
    return {k: float(v.detach()) for k, v in out.items()}


def load_example(record: dict[str, Any], cfg: ProposalConfig, storage_options: StorageOptions | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One record's image, resized for the detector, and its target in the resized pixels."""
    image = decode_image(storage.read_bytes(record["file"], storage_options), name=record["file"])
    resized, scales = resize_for(image, cfg)
    target = records_to_targets([record], sizes=[image.size], scales=[scales])[0]
    return image_to_tensor(resized), target


def load_training_example(record: dict[str, Any], cfg: ProposalConfig, storage_options: StorageOptions | None = None
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`load_example` with the image as uint8 (3, H, W): a quarter of the memory, and exact (the floats
    are bytes / 255). What training keeps or streams; :func:`augment` turns it back into floats."""
    image, target = load_example(record, cfg, storage_options)
    return (image * 255).round().to(torch.uint8), target


def augment(image: torch.Tensor, target: dict[str, torch.Tensor], rng: np.random.Generator,
            train: ProposalTrainConfig, device: str | torch.device = "cpu"
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A stored example as the detector trains on it: floats in [0, 1] on ``device``, flipped horizontally with
    probability ``train.hflip`` (one draw of ``rng``).  # (3, H, W) uint8 -> (3, H, W) float"""
    image = image.to(device).float() / 255.0
    target = {k: v.to(device) for k, v in target.items()}
    if rng.random() < train.hflip:
        width = image.shape[-1]
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        image, target = image.flip(-1), {**target, "boxes": boxes}
    return image, target


@dataclass
class FitResult:
    """What :func:`fit` trained and how fast (images/s counts training steps only, not decoding)."""

    proposer: Proposer
    losses: list[float]  # total loss per step
    seconds: float
    images_per_second: float


def fit(records: Sequence[dict[str, Any]], cfg: ProposalConfig, steps: int,
        storage_options: StorageOptions | None = None, model: nn.Module | None = None,
        log: Callable[[int, dict[str, float]], None] | None = None, device: str | torch.device = "cpu"
        ) -> FitResult:
    """Train a proposer on ``records`` for ``steps`` batches in this process, reproducibly from ``cfg.train.seed``.

    Images are decoded once and kept (resized, as uint8), so this is for corpora that fit in memory: tests,
    the demo, quick experiments. Records that carry an ``error`` (from a reader's ``record_errors``) are skipped.
    ``model`` continues training an existing detector instead of building one; ``log(step, losses)`` sees
    every step.
    """
    train = cfg.train
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    if model is None:
        model = build_proposer(cfg, storage_options)
    model.to(device)
    examples = [load_training_example(r, cfg, storage_options) for r in records if "error" not in r]
    if not examples:
        raise ValueError("fit: no records to train on")
    optimizer = build_optimizer(model, train)
    order: list[int] = []
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        batch = []
        for _ in range(train.batch_size):
            if not order:
                order = rng.permutation(len(examples)).tolist()
            batch.append(augment(*examples[order.pop()], rng, train, device))
        out = optimizer_step(model, optimizer, [b[0] for b in batch], [b[1] for b in batch], step, steps, train)
        losses.append(out["loss"])
        if log is not None:
            log(step, out)
    seconds = time.perf_counter() - start
    return FitResult(Proposer(model, cfg, device), losses, seconds, steps * train.batch_size / seconds)


# --- inference ----------------------------------------------------------------------------------------------------

class Proposer:
    """A trained detector behind one call: PIL image in, scored boxes in its pixels out."""

    def __init__(self, model: nn.Module, cfg: ProposalConfig, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def propose_batch(self, images: Sequence[Image.Image]) -> list[list[tuple[list[float], float]]]:
        """:meth:`propose` for several images in one forward pass."""
        tensors, scales = [], []
        for image in images:
            resized, (sx, sy) = resize_for(image, self.cfg)
            tensors.append(image_to_tensor(resized).to(self.device))
            scales.append(torch.tensor([sx, sy, sx, sy]))
        outputs = self.model(tensors)  # boxes in the resized images' pixels
        results = []
        for image, scale, out in zip(images, scales, outputs):
            boxes, scores = out["boxes"].float().cpu(), out["scores"].float().cpu()  # (N, 4), (N,)
            keep = (scores >= self.cfg.score_threshold) & (out["labels"].cpu() == REGION_LABEL)
            boxes, scores = boxes[keep], scores[keep]
            keep = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.int64), self.cfg.nms_iou)
            keep = keep[: self.cfg.max_detections]  # batched_nms returns indices by decreasing score
            width, height = image.size
            limits = torch.tensor([width, height, width, height], dtype=torch.float32)
            boxes = torch.minimum((boxes[keep] / scale).clamp(min=0), limits)
            results.append([(b.tolist(), float(s)) for b, s in zip(boxes, scores[keep])])
        return results

    def propose(self, image: Image.Image) -> list[tuple[list[float], float]]:
        """``[([x1, y1, x2, y2], score), ...]`` in the image's pixels, best first, after NMS, at most
        ``cfg.max_detections``."""
        return self.propose_batch([image])[0]

    def save(self, uri: str, storage_options: StorageOptions | None = None) -> None:
        """``config.json`` + ``model.safetensors`` under a directory or s3:// prefix; self-contained."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        storage.write_bytes(storage.join(uri, WEIGHTS_FILE), save_safetensors(state, metadata={"format": "pt"}),
                            storage_options)
        config = dataclasses.replace(self.cfg, weights=None).to_dict()
        storage.write_bytes(storage.join(uri, CONFIG_FILE), json.dumps(config, indent=2).encode(), storage_options)


def load_proposer(uri: str, storage_options: StorageOptions | None = None,
                  device: str | torch.device = "cpu") -> Proposer:
    """A :class:`Proposer` from :meth:`Proposer.save`'s export; every saved tensor must be used."""
    cfg = ProposalConfig.from_dict(storage.read_json(storage.join(uri, CONFIG_FILE), storage_options))
    model = _architecture(cfg)
    weights = storage.join(uri, WEIGHTS_FILE)
    _load_state(model, load_safetensors(storage.read_bytes(weights, storage_options)), weights)
    return Proposer(model, cfg, device)


# --- evaluation ---------------------------------------------------------------------------------------------------

def recall(proposals: Sequence[Sequence[Sequence[float]]], ground_truth: Sequence[Sequence[Sequence[float]]],
           iou: float = 0.5) -> float:
    """Fraction of ground-truth boxes, over all images, that some proposal overlaps with IoU >= ``iou``."""
    found = total = 0
    for props, gts in zip(proposals, ground_truth, strict=True):
        gt = torch.as_tensor(np.asarray(gts, dtype=np.float32).reshape(-1, 4))
        total += len(gt)
        if len(gt) and len(props):
            pr = torch.as_tensor(np.asarray(props, dtype=np.float32).reshape(-1, 4))
            found += int((box_iou(gt, pr).max(dim=1).values >= iou).sum())
    return found / total if total else 0.0
