"""The authors' released DynRefer checkpoints (LAVIS format) and the frozen weights they build on, in our layout.

A LAVIS checkpoint is a torch pickle ``{"model", "optimizer", "config", "scaler", "epoch"}`` whose ``"model"``
holds the trainable parameters and persistent buffers. It is read with ``torch.load(weights_only=True)`` only: a
file that needs arbitrary unpickling is refused. Every official key maps to one of ours by the rules in ``RULES``
(official template <-> our template); a key no rule knows is an error that names it, and the loader checks the
whole checkpoint against the keys and shapes our model expects, reporting every problem at once.

Layouts that need no permutation: the alignment (``cvem_align.*``) keeps DCNv4's own per-pixel offset/mask channel
layout in its ``offset_mask`` parameters, and :func:`dynrefer.alignment.dcnv4_sample` reads that layout, so its
weights map 1:1. The Q-former is renamed as transformers' ``Blip2QFormerModel``
names it (``.self.`` -> ``.attention.``, ``embeddings.LayerNorm`` -> ``layernorm``). The 0-dim ``attr_t``/``attr_b``
become shape (1,) (see :func:`dynrefer.model.promote_scalar_parameters`).

The frozen parts: the EVA ViT-g/14 (LAVIS ``eva_vit_g.pth``, the ``visual.*`` of an EVA-CLIP checkpoint, or an
open_clip ``EVA01-g-14`` checkpoint) and the EVA-CLIP text tower (``text.*`` of ``eva_clip_psz14.pt``) become one
open_clip state dict (:func:`open_clip_state`); ``query_tokens`` and ``ln_vision`` come from BLIP-2
(:func:`blip2_frozen`).
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from typing import Any, Callable, Mapping

import torch

from dynrefer import storage

#: Values each placeholder of a rule template may take.
_SLOTS = {
    "n": r"\d+", "wb": "weight|bias", "att": "attention|crossattention", "qkv": "query|key|value",
    "sub": "dense|LayerNorm", "mlp": "0|2", "align": "value_proj|offset_mask_dw|offset_mask|output_proj",
}


def _rules() -> list[tuple[str, str]]:
    """(official template, our template) pairs; ``{slot}`` parts are copied across."""
    qf, ours_qf = "Qformer.bert.encoder.layer.{n}", "embedding.qformer.qformer.encoder.layer.{n}"
    rules = [
        ("Qformer.bert.embeddings.LayerNorm.{wb}", "embedding.qformer.qformer.layernorm.{wb}"),
        (qf + ".{att}.self.{qkv}.{wb}", ours_qf + ".{att}.attention.{qkv}.{wb}"),
        (qf + ".{att}.output.{sub}.{wb}", ours_qf + ".{att}.output.{sub}.{wb}"),
        (qf + ".intermediate_query.dense.{wb}", ours_qf + ".intermediate_query.dense.{wb}"),
        (qf + ".output_query.{sub}.{wb}", ours_qf + ".output_query.{sub}.{wb}"),
        ("t5_proj.{wb}", "language.proj.{wb}"),
        ("cem_memory", "language.control"),
        ("cvem_mlp.{mlp}.{wb}", "embedding.fusion.mlp.{mlp}.{wb}"),
        ("cvem_align.{align}.{wb}", "embedding.alignment.{align}.{wb}"),
        ("attr_t", "contrastive.logit_scale"),
        ("attr_b", "contrastive.logit_bias"),
        # frozen, from BLIP-2: absent from DynRefer's checkpoints, present in BLIP-2's
        ("query_tokens", "embedding.qformer.query_tokens"),
        ("ln_vision.{wb}", "encoder.ln_vision.{wb}"),
    ]
    for off, ours in (("tag", "tags"), ("attr", "contrastive")):
        layer, ours_layer = off + "_head.encoder.layer.{n}", ours + ".decoder.encoder.layer.{n}"
        rules += [
            (layer + ".crossattention.self.{qkv}.{wb}", ours_layer + ".crossattention.self.{qkv}.{wb}"),
            (layer + ".crossattention.output.{sub}.{wb}", ours_layer + ".crossattention.output.{sub}.{wb}"),
            (layer + ".intermediate.dense.{wb}", ours_layer + ".intermediate.dense.{wb}"),
            (layer + ".output.{sub}.{wb}", ours_layer + ".output.{sub}.{wb}"),
            (off + "_vision_proj.{wb}", ours + ".decoder.region_proj.{wb}"),
            (off + "_text_proj.{wb}", ours + ".decoder.text_proj.{wb}"),
            (off + "_fc.{wb}", ours + ".decoder.fc.{wb}"),
        ]
    return rules


RULES = _rules()
#: Official buffers that carry nothing (BERT's position ids; the Q-former has no position embeddings).
DROPPED = ("Qformer.bert.embeddings.position_ids",)
#: Official 0-dim parameters, shape (1,) in ours.
SCALARS = ("attr_t", "attr_b")
#: Frozen tensors that come from BLIP-2, not from DynRefer's checkpoint (our names).
FROM_BLIP2 = ("embedding.qformer.query_tokens", "encoder.ln_vision.weight", "encoder.ln_vision.bias")


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(f"(?P<{p[1:-1]}>{_SLOTS[p[1:-1]]})" if p.startswith("{") else re.escape(p)
                              for p in parts) + r"\Z")


_FORWARD = [(_compile(a), b) for a, b in RULES]
_BACKWARD = [(_compile(b), a) for a, b in RULES]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            return target.format(**m.groupdict())
    return None


def to_ours(key: str) -> str | None:
    """Our name for an official key; None when no rule knows it."""
    return _rename(key, _FORWARD)


def to_official(key: str) -> str | None:
    """The official name of one of our keys; None when the official checkpoint has no such tensor."""
    return _rename(key, _BACKWARD)


def convert_state_dict(state: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Official (LAVIS) keys -> ours, for any subset of the keys (one module's keys convert alone).

    Raises ValueError naming every key no rule knows, and every value that is not a tensor, with ``source``.
    """
    unknown = [k for k in state if k not in DROPPED and to_ours(k) is None]
    if unknown:
        raise ValueError(f"{source}: unknown official key(s) {unknown}; the known ones are the DynRefer/BLIP-2 "
                         f"modules in dynrefer.official.RULES")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{source}: key(s) {not_tensors} do not hold tensors")
    out = {}
    for key, value in state.items():
        if key in DROPPED:
            continue
        out[to_ours(key)] = value.reshape(1) if key in SCALARS and value.ndim == 0 else value
    return out


