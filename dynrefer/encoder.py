"""The frozen CLIP: any open_clip model, giving each view's patch-feature map and CLS token, and text embeddings.

Weights come from a local or s3:// open_clip checkpoint; with none, the model keeps its random initialisation
(the built-in default pre-trains its own tiny CLIP, see ``dynrefer pretrain``).
"""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from dynrefer import storage
from dynrefer.config import EncoderConfig


@dataclass
class ViewFeatures:
    grid: torch.Tensor  # (N, C, g, g) patch features
    cls: torch.Tensor  # (N, C) class token
    patch_size: int


def model_config(cfg: EncoderConfig, storage_options: storage.StorageOptions | None = None) -> dict | None:
    """The open_clip model config: inline (``model_cfg``), from a JSON file named by ``name``, or None (built-in)."""
    if cfg.model_cfg is not None:
        return cfg.model_cfg
    if cfg.name.endswith(".json"):
        return storage.read_json(cfg.name, storage_options)
    return None


def build_clip(cfg: EncoderConfig, custom: dict | None, storage_options: storage.StorageOptions | None = None
               ) -> nn.Module:
    """Build the open_clip model of ``cfg`` and load its checkpoint, if any, without unpickling untrusted data."""
    if custom is not None:
        model = open_clip.CLIP(**custom)
    else:
        model = open_clip.create_model(cfg.name, pretrained=None, device=torch.get_default_device())
    if cfg.checkpoint:
        open_clip.load_checkpoint(model, storage.local_copy(cfg.checkpoint, storage_options), weights_only=True)
    return model


def clip_tokenizer(cfg: EncoderConfig, custom: dict | None):
    """open_clip's tokenizer for this model (its BPE vocabulary ships inside the package)."""
    if custom is not None:
        return open_clip.SimpleTokenizer(context_length=custom["text_cfg"].get("context_length", 77))
    return open_clip.get_tokenizer(cfg.name)


def vision_geometry(visual: nn.Module) -> tuple[int, int]:
    """(patch size, token width) of an open_clip vision tower, native or timm-backed (EVA)."""
    if hasattr(visual, "trunk"):
        patch, width = visual.trunk.patch_embed.patch_size, visual.trunk.embed_dim
    else:
        patch, width = visual.patch_size, visual.transformer.width
    return (patch[0] if isinstance(patch, (tuple, list)) else int(patch)), int(width)


def is_conv_tower(visual: nn.Module) -> bool:
    """Whether the vision tower is a conv trunk (open_clip's ModifiedResNet) rather than a ViT: it has stages, not
    patch tokens and a class token."""
    return isinstance(visual, ModifiedResNet)


