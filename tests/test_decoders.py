"""The tag and region-text heads and their losses, against written-out references of the official computation."""

import math

import numpy as np
import pytest
import torch

from dynrefer.config import ContrastiveConfig, DecoderConfig, TagConfig
from dynrefer.decoders import ContrastiveHead, QueryDecoder, TagHead, asymmetric_loss, siglip_loss
from tests.gloo_workers import sharded_losses

CFG = DecoderConfig(dim=64, num_layers=2, num_heads=4)


def test_asymmetric_loss_value_and_gradient_by_hand():
    """B=2, K=3, several positives: the official ASL sums over regions and tags and its focusing weight
    ``max(p - clip, 0) ** 7`` is a constant."""
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, -3.0]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    loss = asymmetric_loss(logits, targets, gamma_neg=7, gamma_pos=0, clip=0.05)
    loss.backward()
    value, grad = 0.0, np.zeros((2, 3))
    for i in range(2):
        for k in range(3):
            p = 1 / (1 + math.exp(-float(logits[i, k].detach())))
            if targets[i, k] == 1:
                value -= math.log(p)
                grad[i, k] = -(1 - p)
            else:
                q = min(1 - p + 0.05, 1.0)
                weight = max(p - 0.05, 0.0) ** 7
                value -= weight * math.log(q)
                grad[i, k] = weight * p * (1 - p) / q if q < 1 else 0.0
    assert float(loss) == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(logits.grad.numpy(), grad, rtol=1e-10, atol=1e-14)


def bert_reference(decoder: QueryDecoder, texts: torch.Tensor, regions: torch.Tensor, heads: int) -> torch.Tensor:
    """The official tagging BERT written out: per layer cross-attention (no self-attention), dense, LN(x + .),
    exact-GELU intermediate, dense, LN(x + .); eps 1e-12. texts (K, T), regions (B, Q, R) -> (B, K, D)."""
    p = {k: v.double() for k, v in decoder.state_dict().items()}

    def lin(x, name):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def ln(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-12) * p[f"{name}.weight"] + p[f"{name}.bias"]

    memory = lin(regions.double(), "region_proj")
    b = regions.shape[0]
    x = lin(texts.double(), "text_proj").expand(b, -1, -1)
    n_layers = len({k.split(".")[2] for k in p if k.startswith("encoder.layer.")})
    for layer in range(n_layers):
        pre = f"encoder.layer.{layer}"
        q, k, v = (lin(t, f"{pre}.crossattention.self.{n}") for t, n in ((x, "query"), (memory, "key"),
                                                                        (memory, "value")))
        d = q.shape[-1] // heads
        out = torch.zeros_like(q)
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            att = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)
            out[..., s] = att @ v[..., s]
        x = ln(lin(out, f"{pre}.crossattention.output.dense") + x, f"{pre}.crossattention.output.LayerNorm")
        inter = lin(x, f"{pre}.intermediate.dense")
        inter = 0.5 * inter * (1 + torch.erf(inter / math.sqrt(2)))
        x = ln(lin(inter, f"{pre}.output.dense") + x, f"{pre}.output.LayerNorm")
    return x


