import dataclasses
import math

import pytest
import torch
from PIL import Image

from dynrefer.checkpoint import load_pretrained, save_pretrained
from dynrefer.config import DynReferConfig, load_config
from dynrefer.embedding import roi_tokens
from dynrefer.encoder import ViewFeatures
from dynrefer.model import DynRefer, parameter_counts

WORDS = "a the red blue green small large striped dotted circle square triangle left of right".split()
TAGS = ["red", "blue", "circle", "square", "striped"]
CAPTIONS = ["a red circle", "the small blue square", "a striped triangle left of a circle", "a red circle"]
REGION_TAGS = [["red", "circle"], ["blue", "square"], ["striped", "triangle"], ["red", "circle"]]


def tiny_config(**language) -> DynReferConfig:
    cfg = load_config("tiny")
    cfg.language = dataclasses.replace(cfg.language, vocabulary=WORDS, drop_all_tags=0.0, drop_each_tag=0.0,
                                       **language)
    cfg.tags.vocabulary = list(TAGS)
    return cfg


def batch(b=4, v=3, s=64, seed=0):
    """Random views, each region its own: views (B*V, S, S, 3), view_index (B, V), rois (B, V, 4)."""
    g = torch.Generator().manual_seed(seed)
    views = torch.randint(0, 256, (b * v, s, s, 3), dtype=torch.uint8, generator=g)
    rois = torch.tensor([[0, 0, s, s], [16, 16, 48, 48], [24, 24, 40, 40]], dtype=torch.float)[:v]
    return views, torch.arange(b * v).view(b, v), rois.expand(b, v, 4).clone()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DynRefer(tiny_config())


def test_forward_backward_losses_finite_and_gradients_where_trainable():
    torch.manual_seed(0)
    m = DynRefer(tiny_config(freeze=True)).train()
    views, index, rois = batch()
    out = m(views, index, rois, CAPTIONS, REGION_TAGS)
    assert set(out) == {"tags", "contrastive", "caption", "loss"}
    assert all(math.isfinite(float(v)) for v in out.values())
    expected = out["caption"] + 0.01 * out["tags"] + 0.5 * out["contrastive"]
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    frozen = ("encoder.", "embedding.encoder.", "language.lm.", "embedding.qformer.query_tokens")
    for name, p in m.named_parameters():
        if name.startswith(frozen):  # the towers, ln_vision and the Q-former's queries stay frozen, as official
            assert not p.requires_grad and p.grad is None, name
    for prefix in ["embedding.alignment.offset_mask.", "embedding.fusion", "embedding.qformer.qformer",
                   "tags.decoder", "contrastive.", "language.proj", "language.control"]:
        grads = [p.grad for n, p in m.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), prefix
        assert any(g.abs().sum() > 0 for g in grads), prefix
    # official init: aligned views are exactly zero, so only the zero-initialised offset/mask layer learns first
    assert float(m.embedding.alignment.value_proj.weight.grad.abs().sum()) == 0.0