def conv_stages(visual: nn.Module, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a ModifiedResNet whole: the output of stage ``layer`` (stem, layer1..layer4; negative from the end) and
    the attention-pooled embedding. (open_clip's ``forward_intermediates`` stops at the stage it returns.)

    x: (N, 3, S, S) -> (N, C, g, g), (N, D)"""
    stages = [visual.stem, visual.layer1, visual.layer2, visual.layer3, visual.layer4]
    if not -len(stages) <= layer < len(stages):
        raise ValueError(f"encoder.layer {layer}: a conv tower has stages 0..{len(stages) - 1} (stem, layer1..4)")
    index, grid = layer % len(stages), x
    for i, stage in enumerate(stages):
        x = stage(x)
        if i == index:
            grid = x
    return grid, visual.attnpool(x)


def conv_geometry(visual: nn.Module, layer: int) -> tuple[int, int]:
    """(stride, channels) of stage ``layer`` of a conv tower (index into stem, layer1..layer4, as open_clip's
    ``forward_intermediates`` counts them), measured on one blank image of the tower's input size. The stride plays
    the patch size's part: RoI-Align's spatial scale is 1 / stride."""
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    param, training = next(visual.parameters()), visual.training
    visual.eval()  # batch norm in training mode would fold the blank image into its running statistics
    with torch.no_grad():
        grid, _ = conv_stages(visual, torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device), layer)
    visual.train(training)
    if size % grid.shape[-1]:
        raise ValueError(f"stage {layer} of the conv tower gives a {grid.shape[-1]} px grid for {size} px input: "
                         f"not a whole stride")
    return size // grid.shape[-1], int(grid.shape[1])


def pixel_statistics(visual: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's normalisation mean and std (OpenAI CLIP's unless the model names its own).  # (1, 3, 1, 1)"""
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def clip_pixels(views: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 views (N, S, S, 3) as the normalised float input of a CLIP vision tower.  # (N, 3, S, S)"""
    x = views.permute(0, 3, 1, 2).to(mean.dtype).div(255.0)
    return (x - mean) / std


class ImageEncoder(nn.Module):
    """CLIP image and text towers, normalising uint8 views itself so that callers pass raw pixels."""

    def __init__(self, cfg: EncoderConfig, storage_options: storage.StorageOptions | None = None):
        super().__init__()
        self.cfg = cfg
        custom = model_config(cfg, storage_options)
        self.clip = build_clip(cfg, custom, storage_options)
        self.tokenizer = clip_tokenizer(cfg, custom)
        visual = self.clip.visual
        mean, std = pixel_statistics(visual)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.conv = is_conv_tower(visual)
        self.patch_size, self.width = conv_geometry(visual, cfg.layer) if self.conv else vision_geometry(visual)
        self.text_dim = int((custom or open_clip.get_model_config(cfg.name))["embed_dim"])
        self.ln_vision = nn.LayerNorm(self.width, eps=cfg.ln_vision_eps)
        self.ln_vision.requires_grad_(False)  # frozen in the official model (BLIP-2's, or the identity affine)
        if cfg.freeze:
            self.clip.requires_grad_(False)
            self.clip.eval()

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        if self.cfg.freeze:
            self.clip.eval()
        return self

    def forward(self, views: torch.Tensor) -> ViewFeatures:
        """views: (N, S, S, 3) uint8 -> patch grid (N, C, g, g) and CLS (N, C), after ``ln_vision``.

        As BLIP-2 and the official DynRefer: the blocks after ``cfg.layer`` are never run, the tower's own final
        norm is not applied, and a separate LayerNorm (``ln_vision``, frozen, loadable from BLIP-2) normalises
        every token.
        """
        x = clip_pixels(views, self.mean, self.std)  # (N, 3, S, S)
        if self.conv:
            return self.conv_features(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze):
            out = self.clip.visual.forward_intermediates(
                x, indices=[self.cfg.layer], stop_early=True, intermediates_only=True,
                normalize_intermediates=False, output_extra_tokens=True,
            )
        grid = out["image_intermediates"][0]  # (N, C, g, g)
        cls = out["image_intermediates_prefix"][0][:, 0]  # (N, C)
        grid = self.ln_vision(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return ViewFeatures(grid=grid, cls=self.ln_vision(cls), patch_size=self.patch_size)

    def conv_features(self, x: torch.Tensor) -> ViewFeatures:
        """A conv tower's view features: its stage ``cfg.layer`` as the grid, its pooled image embedding as the CLS
        (the mean of the grid where the embedding is narrower or wider than the grid), both after ``ln_vision``.

        x: normalised pixels (N, 3, S, S). The whole tower runs: the pooled embedding is what pre-training aligned
        with text, while the last stage of a ResNet is too coarse (stride 32) for RoI-Align on small views.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze):
            grid, pooled = conv_stages(self.clip.visual, x, self.cfg.layer)  # (N, C, g, g), (N, D)
        cls = pooled if pooled.shape[1] == grid.shape[1] else grid.mean(dim=(2, 3))  # (N, C)
        grid = self.ln_vision(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return ViewFeatures(grid=grid, cls=self.ln_vision(cls), patch_size=self.patch_size)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP text embeddings (frozen), the projected EOT token not L2-normalised, as the official code feeds the
        tag and contrastive decoders.  # (K, D_text)"""
        tokens = self.tokenizer(texts).to(self.mean.device)
        return self.clip.encode_text(tokens, normalize=False)