Shapes = dict[str, tuple[int, ...]]


def state_problems(state: Mapping[str, torch.Tensor], expected: Shapes) -> list[str]:
    """Every missing key, unexpected key and shape that differs, one line per kind (empty: it matches)."""
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(f"{k}: {tuple(state[k].shape)} (expected {expected[k]})" for k in state
                    if k in expected and tuple(state[k].shape) != tuple(expected[k]))
    return [f"{label} ({len(items)}): {items}" for label, items in
            (("missing keys", missing), ("unexpected keys", unexpected), ("shapes that differ", shapes)) if items]


def check_state(state: Mapping[str, torch.Tensor], expected: Shapes, source: str) -> None:
    """Every expected key present with its shape, and nothing else; else one ValueError naming ``source`` and
    listing every problem at once."""
    problems = state_problems(state, expected)
    if problems:
        raise ValueError(f"{source}: does not match the model; " + "; ".join(problems))


def official_shapes(model: torch.nn.Module) -> Shapes:
    """The keys and shapes of a DynRefer checkpoint's ``"model"`` for ``model`` (built on any device, meta
    included): the official name of every trainable tensor of ours (0-dim for ``attr_t``/``attr_b``)."""
    out: Shapes = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith("embedding.encoder."):
            continue
        key = to_official(name)
        if key is None:
            raise ValueError(f"model: trainable tensor {name!r} has no official name")
        out[key] = () if key in SCALARS else tuple(p.shape)
    return out


def read_torch_file(uri: str, storage_options: storage.StorageOptions | None = None) -> Any:
    """A torch pickle read with ``weights_only=True`` (plain containers of tensors only), memory-mapped when it is
    in the zip format. A file that needs arbitrary unpickling is refused; an unreadable one named."""
    path = storage.local_copy(uri, storage_options)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            raise ValueError(f"{uri}: refused: this file needs arbitrary unpickling (code objects or classes "
                             f"beyond plain containers of tensors), which is never done here. {first}") from None
        raise ValueError(f"{uri}: not a readable torch checkpoint (truncated or corrupt): {e}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{uri}: not a readable torch checkpoint (truncated or corrupt): {e}") from None


