"""``dynrefer convert-official``: the authors' released checkpoint and the weights it builds on -> one ordinary
export (``config.json`` + ``model.safetensors``) that ``dynrefer caption``, Serve and ``dynrefer evaluate`` load
as they load ours.

The export holds the checkpoint's trainable tensors in our names and BLIP-2's frozen ``query_tokens`` and
``ln_vision``; the encoder and the LM stay files of their own, referenced by path in ``config.json``. The encoder
is the EVA ViT-g/14 with the EVA-CLIP text tower as one open_clip ``EVA01-g-14`` state dict: an open_clip
checkpoint that needs nothing added is referenced as it is, anything else (LAVIS ``eva_vit_g.pth``, an EVA-CLIP
file, a separate text tower) is converted once into ``encoder.safetensors`` beside the export (``--encoder-out``).
Nothing here needs the weights in memory as a model: the checks run against the model built on the meta device.

Without ``--checkpoint`` the export is the official starting point of training instead: BLIP-2's Q-former,
``t5_proj``, ``query_tokens`` and ``ln_vision`` (from LAVIS's ``.pth`` or a Hugging Face directory), DynRefer's
own modules at their initialisation; ``dynrefer train`` starts from it with ``init_from``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any

import torch

from dynrefer import official, storage
from dynrefer.config import DynReferConfig, load_config
from pipelines.args import absolute, add_storage_args, setup_logging, storage_options_from_args

log = logging.getLogger("dynrefer.convert_official")


def meta_model(cfg: DynReferConfig):
    """The model of ``cfg`` on the meta device, its weight paths ignored (only names and shapes are needed)."""
    from dynrefer.model import DynRefer

    bare = DynReferConfig.from_dict(cfg.to_dict())
    bare.encoder.checkpoint, bare.qformer.path, bare.language.path = None, None, None
    if not bare.language.arch:
        raise ValueError("model config: language.arch (the LM's shape) is needed to check the checkpoint's shapes")
    with torch.device("meta"):
        return DynRefer(bare)


def export_shapes(model: torch.nn.Module) -> official.Shapes:
    """The tensors an export of ``model`` holds when its encoder and LM have paths (as
    :func:`dynrefer.checkpoint.saved_state` selects them): everything but ``encoder.clip.*`` and ``language.lm.*``."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.startswith(("embedding.encoder.", "encoder.clip.", "language.lm."))}


