"""Save and load a DynRefer model as ``config.json`` + ``model.safetensors`` (never a pickle).

Saved: every trainable tensor, the small frozen ones (``ln_vision``, the Q-former's queries), plus the frozen
components that have no weights path of their own (a randomly initialised or self-trained encoder/LM). Components with a path (open_clip checkpoint, Hugging Face directory)
are reloaded from it, so an export stays small.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dynrefer import storage
from dynrefer.config import DynReferConfig
from dynrefer.model import DynRefer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def saved_state(model: DynRefer) -> dict[str, torch.Tensor]:
    """The tensors an export must hold, each storage once (tied embeddings are saved under one name)."""
    cfg = model.cfg
    frozen_prefixes = []
    if not cfg.encoder.checkpoint:
        frozen_prefixes.append("encoder.clip.")
    if not cfg.language.path:
        frozen_prefixes.append("language.lm.")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith("embedding.encoder."):
            continue  # the same module as "encoder."
        if name in trainable or name.startswith(tuple(frozen_prefixes)) or not name.startswith(("encoder.clip.", "language.lm.")):
            key = tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)
            if key in seen:
                continue
            seen.add(key)
            out[name] = tensor.detach().contiguous().cpu()
    return out


def save_pretrained(model: DynRefer, uri: str, storage_options: storage.StorageOptions | None = None) -> None:
    """Write the export to a local directory or s3:// prefix."""
    data = save_safetensors(saved_state(model), metadata={"format": "pt"})
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), data, storage_options)
    storage.write_bytes(storage.join(uri, CONFIG_FILE), json.dumps(model.cfg.to_dict(), indent=2).encode(),
                        storage_options)


def load_pretrained(uri: str, storage_options: storage.StorageOptions | None = None,
                    device: str | torch.device = "cpu") -> DynRefer:
    """Rebuild the model from its config and load the exported tensors; every saved tensor must be used."""
    cfg = DynReferConfig.from_dict(storage.read_json(storage.join(uri, CONFIG_FILE), storage_options))
    model = DynRefer(cfg, storage_options)
    state = load_safetensors(storage.read_bytes(storage.join(uri, WEIGHTS_FILE), storage_options))
    expected = saved_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{uri}: weights do not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.load_state_dict(state, strict=False)
    model.refresh_text_embeddings()
    return model.to(device).eval()
