"""Real weights come from paths: open_clip checkpoints and Hugging Face LM directories, local or s3://."""

import dataclasses

import open_clip
import pytest
import torch

from dynrefer import storage
from dynrefer.checkpoint import WEIGHTS_FILE, load_pretrained, save_pretrained
from dynrefer.config import EncoderConfig, load_config
from dynrefer.encoder import ImageEncoder
from dynrefer.language import load_lm
from dynrefer.model import DynRefer

WORDS = "a the red blue green small large striped dotted circle square triangle left of right".split()


def tiny():
    cfg = load_config("tiny")
    cfg.language = dataclasses.replace(cfg.language, vocabulary=WORDS)
    cfg.tags.vocabulary = ["red", "blue", "circle"]
    return cfg


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny open_clip checkpoint and a tiny T5 directory with its tokenizer, as a user would bring them."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(123)
    clip = open_clip.CLIP(**tiny().encoder.model_cfg)
    torch.save({"state_dict": clip.state_dict()}, root / "clip.pt")
    lm, tokenizer = load_lm(tiny().language)
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    return {"clip": clip, "clip_path": str(root / "clip.pt"), "lm": lm, "lm_path": str(root / "lm")}


def test_encoder_loads_an_open_clip_checkpoint(weights):
    cfg = dataclasses.replace(tiny().encoder, checkpoint=weights["clip_path"])
    enc = ImageEncoder(cfg)
    for (name, a), b in zip(enc.clip.state_dict().items(), weights["clip"].state_dict().values()):
        assert torch.equal(a, b), name


def test_encoder_takes_a_json_model_config(tmp_path):
    import json

    path = tmp_path / "clip.json"
    path.write_text(json.dumps(tiny().encoder.model_cfg))
    enc = ImageEncoder(EncoderConfig(name=str(path), layer=tiny().encoder.layer))
    assert (enc.patch_size, enc.width, enc.text_dim) == (8, 128, 128)
    feats = enc(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
    assert feats.grid.shape == (2, 128, 8, 8) and feats.cls.shape == (2, 128)


def test_lm_loads_from_a_hugging_face_directory(weights):
    cfg = dataclasses.replace(tiny().language, path=weights["lm_path"], arch=None)
    lm, tokenizer = load_lm(cfg)
    assert tokenizer("a red circle")["input_ids"] == load_lm(tiny().language)[1]("a red circle")["input_ids"]
    for (name, a), b in zip(lm.state_dict().items(), weights["lm"].state_dict().values()):
        assert torch.equal(a, b), name


def test_export_references_weight_paths_instead_of_copying(weights, tmp_path):
    cfg = tiny()
    cfg.encoder.checkpoint = weights["clip_path"]
    cfg.language = dataclasses.replace(cfg.language, path=weights["lm_path"], arch=None)
    model = DynRefer(cfg).eval()
    save_pretrained(model, str(tmp_path / "small"))
    save_pretrained(DynRefer(tiny()), str(tmp_path / "full"))
    small, full = ((tmp_path / d / WEIGHTS_FILE).stat().st_size for d in ("small", "full"))
    assert small < full / 3
    views, index = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8), torch.arange(6).view(2, 3)
    rois = torch.tensor([[0, 0, 64, 64], [8, 8, 40, 40], [16, 16, 32, 32]], dtype=torch.float).expand(2, 3, 4)
    assert load_pretrained(str(tmp_path / "small")).predict(views, index, rois) == model.predict(views, index, rois)


