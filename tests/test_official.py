"""Official-format (LAVIS) checkpoints, built here with random non-zero tensors at small widths, are converted by
``dynrefer convert-official``, loaded as an ordinary export, and every module computes what the official code
computes with those tensors (references written out below, float64)."""

from __future__ import annotations

import argparse
import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml

from dynrefer import official
from dynrefer.checkpoint import load_pretrained
from dynrefer.config import load_config
from dynrefer.language import load_lm
from dynrefer.model import DynRefer
from pipelines import convert_official

WORDS = "a the red blue green small large striped dotted circle square triangle left of right".split()
TAGS = ["red", "blue", "circle", "square", "striped"]
OVAD = {"attributes": [
    {"id": 0, "name": "color:red", "type": "color", "parent_type": "color", "is_has_att": "is"},
    {"id": 1, "name": "hair color:blond/golden", "type": "hair color", "parent_type": "color", "is_has_att": "has"},
    {"id": 2, "name": "maturity:young/baby", "type": "maturity", "parent_type": "maturity", "is_has_att": "is"}],
    "categories": [{"id": 2, "name": "Dog"}, {"id": 1, "name": "person"}], "images": [], "annotations": []}
C = 128  # encoder width: a multiple of 64, as the official DCNv4 kernel requires (C / 4 groups % 16 == 0)


def tiny_official() -> dict:
    """A small model of the official shape: every head and the Q-former with 2 layers, cross-attention in layer 0."""
    cfg = load_config("official").to_dict()
    cfg["image_size"] = 64
    cfg["encoder"] = {"name": "dynrefer-official-test", "checkpoint": None, "layer": -2, "freeze": True,
                      "model_cfg": {"embed_dim": 128, "text_cfg": {"context_length": 32, "vocab_size": 49408,
                                                                    "width": 128, "heads": 4, "layers": 2},
                                    "vision_cfg": {"image_size": 64, "layers": 3, "width": C, "patch_size": 8,
                                                   "head_width": 32}}}
    cfg["language"]["arch"] = {"model_type": "t5", "d_model": 128, "d_kv": 32, "d_ff": 256, "num_layers": 2,
                               "num_decoder_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu",
                               "dense_act_fn": "gelu", "tie_word_embeddings": False}
    cfg["qformer"].update(num_queries=4, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                          cross_attention_frequency=2)
    for head in ("tags", "contrastive"):
        cfg[head]["decoder"].update(dim=64, num_layers=2, num_heads=4, intermediate_size=128)
    cfg["language"].update(freeze=True, vocabulary=WORDS)
    return cfg


