"""BLIP-2's first-stage ITC on the region queries, against a per-pair reference of BLIP-2's computation."""

import pytest
import torch
import torch.nn.functional as F

from dynrefer.qformer import QueryTextContrast
from tests.gloo_workers import sharded_losses


def reference_itc(head: QueryTextContrast, texts: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """One process, the whole batch, pair by pair: similarity = max over queries of the cosine between the projected
    query and the text, over the temperature; cross-entropy with label smoothing 0.1 written out, both directions."""
    b, eps = len(regions), 0.1
    sim = torch.zeros(b, b, dtype=regions.dtype)
    for i in range(b):
        for j in range(b):
            cosines = [F.cosine_similarity(head.vision_proj(regions[i, q]), texts[j], dim=0)
                       for q in range(regions.shape[1])]
            sim[i, j] = torch.stack(cosines).max() / head.temp.reshape(())

    def smoothed_ce(logits: torch.Tensor) -> torch.Tensor:
        logp = logits.log_softmax(dim=1)
        return torch.stack([-(1 - eps) * logp[i, i] - eps / b * logp[i].sum() for i in range(b)]).mean()

    return (smoothed_ce(sim) + smoothed_ce(sim.T)) / 2


def _setup():
    torch.manual_seed(0)
    head = QueryTextContrast(16, 12).double()
    g = torch.Generator().manual_seed(1)
    texts = torch.randn(5, 12, dtype=torch.float64, generator=g)
    regions = torch.randn(5, 4, 16, dtype=torch.float64, generator=g)
    return head, texts, regions


def test_itc_in_one_process_is_blip2s_loss_with_its_gradients():
    head, texts, regions = _setup()
    ours_regions = regions.clone().requires_grad_()
    ref_regions = regions.clone().requires_grad_()
    ours, ref = head.loss(texts, ours_regions), reference_itc(head, texts, ref_regions)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    ours.backward()
    ref.backward()
    # both directions reach the regions (the text side is frozen, so text-to-region must not be detached)
    assert torch.allclose(ours_regions.grad, ref_regions.grad, rtol=1e-8, atol=1e-12)
    assert ours_regions.grad.abs().sum() > 0


def test_itc_temperature_starts_at_blip2s_and_is_clamped():
    head, texts, regions = _setup()
    assert float(head.temp) == pytest.approx(0.07)
    with torch.no_grad():
        head.temp.fill_(3.0)
    head.loss(texts, regions)
    assert float(head.temp) == pytest.approx(0.5)


def test_a_region_whose_best_query_is_its_text_scores_better_than_a_mismatch():
    head, texts, _ = _setup()
    with torch.no_grad():
        head.vision_proj.weight.zero_()
        head.vision_proj.weight[:, :12] = torch.eye(12, dtype=torch.float64)
        head.vision_proj.bias.zero_()
        head.temp.fill_(0.1)
    g = torch.Generator().manual_seed(2)
    regions = torch.randn(5, 4, 16, dtype=torch.float64, generator=g) * 0.01
    regions[:, 2, :12] = texts  # query 2 of region i points at text i
    matched, mismatched = float(head.loss(texts, regions)), float(head.loss(texts, regions.roll(1, 0)))
    assert matched < 1.0 < 3 * matched < mismatched


def test_itc_across_two_gloo_workers_equals_the_concatenated_batch():
    results = sharded_losses(_setup, [3, 2])
    head, texts, regions = _setup()
    with torch.no_grad():
        expected = float(reference_itc(head, texts, regions))
    assert results[0][2] == pytest.approx(expected, rel=1e-9)