@pytest.mark.slow
def test_weights_and_exports_on_s3(weights, s3_server, tmp_path, monkeypatch):
    so = s3_server["storage_options"]
    fs, _ = storage.filesystem("s3://weights", so)
    fs.mkdir("weights")
    fs.put(weights["clip_path"], "weights/clip.pt")
    fs.put(weights["lm_path"] + "/", "weights/lm/", recursive=True)
    cfg = tiny()
    cfg.encoder.checkpoint = "s3://weights/clip.pt"
    cfg.language = dataclasses.replace(cfg.language, path="s3://weights/lm", arch=None)
    monkeypatch.setenv("DYNREFER_CACHE", str(tmp_path / "cache"))
    model = DynRefer(cfg, storage_options=so).eval()
    assert torch.equal(model.encoder.clip.visual.conv1.weight, weights["clip"].visual.conv1.weight)
    save_pretrained(model, "s3://weights/export", so)
    loaded = load_pretrained("s3://weights/export", so)
    views, index = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8), torch.arange(3).view(1, 3)
    rois = torch.tensor([[[0, 0, 64, 64], [8, 8, 40, 40], [16, 16, 32, 32]]], dtype=torch.float)
    assert loaded.predict(views, index, rois) == model.predict(views, index, rois)


def test_blip2_directory_initialises_qformer_queries_and_the_lm_projection(tmp_path):
    """A BLIP-2 Hugging Face directory gives the Q-former, its (frozen) query tokens and, as the official code,
    the LM projection (``language_projection`` -> t5_proj)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = DynRefer(tiny())
    state = {f"qformer.{k}": torch.randn_like(v) for k, v in source.embedding.qformer.qformer.state_dict().items()}
    state["query_tokens"] = torch.randn(1, 32, source.cfg.qformer.hidden_size)
    proj = source.language.proj
    state["language_projection.weight"] = torch.randn_like(proj.weight)
    state["language_projection.bias"] = torch.randn_like(proj.bias)
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = tiny()
    cfg.qformer.path = str(tmp_path)
    m = DynRefer(cfg)
    assert torch.equal(m.language.proj.weight, state["language_projection.weight"])
    assert torch.equal(m.language.proj.bias, state["language_projection.bias"])
    assert torch.equal(m.embedding.qformer.query_tokens, state["query_tokens"][:, : cfg.qformer.num_queries])
    assert not m.embedding.qformer.query_tokens.requires_grad
    for k, v in m.embedding.qformer.qformer.state_dict().items():
        assert torch.equal(v, state[f"qformer.{k}"]), k
    state["language_projection.weight"] = torch.randn(3, 3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="language_projection"):
        DynRefer(cfg)


def test_conv_tower_gives_a_stage_grid_and_its_pooled_embedding_after_ln_vision(weights):
    """A ResNet tower (tiny's): the grid is stage ``encoder.layer`` (its stride is the patch size RoI-Align scales
    by), the CLS its attention-pooled embedding; loading a checkpoint and building leave batch-norm statistics alone."""
    from dynrefer.encoder import conv_geometry

    cfg = dataclasses.replace(tiny().encoder, checkpoint=weights["clip_path"])
    assert cfg.model_cfg["vision_cfg"]["layers"] == [1, 1, 1, 1]
    enc = ImageEncoder(cfg)
    for (name, a), b in zip(enc.clip.state_dict().items(), weights["clip"].state_dict().values()):
        assert torch.equal(a, b), name  # running means and variances included
    visual = enc.clip.visual
    assert (enc.patch_size, enc.width) == (8, 128) and conv_geometry(visual, 1) == (4, 64)
    assert conv_geometry(visual, -1) == (32, 512)
    with torch.no_grad():
        enc.ln_vision.weight.uniform_(0.5, 1.5)
        enc.ln_vision.bias.normal_()
    views = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    feats = enc(views)
    x = (views.permute(0, 3, 1, 2).float() / 255 - enc.mean) / enc.std
    with torch.no_grad():
        stage2 = visual.layer2(visual.layer1(visual.stem(x)))  # (3, 128, 8, 8)
        pooled = visual(x)  # (3, 128): the CLIP image embedding before normalisation
    torch.testing.assert_close(feats.grid, enc.ln_vision(stage2.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    torch.testing.assert_close(feats.cls, enc.ln_vision(pooled))
    assert feats.patch_size == 8 and not visual.training
    with pytest.raises(ValueError, match="stages 0..4"):
        ImageEncoder(dataclasses.replace(cfg, layer=5))
