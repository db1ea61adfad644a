"""Recognition prompts as the official code builds them, and their max over synonyms."""

import pytest
import torch

from dynrefer.config import RecognitionConfig
from dynrefer.recognition import RecognitionPrompts, attribute_prompts, prompts


def test_ovad_is_and_has_templates_per_synonym_with_an_empty_noun():
    cfg = RecognitionConfig(attribute_kinds={"pattern:striped/lined": "has", "color tone:dark": "has"})
    assert attribute_prompts(cfg, "color:red/reddish") == ["the red", "the is red", "the reddish", "the is reddish"]
    assert attribute_prompts(cfg, "pattern:striped/lined") == [
        "the striped pattern", "the has striped pattern", "the lined pattern", "the has lined pattern"]
    assert attribute_prompts(cfg, "color tone:dark") == ["the dark color", "the has dark color"]  # " tone" dropped
    assert attribute_prompts(cfg, "red") == ["the red", "the is red"]  # a plain word is an "is" attribute
    young = attribute_prompts(cfg, "maturity:young/baby")
    assert [p for p in young if not p.startswith("the is")] == [
        "the young", "the baby", "the kid", "the kids", "the child", "the toddler", "the boy", "the girl"]


def test_category_prompts_are_lowercased():
    cfg = RecognitionConfig(categories=["Person", "traffic light"], attributes=["red"])
    assert prompts(cfg) == ["the person", "the traffic light", "the red", "the is red"]
    with pytest.raises(ValueError, match="category_prompt"):
        RecognitionPrompts(RecognitionConfig(category_prompt="a photo"), 8)


def test_attribute_score_is_the_max_over_its_prompts_and_category_the_argmax():
    cfg = RecognitionConfig(categories=["circle", "square"], attributes=["color:red/crimson", "small"],
                            attribute_threshold=0.5)
    rec = RecognitionPrompts(cfg, 8)
    assert len(rec) == 2 + 4 + 2
    scores = torch.tensor([[0.2, 1.5, -3.0, 2.0, -1.0, 0.0, -2.0, -4.0],
                           [3.0, -1.0, -1.0, -2.0, -3.0, -5.0, 0.5, 0.1]])
    out = rec.decode(scores)
    sig = torch.sigmoid(scores)
    assert out[0].category == "square" and out[1].category == "circle"
    assert out[0].attribute_scores == pytest.approx({"color:red/crimson": float(sig[0, 3]), "small": float(sig[0, 6])})
    assert out[1].attribute_scores == pytest.approx({"color:red/crimson": float(sig[1, 2]), "small": float(sig[1, 6])})
    assert [a for a, _ in out[0].attributes] == ["color:red/crimson"]
    assert [a for a, _ in out[1].attributes] == ["small"]