def test_tag_and_text_heads_equal_the_bert_reference():
    torch.manual_seed(0)
    tag = TagHead(TagConfig(decoder=CFG, vocabulary=["a", "b", "c", "d", "e"]), text_dim=48, region_dim=32).double()
    text = ContrastiveHead(ContrastiveConfig(decoder=CFG), text_dim=48, region_dim=32).double()
    tag.eval(), text.eval()
    with torch.no_grad():
        tag.tag_embeddings.normal_()
    regions = torch.randn(3, 8, 32, dtype=torch.float64)
    texts = torch.randn(4, 48, dtype=torch.float64) * 5  # raw (not unit) text embeddings
    h = bert_reference(tag.decoder, tag.tag_embeddings, regions, 4)
    expected_tags = (h @ tag.decoder.fc.weight.double().T + tag.decoder.fc.bias.double()).squeeze(-1)
    torch.testing.assert_close(tag(regions), expected_tags, rtol=1e-9, atol=1e-10)
    h = bert_reference(text.decoder, texts, regions, 4)
    unit = h / h.norm(dim=-1, keepdim=True)
    expected_scores = (unit @ text.decoder.fc.weight.double().T + text.decoder.fc.bias.double()).squeeze(-1)
    torch.testing.assert_close(text(texts, regions), expected_scores, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(text.logits(text(texts, regions)), expected_scores * 10 - 10, rtol=1e-6, atol=1e-6)


def test_head_parameters_have_the_official_names_and_shapes():
    head = TagHead(TagConfig(decoder=DecoderConfig(), vocabulary=["x"]), text_dim=1024, region_dim=768)
    shapes = {k: tuple(v.shape) for k, v in head.decoder.state_dict().items()}
    assert shapes["text_proj.weight"] == (256, 1024) and shapes["region_proj.weight"] == (256, 768)
    assert shapes["fc.weight"] == (1, 256)
    layer = {k.removeprefix("encoder.layer.0."): v for k, v in shapes.items() if k.startswith("encoder.layer.0.")}
    assert layer == {
        "crossattention.self.query.weight": (256, 256), "crossattention.self.query.bias": (256,),
        "crossattention.self.key.weight": (256, 256), "crossattention.self.key.bias": (256,),
        "crossattention.self.value.weight": (256, 256), "crossattention.self.value.bias": (256,),
        "crossattention.output.dense.weight": (256, 256), "crossattention.output.dense.bias": (256,),
        "crossattention.output.LayerNorm.weight": (256,), "crossattention.output.LayerNorm.bias": (256,),
        "intermediate.dense.weight": (1024, 256), "intermediate.dense.bias": (1024,),
        "output.dense.weight": (256, 1024), "output.dense.bias": (256,),
        "output.LayerNorm.weight": (256,), "output.LayerNorm.bias": (256,)}
    assert {k.split(".")[2] for k in shapes if k.startswith("encoder.layer.")} == {"0", "1"}


def test_dropout_only_in_training():
    torch.manual_seed(0)
    head = ContrastiveHead(ContrastiveConfig(decoder=CFG), 48, 32)
    regions, texts = torch.randn(2, 8, 32), torch.randn(3, 48)
    head.eval()
    assert torch.equal(head(texts, regions), head(texts, regions))
    head.train()
    assert not torch.equal(head(texts, regions), head(texts, regions))


def official_siglip(head: ContrastiveHead, texts: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """One process, the whole batch: both directions, each pair scored by the head, identity labels."""
    b = len(regions)
    labels = 2 * torch.eye(b, dtype=regions.dtype) - 1
    t2r = torch.stack([head(texts[i:i + 1], regions)[:, 0] for i in range(b)])  # (text i, region j)
    r2t = torch.stack([head(texts, regions[i:i + 1])[0] for i in range(b)])  # (region i, text j)
    return 0.5 * (siglip_loss(head.logits(t2r), labels) + siglip_loss(head.logits(r2t), labels))


def _setup():
    torch.manual_seed(0)
    head = ContrastiveHead(ContrastiveConfig(decoder=CFG, init_logit_bias=0.0), 48, 32).double().eval()
    g = torch.Generator().manual_seed(1)
    return head, torch.randn(5, 48, dtype=torch.float64, generator=g), torch.randn(5, 8, 32, dtype=torch.float64,
                                                                                    generator=g)


def test_siglip_across_two_gloo_workers_equals_the_concatenated_batch():
    """Workers hold 3 and 2 regions: local texts x gathered regions and gathered texts x local regions; the
    region-weighted mean of the workers' losses is the one-process loss on all 5."""
    results = sharded_losses(_setup, [3, 2])
    head, texts, regions = _setup()
    with torch.no_grad():
        expected = float(official_siglip(head, texts, regions))
        alone = [float(head.loss(texts[:3], regions[:3])), float(head.loss(texts[3:], regions[3:]))]
    assert results[0][2] == pytest.approx(expected, rel=1e-9)
    # each worker's own loss differs from the local-batch-only loss: it saw the other worker's pairs
    assert all(abs(r[1] - a) > 1e-2 for r, a in zip(results, alone))


def test_siglip_in_one_process_is_the_official_loss():
    head, texts, regions = _setup()
    with torch.no_grad():
        assert float(head.loss(texts, regions)) == pytest.approx(float(official_siglip(head, texts, regions)),
                                                                 rel=1e-9)


def test_bert_layers_start_as_bert_and_projections_as_configured():
    """The BERT layers get BERT's init (normal .02, zero bias); the projections and fc keep PyTorch's default (as
    the official code) unless projection_init_std is set (the tiny config's choice)."""
    torch.manual_seed(0)
    official = QueryDecoder(DecoderConfig(dim=256), 1024, 768)
    q = official.encoder.layer[0].crossattention.self.query
    assert q.weight.std().item() == pytest.approx(0.02, rel=0.05) and torch.count_nonzero(q.bias) == 0
    default_std = 1 / math.sqrt(3 * 1024)  # kaiming-uniform(a=sqrt 5) of a 1024-wide input
    assert official.text_proj.weight.std().item() == pytest.approx(default_std, rel=0.05)
    small = QueryDecoder(DecoderConfig(dim=256, projection_init_std=0.02), 1024, 768)
    for proj in (small.text_proj, small.region_proj, small.fc):
        assert proj.weight.std().item() == pytest.approx(0.02, rel=0.2) and torch.count_nonzero(proj.bias) == 0


def test_the_tiny_heads_start_wider_than_bert():
    """The tiny config's heads (no trained weights to start from) draw their BERT layers at std 0.2, their
    projections still at 0.02."""
    from dynrefer.config import load_config

    cfg = load_config("tiny")
    for decoder_cfg in (cfg.tags.decoder, cfg.contrastive.decoder):
        torch.manual_seed(0)
        decoder = QueryDecoder(decoder_cfg, 128, 128)
        layer = decoder.encoder.layer[0]
        for linear in (layer.crossattention.self.key, layer.crossattention.output.dense, layer.intermediate.dense):
            assert linear.weight.std().item() == pytest.approx(0.2, rel=0.1)
        assert decoder.text_proj.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_calibrated_threshold_is_the_lowest_reaching_the_precision():
    from dynrefer.decoders import calibrated_threshold

    probs = torch.tensor([[0.955, 0.725, 0.715], [0.905, 0.745, 0.605]])
    targets = torch.tensor([[1, 0, 1], [1, 0, 0]])
    # above 0.50: 3 of 6 right; above 0.61: 3 of 5; above 0.72: 2 of 4; above 0.75: the two 0.9+ tags, both right
    assert calibrated_threshold(probs, targets, 0.5) == (0.5, 0.5, 1.0)
    assert calibrated_threshold(probs, targets, 0.55) == (0.61, 0.6, 1.0)
    assert calibrated_threshold(probs, targets, 1.0) == (0.75, 1.0, 2 / 3)
    # nothing reaches 0.9 with the truth inverted: the most precise threshold, the lowest of equals
    assert calibrated_threshold(probs, 1 - targets, 0.9) == (0.5, 0.5, 1.0)
    assert calibrated_threshold(torch.full((2, 3), 0.3), targets, 0.8) is None