def test_encoder_stops_early_skips_the_final_norm_and_applies_ln_vision():
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.encoder.layer = -2
    cfg.encoder.model_cfg = {**cfg.encoder.model_cfg, "vision_cfg": {"image_size": 64, "layers": 4, "width": 128,
                                                                     "patch_size": 8, "head_width": 32}}  # a ViT
    m = DynRefer(cfg).eval()
    visual = m.encoder.clip.visual
    ran = []
    hooks = [b.register_forward_hook(lambda mod, a, o, i=i: ran.append(i)) for i, b in
             enumerate(visual.transformer.resblocks)]
    with torch.no_grad():
        m.encoder.ln_vision.weight.uniform_(0.5, 1.5)
        m.encoder.ln_vision.bias.normal_()
    views = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    try:
        features = m.encoder(views)
    finally:
        for h in hooks:
            h.remove()
    assert ran == list(range(len(visual.transformer.resblocks) - 1))  # the last block never runs
    x = (views.permute(0, 3, 1, 2).float() / 255 - m.encoder.mean) / m.encoder.std
    with torch.no_grad():
        tokens = visual._embeds(x)  # patch embedding, class token, positions, ln_pre
        for block in visual.transformer.resblocks[:-1]:
            tokens = block(tokens)
        tokens = m.encoder.ln_vision(tokens)  # (N, 1 + g*g, C), no ln_post
    g = features.grid.shape[-1]
    torch.testing.assert_close(features.cls, tokens[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features.grid.flatten(2).transpose(1, 2), tokens[:, 1:], rtol=1e-5, atol=1e-5)
    assert g * g == tokens.shape[1] - 1


def test_text_queries_are_raw_clip_embeddings(model):
    texts = model.encoder.encode_text(["a red circle", "the blue square"])
    expected = model.encoder.clip.encode_text(model.encoder.tokenizer(["a red circle", "the blue square"]))
    torch.testing.assert_close(texts, expected)
    assert not torch.allclose(texts.norm(dim=-1), torch.ones(2))


def test_trainable_lm_gets_gradients_and_tasks_can_be_turned_off():
    torch.manual_seed(0)
    cfg = tiny_config(freeze=False)
    cfg.loss = dataclasses.replace(cfg.loss, tags=0.0, contrastive=0.0)
    m = DynRefer(cfg).train()
    out = m(*batch(), CAPTIONS, REGION_TAGS)
    assert set(out) == {"caption", "loss"}
    out["loss"].backward()
    assert m.language.lm.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.tags.parameters())


def test_decoder_only_lm_trains_and_generates():
    torch.manual_seed(0)
    m = DynRefer(tiny_config(arch={"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2,
                                   "n_positions": 128}))
    views, index, rois = batch(b=2)
    loss = m.train()(views, index, rois, CAPTIONS[:2], REGION_TAGS[:2])["caption"]
    assert math.isfinite(float(loss))
    preds = m.eval().predict(views, index, rois)
    assert len(preds) == 2 and all(isinstance(p.caption, str) for p in preds)


def test_predict_gives_caption_tags_and_text_scores(model):
    views, index, rois = batch(b=3)
    preds = model.eval().predict(views, index, rois, texts=["a red circle", "a blue square"])
    assert len(preds) == 3
    for p in preds:
        assert isinstance(p.caption, str) and len(p.caption.split()) <= model.cfg.language.max_new_tokens
        assert all(t in TAGS and 0.7 < s <= 1 for t, s in p.tags)
        assert set(p.text_scores) == {"a red circle", "a blue square"}
        assert all(0 <= s <= 1 for s in p.text_scores.values())


def test_save_load_gives_identical_predictions(model, tmp_path):
    model.eval()
    model.cfg.tags.threshold = 0.0  # every tag shown, so tag scores are compared too
    views, index, rois = batch(b=2, seed=1)
    before = model.predict(views, index, rois, texts=["red"])
    save_pretrained(model, str(tmp_path / "export"))
    loaded = load_pretrained(str(tmp_path / "export"))
    assert loaded.predict(views, index, rois, texts=["red"]) == before
    model.cfg.tags.threshold = 0.7


