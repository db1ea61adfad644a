"""Class-agnostic region proposals: where to caption when no boxes are given.

DynRefer's paper captions the boxes of another detector (GRiT). We train our own: a torchvision detector with
two classes (background and "region"), from scratch, on any corpus of region records (the synthetic one by
default). Everything is plain torch: :func:`train_step` is what a Ray Train loop calls, :func:`fit` is the
single-process loop for tests and the demo, and :class:`Proposer` turns a PIL image into scored boxes.

An export is ``config.json`` + ``model.safetensors`` (never a pickle), local or ``s3://``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision
import yaml
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d, batched_nms, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from dynrefer import storage
from dynrefer.config import _build
from dynrefer.imageio import decode_image
from dynrefer.storage import StorageOptions

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: Label of every foreground box: the detector has one class besides background.
REGION_LABEL = 1


@dataclass
class ProposalTrainConfig:
    """Optimiser and sampling for :func:`fit` (the Ray Train pipeline reads the same fields)."""

    batch_size: int = 4
    optimizer: str = "sgd"  # "sgd" (momentum) or "adamw"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    warmup_steps: int = 20  # linear warmup from 1% of lr, then cosine decay to ``min_lr_ratio`` * lr
    min_lr_ratio: float = 0.05
    grad_clip: float = 10.0  # max gradient norm; 0 disables (from scratch, early steps can spike)
    hflip: float = 0.5  # probability of a horizontal flip per image
    seed: int = 0


@dataclass
class ProposalConfig:
    """A class-agnostic proposal model; every knob is read from ``configs/proposals/*.yaml``."""

    architecture: str = "fasterrcnn_mobilenet_v3_large_fpn"
    min_size: int = 320  # shorter image side the detector sees (images are resized, boxes mapped back)
    max_size: int = 512  # cap on the longer side
    score_threshold: float = 0.0
    nms_iou: float = 0.5
    max_detections: int = 100
    trainable_backbone_layers: int | None = None  # None: all; fewer only makes sense when starting from weights
    weights: str | None = None  # local or s3:// export (directory) or .safetensors file to start from
    anchor_sizes: list[list[int]] | None = None  # per pyramid level, its anchor sizes (None: the architecture's)
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the torchvision model
    train: ProposalTrainConfig = field(default_factory=ProposalTrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProposalConfig":
        return _build(cls, data, "proposals")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ProposalConfig":
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
        path = Path(__file__).resolve().parent.parent / "configs" / "proposals" / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"proposal config {name_or_path!r} not found (looked for {path})")
    return ProposalConfig.from_yaml(path)


# --- architectures ------------------------------------------------------------------------------------------------

def _anchors(cfg: ProposalConfig, default: list[list[int]], ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
             ) -> AnchorGenerator:
    """Anchor sizes per pyramid level, each with every aspect ratio; the level count is the architecture's."""
    sizes = cfg.anchor_sizes or default
    if len(sizes) != len(default):
        raise ValueError(f"anchor_sizes: {cfg.architecture} has {len(default)} pyramid levels, got {len(sizes)}")
    return AnchorGenerator(tuple(tuple(int(s) for s in level) for level in sizes), (ratios,) * len(sizes))


def _frcnn_kwargs(cfg: ProposalConfig) -> dict[str, Any]:
    return {"min_size": cfg.min_size, "max_size": cfg.max_size, "box_score_thresh": cfg.score_threshold,
            "box_nms_thresh": cfg.nms_iou, "box_detections_per_img": cfg.max_detections, **cfg.options}


def _dense_kwargs(cfg: ProposalConfig) -> dict[str, Any]:
    return {"min_size": cfg.min_size, "max_size": cfg.max_size, "score_thresh": cfg.score_threshold,
            "nms_thresh": cfg.nms_iou, "detections_per_img": cfg.max_detections, **cfg.options}


def _fasterrcnn_mobilenet(cfg: ProposalConfig, name: str) -> nn.Module:
    """Faster R-CNN on MobileNetV3 + FPN at strides 16 and 32 (plus a pooled level), as torchvision builds it."""
    backbone = mobilenet_backbone(backbone_name=name, weights=None, fpn=True, norm_layer=nn.BatchNorm2d,
                                  trainable_layers=6)
    generator = _anchors(cfg, [[16, 32, 64, 128, 256]] * 3)
    return FasterRCNN(backbone, num_classes=2, rpn_anchor_generator=generator, **_frcnn_kwargs(cfg))


def _fasterrcnn_resnet(cfg: ProposalConfig, name: str) -> nn.Module:
    """Faster R-CNN on a ResNet + FPN at strides 4-32 plus a pooled level (5 levels, one anchor size each)."""
    backbone = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5)
    generator = _anchors(cfg, [[16], [32], [64], [128], [256]])
    return FasterRCNN(backbone, num_classes=2, rpn_anchor_generator=generator, **_frcnn_kwargs(cfg))


def _fcos_resnet(cfg: ProposalConfig, name: str) -> nn.Module:
    """FCOS (anchor-free, GroupNorm head) on a ResNet + FPN at strides 8-128, as torchvision's FCOS-R50."""
    backbone = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    generator = _anchors(cfg, [[8], [16], [32], [64], [128]], ratios=(1.0,))
    return FCOS(backbone, num_classes=2, anchor_generator=generator, **_dense_kwargs(cfg))


#: Architectures composed here from torchvision parts, so anchors fit small objects and norms train from scratch.
ARCHITECTURES: dict[str, Callable[[ProposalConfig], nn.Module]] = {
    "fasterrcnn_mobilenet_v3_large_fpn": lambda cfg: _fasterrcnn_mobilenet(cfg, "mobilenet_v3_large"),
    "fasterrcnn_mobilenet_v3_small_fpn": lambda cfg: _fasterrcnn_mobilenet(cfg, "mobilenet_v3_small"),
    "fasterrcnn_resnet18_fpn": lambda cfg: _fasterrcnn_resnet(cfg, "resnet18"),
    "fasterrcnn_resnet34_fpn": lambda cfg: _fasterrcnn_resnet(cfg, "resnet34"),
    "fcos_resnet18_fpn": lambda cfg: _fcos_resnet(cfg, "resnet18"),
    "fcos_resnet34_fpn": lambda cfg: _fcos_resnet(cfg, "resnet34"),
}
#: Prefixes of torchvision's own detection builders that are also accepted by name (random init, 2 classes).
TORCHVISION_FAMILIES = ("fasterrcnn_", "fcos_", "retinanet_")


def _torchvision_builder(cfg: ProposalConfig) -> nn.Module:
    names = torchvision.models.list_models(module=torchvision.models.detection)
    if cfg.architecture not in names or not cfg.architecture.startswith(TORCHVISION_FAMILIES):
        known = sorted(ARCHITECTURES) + sorted(n for n in names if n.startswith(TORCHVISION_FAMILIES))
        raise ValueError(f"architecture: unknown {cfg.architecture!r}; known: {known}")
    if cfg.anchor_sizes is not None:
        raise ValueError(f"anchor_sizes: not supported for torchvision's own {cfg.architecture}")
    kwargs = _frcnn_kwargs(cfg) if cfg.architecture.startswith("fasterrcnn_") else _dense_kwargs(cfg)
    return torchvision.models.get_model(cfg.architecture, weights=None, weights_backbone=None, num_classes=2,
                                        **kwargs)


def _backbone_stages(model: nn.Module) -> list[list[nn.Module]]:
    """The backbone body's stages, bottom-up, with torchvision's counting (ResNet 5, MobileNetV3 6)."""
    body = model.backbone.body
    children = list(body.named_children())
    if any(name == "layer1" for name, _ in children):
        starts = [0] + [i for i, (name, _) in enumerate(children) if name.startswith("layer")]
    else:
        starts = [0] + [i for i, (_, m) in enumerate(children) if getattr(m, "_is_cn", False)] + [len(children) - 1]
    bounds = starts + [len(children)]
    return [[m for _, m in children[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def _freeze(module: nn.Module) -> None:
    """No gradients, and BatchNorm statistics fixed (FrozenBatchNorm2d keeps the same state-dict names)."""
    for p in module.parameters():
        p.requires_grad_(False)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze(child)


def _architecture(cfg: ProposalConfig) -> nn.Module:
    """The randomly initialised detector with the configured backbone stages frozen (no weights read)."""
    builder = ARCHITECTURES.get(cfg.architecture, _torchvision_builder)
    model = builder(cfg)
    if cfg.trainable_backbone_layers is not None:
        stages = _backbone_stages(model)
        if not 0 <= cfg.trainable_backbone_layers <= len(stages):
            raise ValueError(f"trainable_backbone_layers: {cfg.architecture} has {len(stages)} backbone stages, "
                             f"got {cfg.trainable_backbone_layers}")
        for stage in stages[:len(stages) - cfg.trainable_backbone_layers]:
            for module in stage:
                _freeze(module)
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
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{uri}: weights do not match the architecture (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.load_state_dict(state)


# --- targets ------------------------------------------------------------------------------------------------------

def records_to_targets(records: Sequence[dict[str, Any]], sizes: Sequence[tuple[int, int]] | None = None,
                       scales: Sequence[float] | None = None, min_side: float = 1.0) -> list[dict[str, torch.Tensor]]:
    """Detection targets (torchvision's format) from dataset records' region boxes.

    ``sizes`` are the decoded images' (width, height); without them each record's own width/height is used.
    Boxes are clipped to the image; what is left thinner than ``min_side`` pixels, or not finite, is skipped
    (torchvision rejects such boxes, and prepare records them as errors anyway). ``scales`` multiply the boxes
    afterwards, for images resized before training. Each target: ``boxes`` (N, 4) float32 ``[x1, y1, x2, y2]``,
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
        boxes = boxes[keep] * (scales[i] if scales is not None else 1.0)
        targets.append({"boxes": torch.as_tensor(boxes, dtype=torch.float32),
                        "labels": torch.full((len(boxes),), REGION_LABEL, dtype=torch.int64)})
    return targets


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB floats in [0, 1], as torchvision's detectors take them.  # (3, H, W)"""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_for(image: Image.Image, cfg: ProposalConfig) -> tuple[Image.Image, float]:
    """The image at the scale the detector will see it (shorter side ``min_size``, longer at most ``max_size``).

    Resizing once here, not in every step, makes the detector's own resize a no-op and decoding cheap to batch.
    """
    width, height = image.size
    scale = min(cfg.min_size / min(width, height), cfg.max_size / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR), scale


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


def _lr_factor(step: int, steps: int, train: ProposalTrainConfig) -> float:
    if step < train.warmup_steps:
        return 0.01 + 0.99 * step / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, steps - train.warmup_steps)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: nn.Module, train: ProposalTrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weights only: decaying norm scales and biases slows from-scratch training."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr)
    raise ValueError(f"train.optimizer: expected 'sgd' or 'adamw', got {train.optimizer!r}")


def load_example(record: dict[str, Any], cfg: ProposalConfig, storage_options: StorageOptions | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One record's image, resized for the detector, and its target in the resized pixels."""
    image = decode_image(storage.read_bytes(record["file"], storage_options), name=record["file"])
    resized, scale = resize_for(image, cfg)
    target = records_to_targets([record], sizes=[image.size], scales=[scale])[0]
    return image_to_tensor(resized), target


def _hflip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


@dataclass
class FitResult:
    proposer: "Proposer"
    losses: list[float]  # total loss per step
    seconds: float
    images_per_second: float


def fit(records: Sequence[dict[str, Any]], cfg: ProposalConfig, steps: int,
        storage_options: StorageOptions | None = None, model: nn.Module | None = None,
        log: Callable[[int, dict[str, float]], None] | None = None) -> FitResult:
    """Train a proposer on ``records`` for ``steps`` batches in this process, reproducibly from ``cfg.train.seed``.

    Images are decoded once and kept (resized, as uint8), so this is for corpora that fit in memory: tests,
    the demo, quick experiments. ``model`` continues training an existing detector instead of building one.
    """
    train = cfg.train
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    if model is None:
        model = build_proposer(cfg, storage_options)
    examples = []
    for record in records:
        image, target = load_example(record, cfg, storage_options)
        examples.append(((image * 255).round().to(torch.uint8), target))
    if not examples:
        raise ValueError("fit: no records to train on")
    optimizer = _optimizer(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    order: list[int] = []
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        batch = []
        for _ in range(train.batch_size):
            if not order:
                order = rng.permutation(len(examples)).tolist()
            image, target = examples[order.pop()]
            image = image.float() / 255.0
            if rng.random() < train.hflip:
                image, target = _hflip(image, target)
            batch.append((image, target))
        for group in optimizer.param_groups:
            group["lr"] = train.lr * _lr_factor(step, steps, train)
        out = train_step(model, [b[0] for b in batch], [b[1] for b in batch])
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        optimizer.step()
        losses.append(float(out["loss"].detach()))
        if log is not None:
            log(step, {k: float(v.detach()) for k, v in out.items()})
    seconds = time.perf_counter() - start
    return FitResult(Proposer(model.eval(), cfg), losses, seconds, steps * train.batch_size / seconds)


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
            resized, scale = resize_for(image, self.cfg)
            tensors.append(image_to_tensor(resized).to(self.device))
            scales.append(scale)
        outputs = self.model(tensors)
        results = []
        for image, scale, out in zip(images, scales, outputs):
            boxes, scores = out["boxes"].float().cpu(), out["scores"].float().cpu()  # (N, 4), (N,)
            keep = scores >= self.cfg.score_threshold
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
