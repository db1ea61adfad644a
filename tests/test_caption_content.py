"""Reading synthetic-corpus captions back into their slots, and scoring generated captions slot by slot."""

import math

import pytest

from dynrefer import synth
from dynrefer.caption_content import CONFLICT, CaptionContent, content_scores, parse_caption, region_truth


@pytest.mark.parametrize("text, expected", [
    ("a small red striped star", CaptionContent("star", "red", "striped", "small", grammatical=True)),
    ("the dotted blue hexagon", CaptionContent("hexagon", "blue", "dotted", None, grammatical=True)),
    ("large green cross that is solid", CaptionContent("cross", "green", "solid", "large", grammatical=True)),
    ("a tiny pink heart with zigzags", CaptionContent("heart", "pink", "zigzag", "tiny", grammatical=True)),
    ("the white ring covered in speckles", CaptionContent("ring", "white", "speckled", None, grammatical=True)),
    # relations, in each phrasing family; the longest phrase wins ("to the left of", not "left of")
    ("a medium yellow checkered arrow to the left of the black crescent",
     CaptionContent("arrow", "yellow", "checkered", "medium", "left of", "black", "crescent", True)),
    ("the red square with checks beneath a cyan diamond",
     CaptionContent("square", "red", "checkered", None, "below", "cyan", "diamond", True)),
    ("purple solid circle close to the orange pentagon",
     CaptionContent("circle", "purple", "solid", None, "near", "orange", "pentagon", True)),
    ("A Brown Triangle, covered in dots; on the right of the green star.",
     CaptionContent("triangle", "brown", "dotted", None, "right of", "green", "star", True)),
    # partial and wrong captions a model may write
    ("a red star", CaptionContent("star", "red", None, None, grammatical=False)),
    ("striped", CaptionContent(None, None, "striped", None)),
    ("a red blue star star", CaptionContent("star", CONFLICT, None, None)),
    ("a small large striped dotted heart", CaptionContent("heart", None, CONFLICT, CONFLICT)),
    ("a red striped star next to", CaptionContent("star", "red", "striped", None, "next to", None, None, False)),
    ("a red striped star beside the blue", CaptionContent("star", "red", "striped", None, "next to", "blue", None)),
    ("", CaptionContent()),
    (None, CaptionContent()),
])
def test_parse_caption(text, expected):
    assert parse_caption(text) == expected


def test_every_corpus_caption_parses_to_its_object():
    # the corpus's own captions (all five noun-phrase forms, every relation phrasing) read back exactly
    seen_relations = set()
    for image_id in range(1, 13):
        _, objects = synth.render_scene(0, image_id)
        for obj in objects:
            got = parse_caption(obj["caption"])
            assert got.grammatical, obj["caption"]
            assert (got.shape, got.colour, got.pattern) == (obj["shape"], obj["colour"], obj["pattern"])
            assert got.size in (None, obj["size"])
            if obj["mentions_relation"]:
                rel = obj["relation"]
                assert (got.relation, got.neighbour) == (rel["relation"], (rel["colour"], rel["shape"]))
                seen_relations.add(got.relation)
            else:
                assert got.relation is None
    assert len(seen_relations) >= 4


def test_the_corpus_own_captions_score_their_ceiling():
    # the corpus's captions against their regions' truth: everything they name is right, but the grammar
    # leaves the size out of some, so all_four is the share naming a size
    refs, preds = [], {}
    for image_id in range(1, 9):
        for o in synth.render_scene(0, image_id)[1]:
            refs.append({"image_id": str(image_id), "region_id": str(o["object_id"]), "caption": o["caption"],
                         "category": o["shape"], "attributes": o["attributes"], "tags": []})
            preds[(str(image_id), str(o["object_id"]))] = {"caption": o["caption"]}
    out = content_scores(refs, preds)
    named_size = sum(parse_caption(r["caption"]).size is not None for r in refs) / len(refs)
    assert 0 < named_size < 1 and out["all_four"] == pytest.approx(named_size)
    assert out["all_four_size_optional"] == 1.0 and out["grammatical"] == 1.0
    assert all(v["precision"] == 1.0 for v in out["slots"].values())
    assert out["slots"]["relation"]["correct"] == 1.0 and out["slots"]["shape"]["correct"] == 1.0


def reference(region_id, caption, shape, colour, pattern, size, tags):
    return {"image_id": "1", "region_id": region_id, "caption": caption, "category": shape,
            "attributes": [colour, pattern, size], "tags": tags}