def random_tensor(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Non-zero everywhere (a zero could hide a mis-mapped tensor)."""
    x = torch.randn(shape, generator=gen) * 0.3
    return torch.where(x.abs() < 0.01, torch.full_like(x, 0.05), x)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every file a user brings, in the authors' formats, at small widths."""
    root = tmp_path_factory.mktemp("official")
    gen = torch.Generator().manual_seed(7)
    cfg_dict = tiny_official()
    (root / "model.yaml").write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(str(root / "model.yaml"))
    with torch.device("meta"):
        meta = DynRefer(cfg)
    shapes = official.official_shapes(meta)
    model_state = {k: random_tensor(s, gen) for k, s in shapes.items()}
    model_state["Qformer.bert.embeddings.position_ids"] = torch.arange(512).expand(1, -1)
    lavis = {"model": model_state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
             "config": {"model": {"arch": "dynrefer_t5", "num_views": 3}}, "scaler": None, "epoch": 4}
    torch.save(lavis, root / "vg1.2_5e.pth")
    q, h = cfg.qformer.num_queries, cfg.qformer.hidden_size
    blip2 = {"query_tokens": random_tensor((1, q, h), gen), "ln_vision.weight": random_tensor((C,), gen),
             "ln_vision.bias": random_tensor((C,), gen), "t5_proj.weight": random_tensor((128, h), gen),
             "t5_proj.bias": random_tensor((128,), gen)}
    torch.save({"model": blip2}, root / "blip2_pretrained_flant5xl.pth")
    torch.manual_seed(3)
    clip = open_clip.CLIP(**cfg.encoder.model_cfg)
    torch.save({"state_dict": clip.state_dict()}, root / "clip.pt")
    text_keys = ("token_embedding", "positional_embedding", "transformer.", "ln_final", "text_projection")
    text_tower = {"text." + k: random_tensor(tuple(v.shape), gen) for k, v in clip.state_dict().items()
                  if k.startswith(text_keys)}
    text_tower["text.logit_scale"] = torch.tensor(math.log(1 / 0.07))
    torch.save(text_tower, root / "eva_clip_psz14.pt")
    lm, tokenizer = load_lm(cfg.language)
    lm.save_pretrained(root / "flan-t5")
    tokenizer.save_pretrained(root / "flan-t5")
    (root / "ram_tag_list.txt").write_text("\n".join(TAGS) + "\n")
    (root / "ovad2000.json").write_text(json.dumps(OVAD))
    return {"root": root, "config": str(root / "model.yaml"), "checkpoint": str(root / "vg1.2_5e.pth"),
            "blip2": str(root / "blip2_pretrained_flant5xl.pth"), "encoder": str(root / "clip.pt"),
            "text_tower": str(root / "eva_clip_psz14.pt"), "lm": str(root / "flan-t5"),
            "tags": str(root / "ram_tag_list.txt"), "ovad": str(root / "ovad2000.json"),
            "state": model_state, "blip2_state": blip2, "text_state": text_tower, "clip": clip}


def argv(files, out, **extra) -> list[str]:
    args = {"--checkpoint": files["checkpoint"], "--encoder": files["encoder"], "--blip2": files["blip2"],
            "--lm": files["lm"], "--ram-tags": files["tags"], "--ovad": files["ovad"], "--config": files["config"],
            "--out": str(out), **extra}
    return [x for k, v in args.items() if v is not None for x in (k, v)]


@pytest.fixture(scope="module")
def converted(files):
    """Converted through the CLI, with the EVA-CLIP text tower replacing the encoder file's own; loaded strictly."""
    from pipelines.cli import main

    out = files["root"] / "export"
    assert main(["convert-official", *argv(files, out, **{"--text-tower": files["text_tower"],
                                                           "--tag-threshold": "0.76"})]) == 0
    model = load_pretrained(str(out)).double().eval()
    return model, {k: v.double() if v.is_floating_point() else v for k, v in files["state"].items()}, out


# ------------------------------------------------------------------------------------------ references (float64)


def linear(x: torch.Tensor, s: dict, name: str) -> torch.Tensor:
    return x @ s[name + ".weight"].T + s[name + ".bias"]


def layer_norm(x: torch.Tensor, s: dict, name: str, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * s[name + ".weight"] + s[name + ".bias"]


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, D) x (B, M, D) -> (B, L, D), softmax(q k^T / sqrt(d)) v per head."""
    b, l, d = q.shape
    split = [t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, k, v)]
    w = torch.softmax(split[0] @ split[1].transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return (w @ split[2]).transpose(1, 2).reshape(b, l, d)


def bert_attention(h: torch.Tensor, memory: torch.Tensor, s: dict, name: str, heads: int, eps: float) -> torch.Tensor:
    """LAVIS BertAttention: ``name.self.{query,key,value}``, ``name.output.{dense,LayerNorm}``, post-LN."""
    ctx = attention(linear(h, s, name + ".self.query"), linear(memory, s, name + ".self.key"),
                    linear(memory, s, name + ".self.value"), heads)
    return layer_norm(linear(ctx, s, name + ".output.dense") + h, s, name + ".output.LayerNorm", eps)


def qformer_reference(tokens: torch.Tensor, query_tokens: torch.Tensor, s: dict, layers: int, heads: int,
                      freq: int) -> torch.Tensor:
    """BLIP-2's Q-former on the fused tokens (B, T, C), only queries: -> (B, Q, H)."""
    h = layer_norm(query_tokens.expand(tokens.shape[0], -1, -1), s, "Qformer.bert.embeddings.LayerNorm", 1e-12)
    for n in range(layers):
        p = f"Qformer.bert.encoder.layer.{n}"
        h = bert_attention(h, h, s, p + ".attention", heads, 1e-12)
        if n % freq == 0:
            h = bert_attention(h, tokens, s, p + ".crossattention", heads, 1e-12)
        ffn = linear(gelu(linear(h, s, p + ".intermediate_query.dense")), s, p + ".output_query.dense")
        h = layer_norm(ffn + h, s, p + ".output_query.LayerNorm", 1e-12)
    return h


def tagging_reference(texts: torch.Tensor, regions: torch.Tensor, s: dict, head: str, layers: int,
                      heads: int) -> torch.Tensor:
    """The official tagging BERT: projected texts (K, D_text) query the projected regions (B, Q, H) -> (B, K, D)."""
    memory = linear(regions, s, head + "_vision_proj")
    h = linear(texts, s, head + "_text_proj").expand(regions.shape[0], -1, -1)
    for n in range(layers):
        p = f"{head}_head.encoder.layer.{n}"
        h = bert_attention(h, memory, s, p + ".crossattention", heads, 1e-12)
        h = layer_norm(linear(gelu(linear(h, s, p + ".intermediate.dense")), s, p + ".output.dense") + h,
                       s, p + ".output.LayerNorm", 1e-12)
    return h


def bilinear(value: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """value (N, H, W, D) at pixel coordinates x, y (N, H, W): bilinear, zero outside -> (N, H, W, D)."""
    n, h, w, d = value.shape
    x0, y0 = torch.floor(x), torch.floor(y)
    out = torch.zeros_like(value)
    batch = torch.arange(n)[:, None, None].expand_as(x)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            picked = value[batch, yy.clamp(0, h - 1).long(), xx.clamp(0, w - 1).long()]
            out += (wy * wx * inside)[..., None] * picked
    return out


def dcnv4_reference(view: torch.Tensor, ref: torch.Tensor, s: dict, groups: int = 4) -> torch.Tensor:
    """The official CustomDCNv4 (``cvem_align.*``): view, ref (N, C, H, W) -> (N, C, H, W)."""
    n, c, h, w = view.shape
    value = linear(view.permute(0, 2, 3, 1), s, "cvem_align.value_proj")  # (N, H, W, C)
    dw = F.conv2d(torch.cat([view, ref], 1), s["cvem_align.offset_mask_dw.weight"],
                  s["cvem_align.offset_mask_dw.bias"], padding=1, groups=c)
    om = linear(dw.permute(0, 2, 3, 1), s, "cvem_align.offset_mask")  # (N, H, W, 112)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=view.dtype), torch.arange(w, dtype=view.dtype), indexing="ij")
    d = c // groups
    sampled = torch.zeros_like(value)
    for g in range(groups):
        for i in range(3):
            for j in range(3):
                k = 3 * i + j
                dx, dy, m = om[..., 27 * g + 2 * k], om[..., 27 * g + 2 * k + 1], om[..., 27 * g + 18 + k]
                at = bilinear(value[..., g * d:(g + 1) * d], xs + i - 1 + dx, ys + j - 1 + dy)
                sampled[..., g * d:(g + 1) * d] += m[..., None] * at
    return linear(sampled, s, "cvem_align.output_proj").permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------ converted modules


def test_alignment_is_the_official_dcnv4(converted):
    model, s, _ = converted
    gen = torch.Generator().manual_seed(1)
    # scaled so that the predicted offsets are about a pixel: most taps land inside the 7 x 8 map, off the grid
    view, ref = (0.2 * torch.randn(2, C, 7, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = dcnv4_reference(view, ref, s)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(model.embedding.alignment(view, ref), expected, atol=1e-5, rtol=1e-5)


def test_fusion_and_qformer(converted, files):
    model, s, _ = converted
    cfg = model.cfg.qformer
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(3, 3, 10, C, generator=gen, dtype=torch.float64)  # (B, V, T, C)
    cat = tokens.permute(0, 2, 1, 3).reshape(3, 10, 3 * C)  # views view-major per token
    fused = linear(torch.relu(linear(cat, s, "cvem_mlp.0")), s, "cvem_mlp.2")
    torch.testing.assert_close(model.embedding.fusion(tokens), fused, atol=1e-5, rtol=1e-5)
    query_tokens = files["blip2_state"]["query_tokens"].double()
    torch.testing.assert_close(model.embedding.qformer.query_tokens, query_tokens, atol=0, rtol=0)
    expected = qformer_reference(fused, query_tokens, s, cfg.num_layers, cfg.num_heads, cfg.cross_attention_frequency)
    torch.testing.assert_close(model.embedding.qformer(fused), expected, atol=1e-5, rtol=1e-5)


def test_tag_and_region_text_heads(converted):
    model, s, _ = converted
    gen = torch.Generator().manual_seed(3)
    texts = torch.randn(5, model.encoder.text_dim, generator=gen, dtype=torch.float64)
    regions = torch.randn(2, model.cfg.qformer.num_queries, model.cfg.qformer.hidden_size, generator=gen,
                          dtype=torch.float64)
    heads = model.cfg.tags.decoder
    tag_h = tagging_reference(texts, regions, s, "tag", heads.num_layers, heads.num_heads)
    got = model.tags.decoder.fc(model.tags.decoder.hidden(texts, regions)).squeeze(-1)
    torch.testing.assert_close(got, linear(tag_h, s, "tag_fc").squeeze(-1), atol=1e-5, rtol=1e-5)
    attr_h = tagging_reference(texts, regions, s, "attr", heads.num_layers, heads.num_heads)
    score = linear(F.normalize(attr_h, dim=-1), s, "attr_fc").squeeze(-1)  # (B, K)
    torch.testing.assert_close(model.contrastive(texts, regions), score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.contrastive.logits(score), score * s["attr_t"].exp() + s["attr_b"],
                               atol=1e-5, rtol=1e-5)


def test_language_projection_control_vector_and_frozen_parts(converted, files):
    model, s, _ = converted
    regions = torch.randn(2, model.cfg.qformer.num_queries, model.cfg.qformer.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(model.language.proj(regions), linear(regions, s, "t5_proj"), atol=1e-5, rtol=1e-5)
    ids = model.language._controls([["red", "circle"]])[0]
    table = model.language.lm.get_input_embeddings().weight
    torch.testing.assert_close(model.language._embed(ids, True), table[ids] + s["cem_memory"], atol=1e-5, rtol=1e-5)
    blip2 = files["blip2_state"]
    torch.testing.assert_close(model.encoder.ln_vision.weight, blip2["ln_vision.weight"].double(), atol=0, rtol=0)
    torch.testing.assert_close(model.encoder.ln_vision.bias, blip2["ln_vision.bias"].double(), atol=0, rtol=0)


def test_the_export_names_the_frozen_parts_and_the_data(converted, files):
    model, _, out = converted
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["encoder"]["checkpoint"] == str(out / "encoder.safetensors")
    assert cfg["language"]["path"] == files["lm"] and cfg["qformer"]["path"] is None
    assert cfg["tags"]["vocabulary"] == TAGS and cfg["tags"]["threshold"] == 0.76
    assert cfg["recognition"]["attributes"] == [a["name"] for a in OVAD["attributes"]]
    assert cfg["recognition"]["attribute_kinds"] == {"hair color:blond/golden": "has"}
    assert cfg["recognition"]["categories"] == ["person", "Dog"]  # by id
    # the text tower came from the EVA-CLIP file, the vision tower from the encoder's
    text = files["text_state"]
    for k in ("text.token_embedding.weight", "text.transformer.resblocks.0.attn.in_proj_weight",
              "text.text_projection"):
        ours = k.removeprefix("text.")  # open_clip's CLIP keeps the text tower at the top level (EVA01-g-14: text.*)
        torch.testing.assert_close(model.encoder.clip.state_dict()[ours], text[k].double(), atol=0, rtol=0)
    vision = files["clip"].state_dict()
    for k in ("visual.conv1.weight", "visual.transformer.resblocks.1.mlp.c_fc.weight"):
        torch.testing.assert_close(model.encoder.clip.state_dict()[k], vision[k].double(), atol=0, rtol=0)
    # tag queries were recomputed from that text tower at load
    torch.testing.assert_close(model.tags.tag_embeddings, model.encoder.encode_text(TAGS), atol=1e-6, rtol=1e-6)


def test_the_converted_model_captions(converted):
    model, _, _ = converted
    model = model.float()
    gen = torch.Generator().manual_seed(4)
    s = model.cfg.image_size
    views = torch.randint(0, 256, (4, s, s, 3), generator=gen, dtype=torch.uint8)
    view_index = torch.tensor([[0, 1, 2], [3, 1, 2]])
    rois = torch.tensor([[[4.0, 4.0, 40.0, 30.0]] * 3, [[10.0, 8.0, 60.0, 60.0]] * 3])
    out = model.predict(views, view_index, rois, texts=["a red circle"])
    assert len(out) == 2 and all(isinstance(p.caption, str) and p.caption_score is not None for p in out)
    assert all(p.recognition.category in ("person", "Dog") for p in out)
    model.double()


def test_an_open_clip_encoder_with_its_own_text_tower_is_referenced_as_it_is(files, tmp_path):
    summary = convert_official.convert(files["checkpoint"], files["encoder"], files["blip2"], files["lm"],
                                       files["tags"], str(tmp_path / "export"), config=files["config"])
    assert summary["encoder"] == files["encoder"] and summary["placeholders"] == []
    assert not (tmp_path / "export" / "encoder.safetensors").exists()
    model = load_pretrained(str(tmp_path / "export"))
    assert model.cfg.recognition.categories == [] and model.cfg.tags.threshold == 0.7


# ------------------------------------------------------------------------------------------ the key mapping


def paper_official_keys() -> dict[str, tuple[int, ...]]:
    """The released checkpoints' keys and shapes, written out from ../shared/official-checkpoint.md (C = 1408)."""
    c, h = 1408, 768
    keys: dict[str, tuple[int, ...]] = {}

    def lin(name: str, out: int, inp: int) -> None:
        keys[name + ".weight"], keys[name + ".bias"] = (out, inp), (out,)

    def ln(name: str, dim: int) -> None:
        keys[name + ".weight"], keys[name + ".bias"] = (dim,), (dim,)

    ln("Qformer.bert.embeddings.LayerNorm", h)
    for n in range(12):
        p = f"Qformer.bert.encoder.layer.{n}"
        for att, width in [("attention", h)] + ([("crossattention", c)] if n % 2 == 0 else []):
            lin(f"{p}.{att}.self.query", h, h)
            lin(f"{p}.{att}.self.key", h, width)
            lin(f"{p}.{att}.self.value", h, width)
            lin(f"{p}.{att}.output.dense", h, h)
            ln(f"{p}.{att}.output.LayerNorm", h)
        lin(f"{p}.intermediate_query.dense", 3072, h)
        lin(f"{p}.output_query.dense", h, 3072)
        ln(f"{p}.output_query.LayerNorm", h)
    lin("t5_proj", 2048, h)
    keys["cem_memory"] = (2048,)
    lin("cvem_mlp.0", c, 3 * c)
    lin("cvem_mlp.2", c, c)
    lin("cvem_align.value_proj", c, c)
    keys["cvem_align.offset_mask_dw.weight"], keys["cvem_align.offset_mask_dw.bias"] = (c, 2, 3, 3), (c,)
    lin("cvem_align.offset_mask", 112, c)
    lin("cvem_align.output_proj", c, c)
    for head in ("tag", "attr"):
        for n in range(2):
            p = f"{head}_head.encoder.layer.{n}"
            for qkv in ("query", "key", "value"):
                lin(f"{p}.crossattention.self.{qkv}", 256, 256)
            lin(f"{p}.crossattention.output.dense", 256, 256)
            ln(f"{p}.crossattention.output.LayerNorm", 256)
            lin(f"{p}.intermediate.dense", 1024, 256)
            lin(f"{p}.output.dense", 256, 1024)
            ln(f"{p}.output.LayerNorm", 256)
        lin(f"{head}_vision_proj", 256, h)
        lin(f"{head}_text_proj", 256, 1024)
        lin(f"{head}_fc", 1, 256)
    keys["attr_t"], keys["attr_b"] = (), ()
    return keys


@pytest.fixture(scope="module")
def paper_meta():
    with torch.device("meta"):
        return DynRefer(load_config("official"))


def test_official_config_expects_exactly_the_released_keys(paper_meta):
    assert official.official_shapes(paper_meta) == paper_official_keys()
    # and every one converts to a tensor of ours of that shape (none unmapped, none missing)
    ours = dict(paper_meta.named_parameters())
    released = {k: torch.empty(s, device="meta") for k, s in paper_official_keys().items()}
    converted = official.convert_state_dict(released)
    trainable = {k for k, p in ours.items() if p.requires_grad and not k.startswith("embedding.encoder.")}
    assert set(converted) == trainable
    assert all(tuple(converted[k].shape) == tuple(ours[k].shape) for k in converted)


def test_an_official_export_holds_the_checkpoint_blip2s_frozen_tensors_and_the_tag_table(paper_meta):
    shapes = convert_official.export_shapes(paper_meta)
    assert {k: shapes[k] for k in official.FROM_BLIP2} == {
        "embedding.qformer.query_tokens": (1, 32, 768), "encoder.ln_vision.weight": (1408,),
        "encoder.ln_vision.bias": (1408,)}
    released = official.convert_state_dict({k: torch.empty(s, device="meta") for k, s in paper_official_keys().items()})
    assert set(shapes) == set(released) | set(official.FROM_BLIP2) | {"tags.tag_embeddings"}


def test_the_paper_config_expects_the_released_keys_too():
    with torch.device("meta"):
        model = DynRefer(load_config("paper"))
    assert official.official_shapes(model) == paper_official_keys()


def test_official_config_is_the_papers_model(paper_meta):
    m = paper_meta
    assert (m.encoder.width, m.encoder.patch_size, m.encoder.text_dim) == (1408, 14, 1024)
    assert len(m.encoder.clip.visual.trunk.blocks) == 40 and m.cfg.encoder.layer == -2
    assert m.language.lm.config.d_model == 2048 and m.language.lm.config.dense_act_fn == "gelu"
    assert m.cfg.views.hash == "official" and m.cfg.views.num_views == 3


def eva_lavis_shapes(blocks: int, c: int = 1408, mlp: int = 6144, grid: int = 16, patch: int = 14) -> dict:
    """LAVIS ``eva_vit_g.pth``'s keys (create_eva_vit_g: patch 14, qkv without bias plus q_bias/v_bias)."""
    keys = {"cls_token": (1, 1, c), "pos_embed": (1, grid * grid + 1, c),
            "patch_embed.proj.weight": (c, 3, patch, patch), "patch_embed.proj.bias": (c,)}
    for n in range(blocks):
        p = f"blocks.{n}"
        keys.update({f"{p}.norm1.weight": (c,), f"{p}.norm1.bias": (c,), f"{p}.attn.q_bias": (c,),
                     f"{p}.attn.v_bias": (c,), f"{p}.attn.qkv.weight": (3 * c, c), f"{p}.attn.proj.weight": (c, c),
                     f"{p}.attn.proj.bias": (c,), f"{p}.norm2.weight": (c,), f"{p}.norm2.bias": (c,),
                     f"{p}.mlp.fc1.weight": (mlp, c), f"{p}.mlp.fc1.bias": (mlp,), f"{p}.mlp.fc2.weight": (c, mlp),
                     f"{p}.mlp.fc2.bias": (c,)})
    return keys


def eva_text_shapes() -> dict:
    """``text.*`` of eva_clip_psz14.pt: 12 layers of width 768, 77 positions, projection to 1024."""
    keys = {"text.token_embedding.weight": (49408, 768), "text.positional_embedding": (77, 768),
            "text.ln_final.weight": (768,), "text.ln_final.bias": (768,), "text.text_projection": (768, 1024),
            "text.logit_scale": ()}
    for n in range(12):
        p = f"text.transformer.resblocks.{n}"
        keys.update({f"{p}.ln_1.weight": (768,), f"{p}.ln_1.bias": (768,), f"{p}.attn.in_proj_weight": (2304, 768),
                     f"{p}.attn.in_proj_bias": (2304,), f"{p}.attn.out_proj.weight": (768, 768),
                     f"{p}.attn.out_proj.bias": (768,), f"{p}.ln_2.weight": (768,), f"{p}.ln_2.bias": (768,),
                     f"{p}.mlp.c_fc.weight": (3072, 768), f"{p}.mlp.c_fc.bias": (3072,),
                     f"{p}.mlp.c_proj.weight": (768, 3072), f"{p}.mlp.c_proj.bias": (768,)})
    return keys


def test_lavis_eva_vit_g_and_the_eva_clip_text_tower_fill_open_clips_eva01_g_14(paper_meta):
    expected = {k[len("encoder.clip."):]: tuple(v.shape) for k, v in paper_meta.state_dict().items()
                if k.startswith("encoder.clip.")}
    small = {"blocks.39.", "norm.", "head."}  # real zeros only for the never-run ones
    vision = {k: torch.empty(s, device="meta") for k, s in eva_lavis_shapes(39).items()}
    text = {k: torch.empty(s, device="meta") for k, s in eva_text_shapes().items()}
    first_unused = convert_official.first_unused_block(paper_meta.cfg, expected)
    assert first_unused == 39
    state, filled = official.open_clip_state(vision, text, expected, first_unused, "eva_vit_g.pth")
    assert set(state) == set(expected)
    assert sorted(filled) == sorted(k for k in expected if k.startswith(tuple("visual.trunk." + p for p in small)))
    # an EVA-CLIP file (visual.* and text.* in one) needs no placeholder but the trunk's head/norm if absent
    both = {**{"visual." + k: v for k, v in vision.items()}, **text}
    _, filled = official.open_clip_state(both, None, expected, first_unused, "eva_clip_psz14.pt")
    assert "visual.trunk.blocks.38.attn.q_bias" not in filled
    # a missing block that runs is an error naming it
    del vision["blocks.12.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"eva_vit_g\.pth.*blocks\.12\.attn\.qkv\.weight"):
        official.open_clip_state(vision, text, expected, first_unused, "eva_vit_g.pth")


def lavis_eva_reference(x: torch.Tensor, s: dict, blocks: int, heads: int) -> torch.Tensor:
    """LAVIS's EVA ViT (create_eva_vit_g) on pixels (N, 3, S, S) for ``blocks`` blocks -> tokens (N, 1 + g*g, C)."""
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), t], 1) + s["pos_embed"]
    for n in range(blocks):
        p = f"blocks.{n}."
        y = layer_norm(t, s, p + "norm1", 1e-6)
        bias = torch.cat([s[p + "attn.q_bias"], torch.zeros_like(s[p + "attn.v_bias"]), s[p + "attn.v_bias"]])
        q, k, v = (y @ s[p + "attn.qkv.weight"].T + bias).chunk(3, dim=-1)
        t = t + linear(attention(q, k, v, heads), s, p + "attn.proj")
        t = t + linear(gelu(linear(layer_norm(t, s, p + "norm2", 1e-6), s, p + "mlp.fc1")), s, p + "mlp.fc2")
    return t


def test_lavis_eva_keys_load_into_timms_eva_and_compute_the_same():
    from timm.models.eva import Eva

    c, depth, heads = 64, 3, 4
    eva = Eva(img_size=28, patch_size=14, embed_dim=c, depth=depth, num_heads=heads, mlp_ratio=96 / 64,
              qkv_bias=True, qkv_fused=True, use_rot_pos_emb=False, num_classes=32, global_pool="token").double()
    gen = torch.Generator().manual_seed(5)
    lavis = {k: random_tensor(s, gen).double() for k, s in eva_lavis_shapes(depth - 1, c, 96, grid=2).items()}
    expected = {k: tuple(v.shape) for k, v in eva.state_dict().items()}
    vision, layout = official.eva_vision_state(lavis, "eva_vit_g.pth")
    assert layout == "lavis"
    state = {k[len("visual.trunk."):]: v for k, v in vision.items()}
    filled = [k for k in expected if k not in state]
    assert sorted(filled) == sorted(k for k in expected if k.startswith((f"blocks.{depth - 1}.", "norm.", "head.")))
    for k in filled:
        state[k] = official.placeholder(k, expected[k]).double()
    eva.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 28, 28, generator=gen, dtype=torch.float64)
    grid, prefix = eva.forward_intermediates(x, indices=[depth - 2], return_prefix_tokens=True, stop_early=True,
                                             intermediates_only=True)[0]
    tokens = lavis_eva_reference(x, lavis, depth - 1, heads)
    torch.testing.assert_close(prefix[:, 0], tokens[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-5, rtol=1e-5)
    # the placeholder last block is an identity, should anything run it
    torch.testing.assert_close(eva.blocks[depth - 1](tokens), tokens, atol=1e-12, rtol=0)


def test_any_subset_converts_alone_and_names_round_trip():
    state = {"cvem_align.offset_mask.weight": torch.ones(112, 64), "attr_t": torch.tensor(2.3),
             "Qformer.bert.encoder.layer.4.crossattention.self.key.bias": torch.ones(3)}
    out = official.convert_state_dict(state)
    assert set(out) == {"embedding.alignment.offset_mask.weight", "contrastive.logit_scale",
                        "embedding.qformer.qformer.encoder.layer.4.crossattention.attention.key.bias"}
    assert out["contrastive.logit_scale"].shape == (1,) and float(out["contrastive.logit_scale"]) == pytest.approx(2.3)
    assert torch.equal(out["embedding.alignment.offset_mask.weight"], state["cvem_align.offset_mask.weight"])
    for key in paper_official_keys():
        assert official.to_official(official.to_ours(key)) == key


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"my\.pth.*cvem_extra\.weight.*Qformer\.cls\.predictions\.bias"):
        official.convert_state_dict({"cvem_extra.weight": torch.ones(1), "t5_proj.bias": torch.ones(1),
                                     "Qformer.cls.predictions.bias": torch.ones(1)}, "my.pth")


# ------------------------------------------------------------------------------------------ bad files


def test_a_file_that_needs_arbitrary_unpickling_is_refused(files, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": files["state"], "config": argparse.Namespace(arch="dynrefer_t5")}, path)
    with pytest.raises(ValueError, match=r"evil\.pth: refused: this file needs arbitrary unpickling"):
        official.read_torch_file(str(path))
    assert convert_official.main(argv(files, tmp_path / "out", **{"--checkpoint": str(path)})) == 2
    assert not (tmp_path / "out").exists()


def test_a_truncated_file_is_named(files, tmp_path):
    data = open(files["checkpoint"], "rb").read()
    path = tmp_path / "vg1.2_5e.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"vg1\.2_5e\.pth: not a readable torch checkpoint \(truncated or corrupt\)"):
        official.read_torch_file(str(path))


def test_wrong_shapes_and_missing_keys_are_reported_at_once(files, tmp_path):
    state = dict(files["state"])
    state["cvem_mlp.0.weight"] = torch.ones(C, 2 * C)
    state["attr_t"] = torch.ones(2)
    del state["tag_fc.bias"], state["Qformer.bert.encoder.layer.1.output_query.dense.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    cfg = load_config(files["config"])
    with torch.device("meta"):
        expected = official.official_shapes(DynRefer(cfg))
    with pytest.raises(ValueError) as e:
        official.load_official_checkpoint(str(path), expected)
    message = str(e.value)
    assert message.startswith(str(path))
    for part in ("missing keys (2)", "Qformer.bert.encoder.layer.1.output_query.dense.weight", "tag_fc.bias",
                 f"cvem_mlp.0.weight: ({C}, {2 * C}) (expected ({C}, {3 * C}))", "attr_t: (2,) (expected ())"):
        assert part in message


def test_an_unknown_key_in_a_checkpoint_is_named_with_its_file(files, tmp_path):
    path = tmp_path / "extra.pth"
    torch.save({"model": {**files["state"], "cvem_gate.weight": torch.ones(3), "cem_memory": torch.ones(7)}}, path)
    cfg = load_config(files["config"])
    with torch.device("meta"):
        expected = official.official_shapes(DynRefer(cfg))
    with pytest.raises(ValueError) as e:
        official.load_official_checkpoint(str(path), expected)
    message = str(e.value)  # the unknown key and the wrong shape, at once
    assert message.startswith(f"{path}: does not match the model; unknown official keys (1): ['cvem_gate.weight']")
    assert "cem_memory: (7,) (expected (128,))" in message


def test_lm_of_another_width_is_refused(files, tmp_path):
    lm_dir = tmp_path / "lm"
    lm_dir.mkdir()
    (lm_dir / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 2048}))
    with pytest.raises(ValueError, match=r"the LM's width is 2048, but t5_proj"):
        convert_official.convert(files["checkpoint"], files["encoder"], files["blip2"], str(lm_dir), files["tags"],
                                 str(tmp_path / "out"), config=files["config"])


def test_blip2_from_a_hugging_face_directory(files, tmp_path):
    from safetensors.torch import save_file

    blip2 = files["blip2_state"]
    hf = tmp_path / "blip2-flan-t5-xl"
    hf.mkdir()
    save_file({"query_tokens": blip2["query_tokens"], "vision_model.post_layernorm.weight": blip2["ln_vision.weight"],
               "vision_model.post_layernorm.bias": blip2["ln_vision.bias"],
               "language_projection.weight": blip2["t5_proj.weight"]}, str(hf / "model.safetensors"))
    frozen = official.blip2_frozen(str(hf))
    assert set(frozen) == set(official.FROM_BLIP2)
    assert torch.equal(frozen["encoder.ln_vision.bias"], blip2["ln_vision.bias"])
    assert torch.equal(frozen["embedding.qformer.query_tokens"], blip2["query_tokens"])
    (hf / "model.safetensors").unlink()
    save_file({"query_tokens": blip2["query_tokens"]}, str(hf / "model.safetensors"))
    with pytest.raises(ValueError, match=r"blip2-flan-t5-xl: .*lacks \['vision_model.post_layernorm.weight'"):
        official.blip2_frozen(str(hf))


def test_every_path_may_be_s3(files, s3_server):
    from dynrefer import storage

    opts = s3_server["storage_options"]
    storage.filesystem("s3://official/", opts)[0].mkdir("official")
    fs = storage.filesystem("s3://official/", opts)[0]
    for name in ("vg1.2_5e.pth", "blip2_pretrained_flant5xl.pth", "clip.pt", "eva_clip_psz14.pt", "ram_tag_list.txt",
                 "ovad2000.json"):
        fs.put(str(files["root"] / name), f"official/in/{name}")
    fs.put(str(files["root"] / "flan-t5") + "/", "official/in/flan-t5/", recursive=True)
    uri = "s3://official/in/"
    summary = convert_official.convert(uri + "vg1.2_5e.pth", uri + "clip.pt", uri + "blip2_pretrained_flant5xl.pth",
                                       uri + "flan-t5", uri + "ram_tag_list.txt", "s3://official/export",
                                       text_tower=uri + "eva_clip_psz14.pt", ovad=uri + "ovad2000.json",
                                       config=files["config"], storage_options=opts)
    assert summary["encoder"] == "s3://official/export/encoder.safetensors"
    model = load_pretrained("s3://official/export", opts)
    text = files["text_state"]["text.text_projection"]
    assert torch.equal(model.encoder.clip.state_dict()["text_projection"], text)
    assert torch.equal(model.language.control.detach(), files["state"]["cem_memory"])


def test_the_rayjob_converts_captions_and_evaluates_one_chain():
    """cluster/kuberay/rayjob-official.yaml: each command parses with its own program, and each stage reads what
    the one before it writes."""
    import os
    import shlex

    from pipelines import caption, evaluate

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "cluster", "kuberay", "rayjob-official.yaml")) as f:
        job = yaml.safe_load(f)
    commands = [shlex.split(c) for c in job["spec"]["entrypoint"].split("&&")]
    assert [c[:2] for c in commands] == [["dynrefer", "convert-official"], ["python", "-m"], ["python", "-m"]]
    assert [c[2] for c in commands[1:]] == ["pipelines.caption", "pipelines.evaluate"]
    conv = convert_official.parser().parse_args(commands[0][2:])
    cap = caption.parser().parse_args(commands[1][3:])
    ev = evaluate.parser().parse_args(commands[2][3:])
    assert conv.checkpoint.endswith("refcocog_ft.pth") and conv.tag_threshold == 0.76
    assert cap.model == conv.out and cap.address == "auto" and cap.split == "val"
    assert ev.predictions == cap.out + "/captions" and ev.prepared == cap.prepared
    assert os.path.isfile(os.path.join(repo, ev.config))