def test_load_refuses_weights_that_do_not_match(model, tmp_path):
    save_pretrained(model, str(tmp_path / "export"))
    import json

    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    cfg["qformer"]["num_layers"] = 3
    (tmp_path / "export" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        load_pretrained(str(tmp_path / "export"))


def test_roi_tokens_sample_the_view_grid_at_the_roi():
    # A patch grid whose value is each patch centre's x coordinate in view pixels: RoI-Align of a linear field
    # is exact. With aligned=False (the official setting) feature index i sits at coordinate i, not i + 0.5, so
    # every bin reads half a patch to the right of its centre.
    patch, g = 8, 8
    centres = (torch.arange(g) + 0.5) * patch
    grid = centres.view(1, 1, 1, g).expand(1, 2, g, g).contiguous()
    roi = torch.tensor([[16.0, 16.0, 48.0, 48.0]])
    out = roi_tokens(ViewFeatures(grid=grid, cls=torch.zeros(1, 2), patch_size=patch), roi)
    expected = 16 + (torch.arange(g) + 0.5) * (32 / g) + patch / 2
    assert out.shape == (1, 2, g, g)
    assert torch.allclose(out[0, 0, 3], expected, atol=1e-4)


def test_grid_positions_let_the_qformer_tell_a_region_from_its_mirror_image():
    # The Q-former attends over its tokens as a set: without a position code a region and its mirror image (the
    # RoI grid flipped left to right) give the same queries, so no head can read a shape that is not symmetric.
    # Differences are measured against that of an unrelated input (at init the tokens move the queries little).
    g = 8
    gen = torch.Generator().manual_seed(1)
    tokens, other = (torch.randn(2, 3, 1 + g * g, 128, generator=gen) for _ in range(2))  # (B, V, 1 + g*g, C)
    grid = tokens[:, :, 1:].unflatten(2, (g, g)).flip(3).flatten(2, 3)
    mirrored = torch.cat([tokens[:, :, :1], grid], dim=2)
    ratio = {}
    for kind in ("none", "sincos"):
        cfg = tiny_config()
        cfg.encoder.grid_positions = kind
        torch.manual_seed(0)
        embedding = DynRefer(cfg).embedding.eval()
        outs = []
        for t in (tokens, mirrored, other):
            embedding.region_tokens = lambda *_, t=t: t
            outs.append(embedding(None, None, None))  # (B, Q, H)
        ratio[kind] = float((outs[0] - outs[1]).abs().max() / (outs[0] - outs[2]).abs().max())
        if kind == "sincos":
            code = embedding.positions[0]  # (1 + g*g, C)
            assert code.shape == (1 + g * g, 128) and not code[0].any()
            assert len({tuple(row.tolist()) for row in code[1:]}) == g * g  # every RoI cell its own code
            assert torch.allclose(outs[0], embedding.qformer(embedding.fusion(tokens) + code), atol=1e-6)
    assert ratio["none"] < 1e-3  # float rounding only
    assert ratio["sincos"] > 5e-3


@pytest.mark.parametrize("std", [0.02, 0.2])
def test_qformer_random_init_follows_initializer_range(std):
    from dynrefer.config import QFormerConfig
    from dynrefer.qformer import QFormer

    torch.manual_seed(0)
    q = QFormer(QFormerConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                              cross_attention_frequency=1, initializer_range=std), encoder_dim=128)
    for name, p in q.qformer.named_parameters():
        if name.endswith("weight") and p.ndim == 2:
            assert float(p.std()) == pytest.approx(std, rel=0.1), name


def test_grid_positions_reject_unknown_kinds():
    cfg = tiny_config()
    cfg.encoder.grid_positions = "learned"
    with pytest.raises(ValueError, match="grid_positions 'learned'"):
        DynRefer(cfg)


@pytest.mark.parametrize("name, low, high", [("tiny", 5e6, 2e7), ("base", 0.9e9, 1.3e9), ("paper", 3.9e9, 4.6e9)])
def test_configs_build_and_count_parameters(name, low, high):
    with torch.device("meta"):
        m = DynRefer(load_config(name))
    total, trainable = parameter_counts(m)
    assert low < total < high
    assert 0 < trainable < total