REFERENCES = [
    reference("a", "a small red striped star left of the blue cross", "star", "red", "striped", "small",
              ["star", "red", "striped", "cross"]),
    reference("b", "the green heart with dots", "heart", "green", "dotted", "large", ["heart", "green", "dot"]),
    reference("c", "a tiny white solid ring above a black square", "ring", "white", "solid", "tiny",
              ["ring", "white", "square"]),
    reference("d", "purple zigzag crescent", "crescent", "purple", "zigzag", "medium", ["crescent", "purple"]),
]
PREDICTIONS = {
    # all four right, relation and neighbour right
    ("1", "a"): {"caption": "a small red striped star to the left of the blue cross", "tags": ["star", "red"],
                 "category": "star", "attributes": ["red", "striped", "small"],
                 "attribute_scores": {"red": 0.9, "blue": 0.2, "striped": 0.8, "solid": 0.1, "small": 0.7}},
    # the wrong shape, no size named (the reference caption names none, but the truth is "large")
    ("1", "b"): {"caption": "the green star with dots", "tags": ["star", "green", "dot"], "category": "star",
                 "attributes": ["green"], "attribute_scores": {"green": 0.6, "red": 0.7, "dotted": 0.9}},
    # relation right, neighbour's shape wrong; colour named twice
    ("1", "c"): {"caption": "a tiny white black solid ring over a black circle", "tags": [], "category": "ring",
                 "attributes": ["white", "solid", "tiny"]},
    # "d" has no prediction: it says nothing
}


def test_content_scores_by_hand():
    out = content_scores(REFERENCES, PREDICTIONS)
    assert out["regions"] == 4 and out["missing_predictions"] == 1 and out["regions_with_relation"] == 2
    slots = out["slots"]
    # shape: a, c right (b names star for a heart); colour: a, b (c conflicts); pattern: a, b, c; size: a, c
    assert {s: slots[s]["correct"] for s in ("shape", "colour", "pattern", "size")} == \
        pytest.approx({"shape": 0.5, "colour": 0.5, "pattern": 0.75, "size": 0.5})
    assert slots["shape"]["named"] == pytest.approx(0.75) and slots["shape"]["precision"] == pytest.approx(2 / 3)
    assert slots["size"]["named"] == pytest.approx(0.5) and slots["size"]["precision"] == pytest.approx(1.0)
    assert slots["colour"]["named"] == pytest.approx(0.75)  # a conflict is named, and wrong
    assert out["all_four"] == pytest.approx(0.25)  # only a
    assert out["all_four_size_optional"] == pytest.approx(0.25)  # b names no size, but the wrong shape
    # relation: a (left of), c (above, said as "over"); neighbour: a only
    assert slots["relation"] == pytest.approx({"correct": 1.0, "named": 1.0, "precision": 1.0})
    assert slots["neighbour"] == pytest.approx({"correct": 0.5, "named": 1.0, "precision": 0.5})
    assert out["grammatical"] == pytest.approx(0.5)  # a and b
    # tags: predicted {star, red} + {star, green, dot} = 5, of which star, red, green, dot are right (4);
    # reference 4 + 3 + 3 + 2 = 12
    assert out["tags"]["precision"] == pytest.approx(4 / 5) and out["tags"]["recall"] == pytest.approx(4 / 12)
    assert out["tags"]["f1"] == pytest.approx(2 * 0.8 * (1 / 3) / (0.8 + 1 / 3))
    assert out["category_accuracy"] == pytest.approx(0.5)  # a, c
    # attributes, best-scored of each slot: a all right; b red (.7 > green .6) wrong, dotted right, no size;
    # c from its list: white, solid, tiny all right; d nothing
    assert out["attribute_accuracy"] == pytest.approx(
        {"colour": 0.5, "pattern": 0.75, "size": 0.5, "all_three": 0.5, "exact_set": 0.5})


def test_region_truth_and_bad_references():
    truth = region_truth(REFERENCES[1])
    assert (truth.shape, truth.colour, truth.pattern, truth.size, truth.relation) == \
        ("heart", "green", "dotted", "large", None)
    assert region_truth(REFERENCES[0]).neighbour == ("blue", "cross")
    with pytest.raises(ValueError, match="not a synthetic-corpus region"):
        region_truth({"image_id": "1", "region_id": "x", "caption": "a man riding a horse", "category": "person",
                      "attributes": []})
    with pytest.raises(ValueError, match="not in the corpus's grammar"):
        region_truth({**REFERENCES[0], "caption": "a red star"})
    with pytest.raises(ValueError, match="no reference"):
        content_scores([], {})


def test_no_prediction_at_all_is_all_wrong():
    out = content_scores(REFERENCES, {})
    assert out["all_four"] == 0.0 and out["slots"]["shape"]["correct"] == 0.0
    assert math.isnan(out["slots"]["shape"]["precision"]) and math.isnan(out["tags"]["precision"])
    assert out["tags"]["recall"] == 0.0 and out["missing_predictions"] == 4