def initial_state(cfg: DynReferConfig, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable modules (and ``ln_vision``) at their initialisation, in our names: DynRefer's own modules start
    as the official code starts them (the alignment's offsets zero, so every non-base view is zero), the rest is
    overwritten by BLIP-2's."""
    from torch import nn

    from dynrefer.alignment import ViewAlignment
    from dynrefer.decoders import ContrastiveHead, TagHead
    from dynrefer.embedding import ViewFusion
    from dynrefer.model import promote_scalar_parameters
    from dynrefer.qformer import QFormer

    width, text_dim, region_dim = model.encoder.width, model.encoder.text_dim, cfg.qformer.hidden_size
    qformer = DynReferConfig.from_dict(cfg.to_dict()).qformer
    qformer.path = None
    parts = {"embedding.alignment": ViewAlignment(width, cfg.alignment),
             "embedding.fusion": ViewFusion(width, cfg.views.num_views), "embedding.qformer": QFormer(qformer, width),
             "tags": TagHead(cfg.tags, text_dim, region_dim), "contrastive": ContrastiveHead(cfg.contrastive, text_dim,
                                                                                            region_dim),
             "language.proj": nn.Linear(region_dim, model.language.proj.out_features),
             "encoder.ln_vision": nn.LayerNorm(width)}
    out = {"language.control": torch.zeros(model.language.proj.out_features)}
    for prefix, module in parts.items():
        promote_scalar_parameters(module)
        out.update({f"{prefix}.{k}": v.detach() for k, v in module.state_dict().items()})
    return out


def lm_width(uri: str, storage_options: storage.StorageOptions | None) -> int:
    """The embedding width of a Hugging Face LM directory, from its ``config.json``."""
    config = storage.read_json(storage.join(uri, "config.json"), storage_options)
    for key in ("d_model", "hidden_size", "n_embd"):
        if isinstance(config.get(key), int):
            return config[key]
    raise ValueError(f"{storage.join(uri, 'config.json')}: no 'd_model' or 'hidden_size'")


def first_unused_block(cfg: DynReferConfig, expected: official.Shapes) -> int:
    """The first vision block the encoder never runs (``encoder.layer`` counts from the end when negative)."""
    blocks = {int(m.group(1)) for k in expected for m in [re.match(r"visual\.trunk\.blocks\.(\d+)\.", k)] if m}
    depth = max(blocks) + 1 if blocks else 0
    return depth + cfg.encoder.layer + 1 if cfg.encoder.layer < 0 else cfg.encoder.layer + 1


def encoder_checkpoint(cfg: DynReferConfig, model: torch.nn.Module, encoder: str, text_tower: str | None,
                       out: str, storage_options: storage.StorageOptions | None) -> tuple[str, dict[str, Any]]:
    """The open_clip checkpoint the export's ``encoder.checkpoint`` names: ``encoder`` itself when it already is a
    complete open_clip one (and no text tower replaces its own), else a converted ``out`` file."""
    expected = {k[len("encoder.clip."):]: tuple(v.shape) for k, v in model.state_dict().items()
                if k.startswith("encoder.clip.")}
    source = official.read_weights(encoder, storage_options)
    _, layout = official.eva_vision_state(source, encoder)
    text = None
    if text_tower:
        text = official.read_weights(text_tower, storage_options)
    state, filled = official.open_clip_state(source, text, expected, first_unused_block(cfg, expected),
                                             f"{encoder}{' + ' + text_tower if text_tower else ''}")
    info = {"encoder_layout": layout, "text_tower": text_tower or encoder, "placeholders": filled}
    if layout == "open_clip" and text is None and not filled:
        return encoder, info
    if filled:
        log.warning("%s: %d tensor(s) the encoder never runs are absent; written as placeholders: %s",
                    encoder, len(filled), filled[:8])
    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in state.items()},
                metadata={"format": "pt", "source": encoder, "text_tower": text_tower or encoder,
                          "placeholders": ",".join(filled)})
    storage.write_bytes(out, data, storage_options)
    return out, info