def lavis_model_state(data: Any, uri: str) -> dict[str, torch.Tensor]:
    """The ``"model"`` mapping of a LAVIS checkpoint (or a bare state dict)."""
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{uri}: expected a LAVIS checkpoint {{'model': {{name: tensor}}, ...}}, "
                         f"got {type(data).__name__}")
    return state


def load_official_checkpoint(uri: str, expected: Shapes,
                             storage_options: storage.StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """A released DynRefer checkpoint (``vg1.2_5e.pth``, ``refcocog_ft.pth``) checked against ``expected``
    (:func:`official_shapes`) and converted to our keys."""
    state = lavis_model_state(read_torch_file(uri, storage_options), uri)
    unknown = [k for k in state if k not in DROPPED and to_ours(k) is None]
    known = {k: v for k, v in state.items() if k not in DROPPED and k not in unknown}
    not_tensors = [k for k, v in known.items() if not isinstance(v, torch.Tensor)]
    problems = ([f"unknown official keys ({len(unknown)}): {unknown}"] if unknown else []) + (
        [f"keys that do not hold tensors ({len(not_tensors)}): {not_tensors}"] if not_tensors else []) + (
        state_problems({k: v for k, v in known.items() if k not in not_tensors}, expected))
    if problems:
        raise ValueError(f"{uri}: does not match the model; " + "; ".join(problems))
    return convert_state_dict(state, uri)


# ---------------------------------------------------------------------------------------------- frozen parts


def read_safetensors_dir(directory: str, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The tensors whose names ``keep`` accepts, from every ``*.safetensors`` file of a Hugging Face directory, read
    one at a time (a BLIP-2 directory also holds its LM: reading the ViT or the queries must not load it)."""
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no *.safetensors files (expected a Hugging Face model directory)")
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if keep(k)})
    return out


_HF_FROZEN = {"query_tokens": "embedding.qformer.query_tokens",
              "vision_model.post_layernorm.weight": "encoder.ln_vision.weight",
              "vision_model.post_layernorm.bias": "encoder.ln_vision.bias"}


def blip2_frozen(uri: str, storage_options: storage.StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """BLIP-2's frozen ``query_tokens`` and ``ln_vision`` (our keys), from LAVIS's ``blip2_pretrained_*.pth`` or a
    Hugging Face ``Blip2ForConditionalGeneration`` directory (``query_tokens``, ``vision_model.post_layernorm``)."""
    import os

    local = storage.local_copy(uri, storage_options)
    if os.path.isdir(local):
        hf = read_safetensors_dir(local, _HF_FROZEN.__contains__)
        missing = [k for k in _HF_FROZEN if k not in hf]
        if missing:
            raise ValueError(f"{uri}: a BLIP-2 Hugging Face directory lacks {missing}")
        return {ours: hf[k] for k, ours in _HF_FROZEN.items()}
    state = lavis_model_state(read_torch_file(uri, storage_options), uri)
    wanted = ("query_tokens", "ln_vision.weight", "ln_vision.bias")
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(f"{uri}: a BLIP-2 LAVIS checkpoint lacks {missing}")
    return convert_state_dict({k: state[k] for k in wanted}, uri)


#: BLIP-2 tensors DynRefer does not use: the Q-former's text side and the stage-1 heads (LAVIS names), the frozen
#: ViT and LM (loaded from their own files).
_BLIP2_UNUSED = re.compile(r"Qformer\.cls\.|Qformer\.bert\.embeddings\.(word|position)_embeddings\.|"
                           r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|"
                           r"(vision_proj|text_proj|itm_head)\.|temp\Z|visual_encoder\.|t5_model\.")


def blip2_init(uri: str, storage_options: storage.StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """BLIP-2's Q-former, ``t5_proj``, ``query_tokens`` and ``ln_vision`` in our keys: the official starting point
    of training. From LAVIS's ``.pth`` (tensors DynRefer does not use are skipped) or a Hugging Face directory
    (``qformer.*``, ``language_projection.*``, ``query_tokens``, ``vision_model.post_layernorm.*``)."""
    import os

    local = storage.local_copy(uri, storage_options)
    if os.path.isdir(local):
        out = blip2_frozen(uri, storage_options)
        for k, v in read_safetensors_dir(local, lambda k: k.startswith(("qformer.", "language_projection."))).items():
            out["embedding.qformer." + k if k.startswith("qformer.") else
                "language.proj." + k.removeprefix("language_projection.")] = v
        return out
    state = lavis_model_state(read_torch_file(uri, storage_options), uri)
    return convert_state_dict({k: v for k, v in state.items() if not _BLIP2_UNUSED.match(k)}, uri)


def unwrap_state_dict(data: Any, uri: str) -> dict[str, torch.Tensor]:
    """A state dict inside the usual wrappers ({"state_dict"}, {"model"}, {"module"}), "module." prefixes removed."""
    for key in ("state_dict", "model", "module"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{uri}: expected a state dict of tensors")
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


#: The EVA ViT's tensors below ``blocks.N.`` (LAVIS, EVA-CLIP and timm's Eva name them alike).
_EVA_BLOCK = re.compile(r"blocks\.\d+\.(?:norm[12]\.(?:weight|bias)|attn\.(?:q_bias|v_bias|qkv\.weight|proj\.weight|"
                        r"proj\.bias)|mlp\.fc[12]\.(?:weight|bias))\Z")
_EVA_TOP = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "head.weight", "head.bias")


_HF_VISION = [(re.compile(a + r"\Z"), b) for a, b in [
    (r"vision_model\.embeddings\.class_embedding", "cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.(qkv\.weight|qkv\.bias|q_bias|v_bias)", r"blocks.\1.attn.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
]]


def _hf_vision_key(key: str, uri: str) -> str:
    """transformers' Blip2VisionModel name -> the EVA/timm one (the same tensors, renamed by BLIP-2's conversion)."""
    for pattern, target in _HF_VISION:
        if pattern.match(key):
            return pattern.sub(target, key)
    raise ValueError(f"{uri}: unknown BLIP-2 vision key {key!r}")


def read_weights(uri: str, storage_options: storage.StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a torch file (:func:`read_torch_file`, the usual wrappers removed) or, for a Hugging Face
    BLIP-2 directory, its vision tower (``vision_model.*``) alone."""
    import os

    local = storage.local_copy(uri, storage_options)
    if os.path.isdir(local):
        return read_safetensors_dir(local, lambda k: k.startswith("vision_model."))
    return unwrap_state_dict(read_torch_file(uri, storage_options), uri)


def eva_vision_state(state: Mapping[str, torch.Tensor], uri: str) -> tuple[dict[str, torch.Tensor], str]:
    """The vision tower as open_clip's ``visual.*`` keys, and the layout it came in.

    A Hugging Face BLIP-2 directory's ``vision_model.*`` (39 blocks, as LAVIS builds it) is renamed back.
    LAVIS ``eva_vit_g.pth`` (bare ``blocks.N.*``) and EVA-CLIP (``visual.blocks.N.*``) name every tensor as timm's
    Eva does (``attn.qkv.weight`` with ``q_bias``/``v_bias``, ``norm1``, ``mlp.fc1``...), so the mapping is a prefix:
    ``visual.trunk.``. An open_clip checkpoint's ``visual.*`` is kept as it is.
    """
    if "vision_model.embeddings.class_embedding" in state:
        vision = {_hf_vision_key(k, uri): v for k, v in state.items()
                  if k.startswith("vision_model.") and not k.startswith("vision_model.post_layernorm.")}
        for key in [k for k in vision if k.endswith(".attn.qkv.bias")]:
            # newer transformers fuse (q_bias, k_bias, v_bias): a key bias adds q.b_k to every logit of a query's
            # row, which the softmax cancels, so EVA's q_bias and v_bias are all there is
            q, _, v = vision.pop(key).chunk(3)
            vision[key.replace("qkv.bias", "q_bias")], vision[key.replace("qkv.bias", "v_bias")] = q, v
        return {"visual.trunk." + k: v for k, v in vision.items()}, "hf_blip2"
    if "blocks.0.norm1.weight" in state:
        layout, prefix = "lavis", ""
    elif "visual.blocks.0.norm1.weight" in state:
        layout, prefix = "eva_clip", "visual."
    else:
        visual = {k: v for k, v in state.items() if k.startswith("visual.")}
        if not visual:
            raise ValueError(f"{uri}: no vision tower (expected LAVIS 'blocks.N.*', EVA-CLIP 'visual.blocks.N.*' or "
                             f"open_clip 'visual.*' keys)")
        return visual, "open_clip"
    vision = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if layout == "lavis":
        vision = {k: v for k, v in vision.items() if not k.startswith("text.")}
    unknown = [k for k in vision if k not in _EVA_TOP and not _EVA_BLOCK.match(k)]
    if unknown:
        raise ValueError(f"{uri}: unknown EVA ViT key(s) {[prefix + k for k in unknown]}")
    return {"visual.trunk." + k: v for k, v in vision.items()}, layout


def eva_text_state(state: Mapping[str, torch.Tensor], uri: str) -> dict[str, torch.Tensor]:
    """The text tower (``text.*``) as open_clip names it: EVA-CLIP's TextTransformer has open_clip's names, and
    its own ``text.logit_scale`` is open_clip's top-level ``logit_scale``."""
    text = {("logit_scale" if k == "text.logit_scale" else k): v for k, v in state.items()
            if k.startswith("text.") and k != "text.attn_mask"}  # the causal mask, should a file hold it
    if not text:
        raise ValueError(f"{uri}: no text tower (expected 'text.*' keys, as in eva_clip_psz14.pt; "
                         f"give it as --text-tower)")
    if "logit_scale" in state and "logit_scale" not in text:
        text["logit_scale"] = state["logit_scale"]
    return text


def placeholder(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor that is never read with ``encoder.layer: -2``: zeros (so a missing last block is an identity
    pre-norm residual block and a missing head a zero map), ones for a LayerNorm's weight, log(1/0.07) for the
    logit scale."""
    if key.endswith("logit_scale"):
        return torch.full(shape, math.log(1 / 0.07))
    if key.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.zeros(shape)


def open_clip_state(encoder: Mapping[str, torch.Tensor], text: Mapping[str, torch.Tensor] | None,
                    expected: Shapes, first_unused_block: int, uri: str
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One open_clip state dict from the vision tower in ``encoder`` (any layout of :func:`eva_vision_state`) and
    the text tower in ``text`` (default: ``encoder``'s own), checked against ``expected`` (the open_clip model's
    shapes). Tensors that are never run (blocks from ``first_unused_block`` on, the trunk's final norm and head,
    the logit scale) may be absent: they get :func:`placeholder` values, and their names are returned."""
    vision, layout = eva_vision_state(encoder, uri)
    if text is None and layout == "open_clip":  # an open_clip checkpoint: its own text tower, as it is
        text_state = {k: v for k, v in encoder.items() if not k.startswith("visual.")}
    else:
        text_state = eva_text_state(text if text is not None else encoder, uri)
        if not any(k.startswith("text.") for k in expected):  # open_clip's CLIP keeps its text tower at the top
            text_state = {k.removeprefix("text."): v for k, v in text_state.items()}
    state = {**vision, **text_state}
    for k in ("logit_scale", "logit_bias"):  # 0-dim in some files, (1,) in others: open_clip reshapes them alike
        if k in state and k in expected and state[k].numel() == math.prod(expected[k]):
            state[k] = state[k].reshape(expected[k])
    never_run = re.compile(r"visual\.trunk\.(norm|head)\.|visual\.trunk\.blocks\.(\d+)\.|logit_scale\Z|logit_bias\Z")

    def unused(key: str) -> bool:
        m = never_run.match(key)
        return bool(m) and (m.group(2) is None or int(m.group(2)) >= first_unused_block)

    filled = [k for k in expected if k not in state and unused(k)]
    for k in filled:
        state[k] = placeholder(k, expected[k])
    check_state(state, expected, uri)
    return state, filled


def read_tag_list(uri: str, storage_options: storage.StorageOptions | None = None) -> list[str]:
    """The RAM tag list (``ram_tag_list.txt``): one tag a line, as the official code reads it (stripped)."""
    text = storage.read_bytes(uri, storage_options).decode("utf-8")
    tags = [line.strip() for line in text.splitlines()]
    empty = [i + 1 for i, t in enumerate(tags) if not t]
    if empty:
        raise ValueError(f"{uri}: empty tag on line(s) {empty[:10]}")
    return tags


def read_categories(uri: str, storage_options: storage.StorageOptions | None = None) -> list[str]:
    """Class names for region recognition: a JSON list of names (the official ``coco.json``) or a COCO-format
    JSON's ``categories`` in id order."""
    data = storage.read_json(uri, storage_options)
    if isinstance(data, list) and all(isinstance(c, str) for c in data):
        return data
    if isinstance(data, dict) and isinstance(data.get("categories"), list):
        cats = data["categories"]
        if all(isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("id"), int) for c in cats):
            return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
    raise ValueError(f"{uri}: expected a JSON list of class names or a COCO JSON with 'categories' "
                     f"[{{id, name}}]")