def test_recognition_matches_scoring_its_prompts_as_texts(tmp_path):
    """Category and attributes are the contrastive head's scores of the prompts, computed once per model."""
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.recognition = dataclasses.replace(cfg.recognition, categories=["circle", "square", "star"],
                                          attributes=["red", "blue"], attribute_threshold=0.0)
    m = DynRefer(cfg).eval()
    views, index, rois = batch(b=3, seed=2)
    texts = ["the circle", "the square", "the star", "the red", "the is red", "the blue", "the is blue"]
    preds = m.predict(views, index, rois, texts=texts)
    for p in preds:
        r = p.recognition
        expected = [p.text_scores[t] for t in texts]
        assert list(r.category_scores.values()) == pytest.approx(expected[:3], abs=1e-6)
        assert list(r.attribute_scores.values()) == pytest.approx([max(expected[3:5]), max(expected[5:])], abs=1e-6)
        assert r.category == max(r.category_scores, key=r.category_scores.get)
        assert r.category_score == r.category_scores[r.category]
        assert [a for a, _ in r.attributes] == sorted(r.attribute_scores, key=lambda a: -r.attribute_scores[a])
    m.cfg.recognition.attribute_threshold = 1.01
    assert all(p.recognition.attributes == [] for p in m.predict(views, index, rois))
    save_pretrained(m, str(tmp_path / "export"))
    assert load_pretrained(str(tmp_path / "export")).predict(views, index, rois) == m.predict(views, index, rois)
    assert all(p.recognition is None for p in DynRefer(tiny_config()).eval().predict(views, index, rois))
    cfg.recognition.category_prompt = "a photo"
    with pytest.raises(ValueError, match="category_prompt must contain"):
        DynRefer(cfg)


def many_region_inputs(tmp_path, mode, n=12, w=200, h=150):
    """ModelInputs for ``n`` regions of one image (as batch captioning and serving build them)."""
    import numpy as np

    from dynrefer.batching import build_inputs, load_images
    from dynrefer.preprocess import PrepareConfig, preprocess_image

    rng = np.random.default_rng(5)
    path = tmp_path / "many.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    boxes = [[float(x), float(y), float(x + rng.integers(12, 60)), float(y + rng.integers(12, 60))]
             for x, y in zip(rng.integers(0, w - 60, n), rng.integers(0, h - 60, n))]
    record = {"image_id": "many", "file": str(path), "regions": [{"region_id": str(i), "box": b}
                                                                  for i, b in enumerate(boxes)]}
    rows, errors = preprocess_image(record, path.read_bytes(), PrepareConfig(view_size=64))
    assert not errors and len(rows) == n
    return build_inputs(rows, load_images([str(path)]), tiny_config().views, 64, mode, prepared_size=64)


def test_shared_views_give_the_outputs_of_separate_views_from_fewer_encoder_rows(model, tmp_path):
    inputs = many_region_inputs(tmp_path, "fixed")  # t = 0, 0.5, 1: the t=1 view is one for all regions
    b, v = inputs.view_index.shape
    shared = tuple(torch.from_numpy(a) for a in (inputs.views, inputs.view_index, inputs.rois))
    separate = (torch.from_numpy(inputs.region_views()).flatten(0, 1), torch.arange(b * v).view(b, v), shared[2])
    encoded = []
    hook = model.encoder.register_forward_hook(lambda module, args, out: encoded.append(len(args[0])))
    model.eval()
    model.cfg.tags.threshold = 0.0  # every tag shown, so all tag scores are compared
    model.cfg.language.max_new_tokens = 6  # captions compare as well at 6 words; generation is the slow part
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared, busy cores spin far more than they compute
    try:
        regions = [model.embedding(*x) for x in (shared, separate)]
        preds = [model.predict(*x, texts=["a red circle", "a square"]) for x in (shared, separate)]
    finally:
        hook.remove()
        model.cfg.tags.threshold, model.cfg.language.max_new_tokens = 0.7, 20
        torch.set_num_threads(threads)
    assert encoded == [len(inputs.views), b * v] * 2
    assert b * v == 36 and len(inputs.views) == 36 - 11  # the t=1 view of 12 regions is encoded once
    # The same views give each region the same features; only the encoder's batch size differs, which can
    # change the last float bits of its matrix products.
    torch.testing.assert_close(regions[0], regions[1], rtol=1e-5, atol=1e-5)
    for got, want in zip(*preds):
        assert got.caption == want.caption and [t for t, _ in got.tags] == [t for t, _ in want.tags]
        assert [s for _, s in got.tags] == pytest.approx([s for _, s in want.tags], abs=1e-5)
        assert got.text_scores == pytest.approx(want.text_scores, abs=1e-5)