# ------------------------------------------------------------------------------------------ the EVA encoder, end to end

EVA_NAME = "dynrefer-test-eva-tiny"  # an open_clip model config of EVA01-g-14's form (timm Eva trunk, text.*)


@pytest.fixture(scope="module")
def eva_files(files, tmp_path_factory):
    """A LAVIS-layout ViT with one block fewer than its open_clip model (as eva_vit_g.pth's 39 of 40), an EVA-CLIP
    text tower, and a model config whose encoder is an open_clip CustomTextCLIP on a timm Eva trunk."""
    import timm
    from timm.models import register_model
    from timm.models.eva import Eva

    if EVA_NAME.replace("-", "_") not in timm.list_models():
        @register_model
        def dynrefer_test_eva_tiny(pretrained: bool = False, **kwargs):  # EVA-g's form at width 64, 3 blocks
            kwargs = {k: v for k, v in kwargs.items() if k in ("num_classes", "global_pool")}
            return Eva(img_size=28, patch_size=14, embed_dim=64, depth=3, num_heads=4, mlp_ratio=96 / 64,
                       qkv_bias=True, qkv_fused=True, use_rot_pos_emb=False, **kwargs)
    root = tmp_path_factory.mktemp("eva")
    (root / "configs").mkdir()
    (root / "configs" / f"{EVA_NAME}.json").write_text(json.dumps({
        "embed_dim": 32, "custom_text": True,
        "vision_cfg": {"image_size": 28, "timm_model_name": EVA_NAME.replace("-", "_"), "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": None},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}))
    open_clip.add_model_config(root / "configs")
    cfg = tiny_official()
    cfg["image_size"] = 28
    cfg["encoder"] = {"name": EVA_NAME, "model_cfg": None, "checkpoint": None, "layer": -2, "freeze": True}
    (root / "model.yaml").write_text(yaml.safe_dump(cfg))
    gen = torch.Generator().manual_seed(11)
    lavis = {k: random_tensor(s, gen) for k, s in eva_lavis_shapes(2, 64, 96, grid=2).items()}
    torch.save(lavis, root / "eva_vit_g.pth")
    with torch.device("meta"):
        meta = DynRefer(load_config(str(root / "model.yaml")))
    text = {k.removeprefix("encoder.clip."): random_tensor(tuple(v.shape), gen) for k, v in meta.state_dict().items()
            if k.startswith("encoder.clip.text.")}
    text["text.logit_scale"] = torch.tensor(2.0)
    torch.save(text, root / "eva_clip_psz14.pt")
    state = {k: random_tensor(s, gen) for k, s in official.official_shapes(meta).items()}
    torch.save({"model": state}, root / "vg1.2_5e.pth")
    blip2 = {"query_tokens": random_tensor((1, 4, 64), gen), "ln_vision.weight": random_tensor((64,), gen),
             "ln_vision.bias": random_tensor((64,), gen)}
    torch.save({"model": blip2}, root / "blip2.pth")
    return {"root": root, "config": str(root / "model.yaml"), "lavis": lavis, "text": text, "blip2": blip2,
            "checkpoint": str(root / "vg1.2_5e.pth")}