def convert(checkpoint: str | None, encoder: str, blip2: str, lm: str, ram_tags: str, out: str,
            text_tower: str | None = None, ovad: str | None = None, categories: str | None = None,
            config: str = "official", tag_threshold: float | None = None, encoder_out: str | None = None,
            storage_options: storage.StorageOptions | None = None) -> dict[str, Any]:
    """Write the export to ``out``; returns a summary (what came from where)."""
    from safetensors.torch import save

    from dynrefer.checkpoint import CONFIG_FILE, WEIGHTS_FILE
    from dynrefer.datasets import ovad_attributes

    cfg = load_config(config)
    cfg.tags.vocabulary = official.read_tag_list(ram_tags, storage_options)
    if tag_threshold is not None:
        cfg.tags.threshold = tag_threshold
    if ovad:
        attrs = ovad_attributes(ovad, storage_options)
        cfg.recognition.attributes = [a["name"] for a in attrs]
        cfg.recognition.attribute_kinds = {a["name"]: "has" for a in attrs if a.get("is_has_att") == "has"}
    if categories or ovad:
        cfg.recognition.categories = official.read_categories(categories or ovad, storage_options)
    cfg.qformer.path = None  # query_tokens and ln_vision travel in the export; the rest is the checkpoint's
    model = meta_model(cfg)

    shapes = export_shapes(model)
    if checkpoint:
        state = official.load_official_checkpoint(checkpoint, official.official_shapes(model), storage_options)
        frozen = official.blip2_frozen(blip2, storage_options)
    else:  # the official starting point of training: BLIP-2's Q-former and t5_proj, DynRefer's modules initialised
        state = initial_state(cfg, model)
        frozen = official.blip2_init(blip2, storage_options)
        from_blip2 = ("embedding.qformer.", "language.proj.", "encoder.ln_vision.")
        official.check_state(frozen, {k: v for k, v in shapes.items() if k.startswith(from_blip2)}, blip2)
    width = lm_width(lm, storage_options)
    if width != model.language.proj.out_features:
        raise ValueError(f"{lm}: the LM's width is {width}, but t5_proj in {checkpoint or blip2} projects to "
                         f"{model.language.proj.out_features}")
    # the tag queries are recomputed from the text tower whenever the export loads (refresh_text_embeddings)
    tables = {"tags.tag_embeddings": torch.zeros(shapes["tags.tag_embeddings"])}
    export = {**state, **frozen, **tables}
    official.check_state(export, shapes, f"{checkpoint} + {blip2}" if checkpoint else blip2)

    encoder_out = encoder_out or storage.join(out, "encoder.safetensors")
    cfg.encoder.checkpoint, info = encoder_checkpoint(cfg, model, absolute(encoder), absolute(text_tower),
                                                      absolute(encoder_out), storage_options)
    cfg.language.path = absolute(lm)
    weights = save({k: v.detach().contiguous() for k, v in export.items()},
                   metadata={"format": "pt", "source": checkpoint or blip2})
    storage.write_bytes(storage.join(out, WEIGHTS_FILE), weights, storage_options)
    storage.write_bytes(storage.join(out, CONFIG_FILE), json.dumps(cfg.to_dict(), indent=2).encode(),
                        storage_options)
    return {"export": out, "checkpoint": checkpoint, "tensors": len(export), "encoder": cfg.encoder.checkpoint,
            **info, "lm": cfg.language.path, "tags": len(cfg.tags.vocabulary), "tag_threshold": cfg.tags.threshold,
            "attributes": len(cfg.recognition.attributes), "categories": len(cfg.recognition.categories)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer convert-official", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="the released DynRefer checkpoint: vg1.2_5e.pth or refcocog_ft.pth (LAVIS "
                                        "format); without it, the official starting point of training (BLIP-2's "
                                        "Q-former and t5_proj, DynRefer's own modules initialised), for "
                                        "`dynrefer train` with init_from")
    p.add_argument("--encoder", required=True, help="EVA ViT-g/14: LAVIS eva_vit_g.pth, an EVA-CLIP checkpoint "
                                                    "(eva_clip_psz14.pt), an open_clip EVA01-g-14 checkpoint, or "
                                                    "the BLIP-2 Hugging Face directory (its vision_model)")
    p.add_argument("--text-tower", help="the EVA-CLIP text tower: eva_clip_psz14.pt (its text.*); default: the "
                                        "encoder file's own text.*")
    p.add_argument("--blip2", required=True, help="BLIP-2 FlanT5-XL: LAVIS blip2_pretrained_flant5xl.pth or a "
                                                  "Hugging Face Blip2ForConditionalGeneration directory "
                                                  "(query_tokens, ln_vision)")
    p.add_argument("--lm", required=True, help="Flan-T5-XL Hugging Face directory (safetensors)")
    p.add_argument("--ram-tags", required=True, help="the RAM tag list, ram_tag_list.txt (one tag a line)")
    p.add_argument("--ovad", help="OVAD annotations JSON (ovad2000.json): attributes and classes for recognition")
    p.add_argument("--categories", help="class names: a JSON list (the official coco.json) or a COCO JSON "
                                        "(default: the OVAD file's categories)")
    p.add_argument("--config", default="official", help="model config: a name under configs/model/ or a YAML path")
    p.add_argument("--tag-threshold", type=float, help="tag probability threshold (default: the config's 0.7; "
                                                       "the official evaluations use 0.76 on RefCOCOg, 0.8 on VG)")
    p.add_argument("--encoder-out", help="where a converted encoder goes (default: OUT/encoder.safetensors)")
    p.add_argument("--out", required=True, help="export directory or s3:// prefix")
    p.add_argument("-v", "--verbose", action="store_true")
    add_storage_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    try:
        summary = convert(args.checkpoint, args.encoder, args.blip2, args.lm, args.ram_tags, absolute(args.out),
                          text_tower=args.text_tower, ovad=args.ovad, categories=args.categories,
                          config=args.config, tag_threshold=args.tag_threshold, encoder_out=args.encoder_out,
                          storage_options=storage_options_from_args(args))
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