def test_lavis_eva_vit_g_runs_as_the_official_encoder(files, eva_files):
    root = eva_files["root"]
    summary = convert_official.convert(eva_files["checkpoint"], str(root / "eva_vit_g.pth"), str(root / "blip2.pth"),
                                       files["lm"], files["tags"], str(root / "export"),
                                       text_tower=str(root / "eva_clip_psz14.pt"), config=eva_files["config"])
    assert summary["encoder_layout"] == "lavis"
    assert all(k.startswith(("visual.trunk.blocks.2.", "visual.trunk.norm.", "visual.trunk.head."))
               for k in summary["placeholders"]) and "visual.trunk.blocks.2.attn.qkv.weight" in summary["placeholders"]
    model = load_pretrained(str(root / "export")).double()
    gen = torch.Generator().manual_seed(12)
    views = torch.randint(0, 256, (3, 28, 28, 3), generator=gen, dtype=torch.uint8)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    x = (views.permute(0, 3, 1, 2).double() / 255 - mean) / std
    lavis = {k: v.double() for k, v in eva_files["lavis"].items()}
    ln = {k: v.double() for k, v in eva_files["blip2"].items()}
    tokens = layer_norm(lavis_eva_reference(x, lavis, 2, 4), ln, "ln_vision", 1e-5)  # 2 of 3 blocks, then ln_vision
    features = model.encoder(views)
    torch.testing.assert_close(features.cls, tokens[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.grid.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-5, rtol=1e-5)
    for k, v in eva_files["text"].items():
        ours = "logit_scale" if k == "text.logit_scale" else k
        assert torch.equal(model.encoder.clip.state_dict()[ours].reshape(v.shape), v.double()), k


def test_s3_secrets_are_refused_on_the_command_line(capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as e:
        main(["convert-official", "--checkpoint", "c", "--encoder", "e", "--blip2", "b", "--lm", "l",
              "--ram-tags", "r", "--out", "o", "--s3-secret", "AKIASECRETVALUE"])
    assert e.value.code == 2 and "AKIASECRETVALUE" not in capsys.readouterr().err


def test_without_a_checkpoint_the_export_is_blip2s_starting_point(files, tmp_path):
    """LAVIS's BLIP-2 .pth (its Q-former's text side included, which DynRefer drops) initialises the Q-former and
    t5_proj; the alignment starts at the official zero output for every non-base view."""
    gen = torch.Generator().manual_seed(9)
    blip2 = {k: random_tensor(tuple(v.shape), gen) for k, v in files["state"].items()
             if k.startswith(("Qformer.", "t5_proj.")) and k != "Qformer.bert.embeddings.position_ids"}
    blip2.update({k: files["blip2_state"][k] for k in ("query_tokens", "ln_vision.weight", "ln_vision.bias")})
    blip2.update({"Qformer.cls.predictions.bias": torch.ones(30522), "Qformer.bert.encoder.layer.0.output.dense.weight":
                  torch.ones(64, 96), "Qformer.bert.embeddings.word_embeddings.weight": torch.ones(30522, 64)})
    torch.save({"model": blip2}, tmp_path / "blip2_pretrained_flant5xl.pth")
    summary = convert_official.convert(None, files["encoder"], str(tmp_path / "blip2_pretrained_flant5xl.pth"),
                                       files["lm"], files["tags"], str(tmp_path / "init"), config=files["config"])
    assert summary["checkpoint"] is None
    model = load_pretrained(str(tmp_path / "init")).double().eval()
    s = {k: v.double() for k, v in blip2.items()}
    tokens = torch.randn(2, 10, C, dtype=torch.float64)
    cfg = model.cfg.qformer
    expected = qformer_reference(tokens, s["query_tokens"], s, cfg.num_layers, cfg.num_heads,
                                 cfg.cross_attention_frequency)
    torch.testing.assert_close(model.embedding.qformer(tokens), expected, atol=1e-5, rtol=1e-5)
    regions = torch.randn(2, cfg.num_queries, cfg.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(model.language.proj(regions), linear(regions, s, "t5_proj"), atol=1e-5, rtol=1e-5)
    view = torch.randn(2, C, 4, 4, dtype=torch.float64)
    assert torch.equal(model.embedding.alignment(view, view.flip(0)), torch.zeros_like(view))
    assert torch.equal(model.language.control, torch.zeros_like(model.language.control))
    # a BLIP-2 file without its Q-former is refused, naming what is missing
    del blip2["Qformer.bert.encoder.layer.1.attention.self.query.weight"]
    torch.save({"model": blip2}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth: .*missing keys \(1\).*layer\.1\.attention\.attention\.query"):
        convert_official.convert(None, files["encoder"], str(tmp_path / "partial.pth"), files["lm"], files["tags"],
                                 str(tmp_path / "init2"), config=files["config"])


def test_the_vision_tower_of_a_blip2_hugging_face_directory_runs_as_the_official_encoder(files, eva_files, tmp_path):
    """transformers' own Blip2VisionModel is the reference: its hidden state after 2 layers, through ln_vision."""
    from safetensors.torch import save_file
    from transformers import Blip2VisionConfig, Blip2VisionModel

    torch.manual_seed(13)
    hf = Blip2VisionModel(Blip2VisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=28, patch_size=14)).double().eval()
    gen = torch.Generator().manual_seed(14)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(random_tensor(tuple(p.shape), gen))
    blip2 = eva_files["blip2"]
    directory = tmp_path / "blip2-flan-t5-xl"
    directory.mkdir()
    save_file({**{"vision_model." + k: v.float().contiguous() for k, v in hf.state_dict().items()},
               "query_tokens": blip2["query_tokens"], "vision_model.post_layernorm.weight": blip2["ln_vision.weight"],
               "vision_model.post_layernorm.bias": blip2["ln_vision.bias"],
               "language_model.lm_head.weight": torch.ones(3, 3)}, str(directory / "model.safetensors"))
    root = eva_files["root"]
    summary = convert_official.convert(eva_files["checkpoint"], str(directory), str(directory), files["lm"],
                                       files["tags"], str(tmp_path / "export"),
                                       text_tower=str(root / "eva_clip_psz14.pt"), config=eva_files["config"])
    assert summary["encoder_layout"] == "hf_blip2"
    model = load_pretrained(str(tmp_path / "export")).double()
    views = torch.randint(0, 256, (2, 28, 28, 3), generator=gen, dtype=torch.uint8)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    x = (views.permute(0, 3, 1, 2).double() / 255 - mean) / std
    hf = hf.float().double()  # the weights as the file holds them (float32)
    with torch.no_grad():
        hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states[2]  # (N, 5, 64)
    tokens = layer_norm(hidden, {k: v.double() for k, v in blip2.items()}, "ln_vision", 1e-5)
    features = model.encoder(views)
    torch.testing.assert_close(features.cls, tokens[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.grid.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-5, rtol=1e-5)


def test_blip2_vision_keys_of_older_transformers_give_the_same_tower():
    """Older transformers store q_bias and v_bias apart; newer ones one fused qkv.bias (its key part unused)."""
    c = 8
    fused = {"vision_model.embeddings.class_embedding": torch.ones(1, 1, c),
             "vision_model.encoder.layers.0.self_attn.qkv.bias": torch.arange(3 * c, dtype=torch.float32)}
    apart = {"vision_model.embeddings.class_embedding": torch.ones(1, 1, c),
             "vision_model.encoder.layers.0.self_attn.q_bias": torch.arange(c, dtype=torch.float32),
             "vision_model.encoder.layers.0.self_attn.v_bias": torch.arange(2 * c, 3 * c, dtype=torch.float32)}
    a, _ = official.eva_vision_state(fused, "new")
    b, _ = official.eva_vision_state(apart, "old")
    assert a.keys() == b.keys() == {"visual.trunk.cls_token", "visual.trunk.blocks.0.attn.q_bias",
                                    "visual.trunk.blocks.0.attn.v_bias"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"old: unknown BLIP-2 vision key 'vision_model.encoder.layers.0.rope'"):
        official.eva_vision_state({**apart, "vision_model.encoder.layers.0.rope": torch.ones(1)}, "old")
