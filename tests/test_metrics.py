"""Metrics on hand-computed cases. METEOR runs the real java scorer, started once for the module."""

import threading

import numpy as np
import pytest

from dynrefer import metrics


@pytest.fixture(scope="module")
def meteor():
    scorer = metrics.MeteorScorer()
    proc = scorer._meteor.meteor_p
    yield scorer
    scorer.close()
    assert proc.returncode is not None  # the java process is gone, not leaked


def test_average_precision_of_a_known_ranking():
    # positives at ranks 1, 3, 5: precisions 1, 2/3, 3/5
    ap = metrics.average_precision([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 1])
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # a tie is one threshold: (recall .5, precision 1) then (recall 1, precision 2/3)
    assert metrics.average_precision([0.9, 0.5, 0.5], [1, 1, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert metrics.average_precision([0.9, 0.5, 0.5], [1, 0, 1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert np.isnan(metrics.average_precision([0.3, 0.2], [0, 0]))


def test_densecap_ap_uses_its_100_point_recall_grid():
    # 3 positives, hits at ranks 1 and 3: precision 1 up to recall 1/3 (t = 0 .. 0.33: 34 points),
    # 2/3 up to recall 2/3 (t = 0.34 .. 0.66: 33 points), 0 beyond (0.67 .. 0.99); 100 points in all
    assert metrics.densecap_ap(np.array([1, 0, 1, 0], bool), 3) == pytest.approx((34 + 33 * 2 / 3) / 100)
    assert metrics.densecap_ap(np.array([1], bool), 1) == pytest.approx(1.0)
    assert metrics.densecap_ap(np.array([0, 0], bool), 2) == 0.0


def test_merge_takes_the_largest_group_first_and_is_not_transitive():
    # IoUs: A-B 10/13, B-C 13/17, C-D 17/22 are >= .7; A-C, B-D are not.
    # Neighbour counts A 2, B 3, C 3, D 2: B (first of the largest) takes A, B, C; D stays alone.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 13], [0, 0, 10, 17], [0, 0, 10, 22]], float)
    merged, captions = metrics.merge_ground_truth(boxes, [["a"], ["b"], ["c"], ["d"]])
    assert captions == [["a", "b", "c"], ["d"]]
    np.testing.assert_allclose(merged, [[0, 0, 10, 40 / 3], [0, 0, 10, 22]])
    far = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float)
    assert metrics.merge_ground_truth(far, [["x"], ["y"]])[1] == [["x"], ["y"]]


GROUND_TRUTH = [  # image a: three separate boxes, one of them (G3) never predicted
    {"image_id": "a", "box": [0, 0, 100, 100], "caption": "a red car"},
    {"image_id": "a", "box": [200, 0, 300, 100], "caption": "a man riding a horse"},
    {"image_id": "a", "box": [400, 0, 500, 100], "caption": "blue sky"},
]


def dense_predictions(third_caption):
    return [
        {"image_id": "a", "box": [0, 0, 100, 65], "caption": "a red car", "score": 0.9},  # IoU .65 with G1
        {"image_id": "a", "box": [0, 0, 100, 80], "caption": "a red car", "score": 0.8},  # G1 already taken
        {"image_id": "a", "box": [200, 0, 245, 100], "caption": third_caption, "score": 0.7},  # IoU .45 with G2
        {"image_id": "a", "box": [600, 600, 700, 700], "caption": "grass", "score": 0.6},  # overlaps nothing
        {"image_id": "b", "box": [0, 0, 10, 10], "caption": "grass", "score": 0.5},  # image without ground truth
    ]


def test_densecap_map_by_hand(meteor):
    # 3 positives. IoU .3/.4: hits at ranks 1, 3 -> (34 + 33 * 2/3) / 100 = .56; IoU .5/.6: rank 1 only -> .34;
    # IoU .7: none -> 0. Captions match exactly (METEOR 1), so every METEOR column equals the "any" one.
    out = metrics.densecap_map(dense_predictions("a man riding a horse"), GROUND_TRUTH, meteor=meteor)
    expected = {"0.3": 0.56, "0.4": 0.56, "0.5": 0.34, "0.6": 0.34, "0.7": 0.0}
    for iou, ap in expected.items():
        assert out["ap"][iou] == pytest.approx(dict.fromkeys(["0", "0.05", "0.1", "0.15", "0.2", "0.25"], ap))
    assert out["det_ap"] == pytest.approx(expected) and out["pairs"] == 30
    assert out["map"] == pytest.approx(0.36) and out["det_map"] == pytest.approx(0.36)
    assert out["merged_ground_truth_regions"] == 3 and out["predictions_on_images_without_ground_truth"] == 1
    assert out["meteor_pairs_scored"] == 2


def test_densecap_meteor_threshold_flips_a_hit(meteor):
    # The third prediction's caption shares no word with its box's caption: METEOR 0, so it is a hit for
    # detection (.56 at IoU .3/.4) and a miss from METEOR > 0 on (.34): 0 is a threshold, not "any caption".
    out = metrics.densecap_map(dense_predictions("zebra grazing"), GROUND_TRUTH, meteor=meteor)
    assert out["det_ap"]["0.3"] == pytest.approx(0.56)
    assert out["ap"]["0.3"]["0"] == pytest.approx(0.34)
    assert out["ap"]["0.3"]["0.05"] == pytest.approx(0.34)
    assert out["ap"]["0.4"]["0.25"] == pytest.approx(0.34)
    assert out["det_map"] == pytest.approx(0.36)
    assert out["map"] == pytest.approx((0.34 * 4 + 0.0) / 5)


def test_densecap_merged_ground_truth_is_one_positive(meteor):
    # Two annotations of one thing (IoU .9) merge into box [0, 0, 100, 95] with both captions;
    # one prediction there matching the second caption finds everything: AP 1 at every threshold.
    gt = [{"image_id": "a", "box": [0, 0, 100, 100], "caption": "a red car"},
          {"image_id": "a", "box": [0, 0, 100, 90], "caption": "a blue bus"}]
    pred = [{"image_id": "a", "box": [0, 0, 100, 95], "caption": "a blue bus", "score": 1.0}]
    out = metrics.densecap_map(pred, gt, meteor=meteor)
    assert out["merged_ground_truth_regions"] == 1
    assert out["map"] == pytest.approx(1.0) and out["det_map"] == pytest.approx(1.0)


# Two images. Image a: two annotations of one car (IoU .9) merge into M1 = [0, 0, 100, 95] with both captions,
# then M2, the image's last merged box. Image b: one box. 3 positives in all.
TWO_IMAGES_GT = [
    {"image_id": "a", "box": [0, 0, 100, 100], "caption": "a red car"},
    {"image_id": "a", "box": [0, 0, 100, 90], "caption": "a blue bus"},
    {"image_id": "a", "box": [200, 0, 300, 100], "caption": "a man riding a horse"},
    {"image_id": "b", "box": [0, 0, 50, 50], "caption": "blue sky"},
]


def two_image_predictions(tie_order=("zebra grazing", "blue sky")):
    first, second = tie_order
    return [
        {"image_id": "a", "box": [600, 600, 700, 700], "caption": "grass", "score": 0.95},  # overlaps nothing
        {"image_id": "a", "box": [0, 0, 100, 95], "caption": "a blue bus", "score": 0.9},  # M1, IoU 1
        {"image_id": "a", "box": [200, 0, 255, 100], "caption": "a man riding a horse", "score": 0.8},  # M2, IoU .55
        {"image_id": "b", "box": [0, 0, 50, 50], "caption": first, "score": 0.7},  # tied; the first takes the box
        {"image_id": "b", "box": [0, 0, 50, 50], "caption": second, "score": 0.7},
    ]


def densecap_expected(caption_hits, detection_hits):
    """Worked by hand below: AP at IoU .3/.4/.5 and at .6/.7, for captions (all METEOR thresholds alike) and
    detection."""
    caption = dict(zip(["0.3", "0.4", "0.5", "0.6", "0.7"], [caption_hits[0]] * 3 + [caption_hits[1]] * 2))
    detection = dict(zip(["0.3", "0.4", "0.5", "0.6", "0.7"], [detection_hits[0]] * 3 + [detection_hits[1]] * 2))
    return caption, detection


def check_densecap(out, caption, detection):
    for iou, ap in caption.items():
        assert out["ap"][iou] == pytest.approx(dict.fromkeys(["0", "0.05", "0.1", "0.15", "0.2", "0.25"], ap))
    assert out["det_ap"] == pytest.approx(detection)
    assert out["map"] == pytest.approx(sum(caption.values()) / 5)
    assert out["det_map"] == pytest.approx(sum(detection.values()) / 5)


def test_densecap_two_images_both_modes(meteor):
    # Ranked by score (ties in input order): p1 miss (.95), p2 M1 exact (.9), p3 M2 at IoU .55 exact (.8),
    # p4 b "zebra grazing" (.7, METEOR 0), p5 b "blue sky" (.7, box already taken by p4: a false positive).
    # AP on DenseCap's 100-point grid, 3 positives (precision at rank k = hits / k):
    #   hits at ranks 2, 3, 4: recall 1 reached at precision 3/4 -> .75 at every point
    #   hits at ranks 2, 3:    precision 2/3 up to recall 2/3 (67 points) -> .67 * 2/3
    #   hits at ranks 2, 4:    precision 1/2 (rank 2 and rank 4) up to recall 2/3 -> .67 * 1/2 = .335
    #   hit at rank 2 alone:   precision 1/2 up to recall 1/3 (34 points) -> .17
    # Default mode: p3 is a hit up to IoU .5; p4 is a hit for detection only (METEOR 0 is not > 0).
    out = metrics.densecap_map(two_image_predictions(), TWO_IMAGES_GT, meteor=meteor)
    check_densecap(out, *densecap_expected((0.67 * 2 / 3, 0.17), (0.75, 0.335)))
    assert out["map"] == pytest.approx(0.336) and out["det_map"] == pytest.approx(0.584)
    assert out["merged_ground_truth_regions"] == 3 and out["ground_truth_regions"] == 4
    assert out["predictions_overlapping_nothing"] == 1 and out["last_box_taken_by_a_miss"] == 0
    assert out["compat"] == "none" and out["pairs"] == 30

    # Lua mode: p1's best-match index stays -1 and marks a's last merged box (M2) taken, so p3 is a false
    # positive: detection hits at ranks 2, 4 (.335 everywhere), captions at rank 2 alone (.17).
    lua = metrics.densecap_map(two_image_predictions(), TWO_IMAGES_GT, meteor=meteor, compat="lua")
    check_densecap(lua, *densecap_expected((0.17, 0.17), (0.335, 0.335)))
    assert lua["map"] == pytest.approx(0.17) and lua["det_map"] == pytest.approx(0.335)
    assert lua["last_box_taken_by_a_miss"] == 1

    # Ties: with "blue sky" first in the input, it takes b's box and is a hit for captions too.
    swapped = metrics.densecap_map(two_image_predictions(("blue sky", "zebra grazing")), TWO_IMAGES_GT,
                                   meteor=meteor)
    check_densecap(swapped, *densecap_expected((0.75, 0.335), (0.75, 0.335)))
    assert swapped["map"] == pytest.approx(0.584)
    swapped_lua = metrics.densecap_map(two_image_predictions(("blue sky", "zebra grazing")), TWO_IMAGES_GT,
                                       meteor=meteor, compat="lua")
    check_densecap(swapped_lua, *densecap_expected((0.335, 0.335), (0.335, 0.335)))


def test_densecap_lua_artifact_needs_a_free_last_box(meteor):
    # The miss comes after the prediction that took M2: the last box is taken already and nothing changes.
    preds = two_image_predictions()
    preds[0]["score"] = 0.1
    # ranks: p2 (.9) hit, p3 (.8) hit up to IoU .5, p4, p5 (.7), p1 (.1) miss
    # detection: hits at 1, 2, 3 (.3-.5) -> 1.0; hits 1, 3 (.6/.7) -> precision 1 to recall 1/3 (34 points),
    # 2/3 to recall 2/3 (33 points) -> (34 + 33 * 2/3) / 100 = .56
    for compat in ("none", "lua"):
        out = metrics.densecap_map(preds, TWO_IMAGES_GT, meteor=meteor, compat=compat)
        assert out["det_ap"] == pytest.approx({"0.3": 1.0, "0.4": 1.0, "0.5": 1.0, "0.6": 0.56, "0.7": 0.56})
        assert out["ap"]["0.3"]["0"] == pytest.approx(0.67) and out["ap"]["0.7"]["0.25"] == pytest.approx(0.34)
        assert out["last_box_taken_by_a_miss"] == 0
    with pytest.raises(ValueError, match="compat"):
        metrics.densecap_map(preds, TWO_IMAGES_GT, meteor=meteor, compat="torch")


def test_ovad_box_oracle():
    vocabulary = [{"id": 0, "name": "color:red", "freq_set": "head", "parent_type": "color"},
                  {"id": 1, "name": "texture:wet", "freq_set": "tail", "parent_type": "texture"},
                  {"id": 2, "name": "texture:furry", "freq_set": "tail", "parent_type": "texture"}]
    labels = np.array([[1, 0, -1], [0, 1, -1], [1, -1, 0], [0, 0, 0]])
    # scores above 1 are clipped to 1: region 1's 1.5 ties region 0's 1.0 for red
    scores = np.array([[1.0, 0.2, 0.5], [1.5, 0.7, 0.1], [0.3, 0.9, 0.4], [0.1, 0.6, 0.3]])
    out = metrics.ovad_attribute_map(scores, labels, vocabulary)
    # red: a tie of (1, 0) at the top -> precision 1/2 at recall 1/2, then (1) at .3 -> 2/3 at recall 1:
    # .5 * .5 + .5 * 2/3 = 7/12. wet: region 2 unlabelled, 1 (.7) first of 1, 0, 0 -> 1. furry: no positive.
    assert out["ap"] == pytest.approx({"color:red": 7 / 12, "texture:wet": 1.0})
    assert out["map"] == pytest.approx((7 / 12 + 1) / 2)
    assert out["frequency_groups"] == pytest.approx({"head": 7 / 12, "tail": 1.0})
    assert out["type_groups"] == pytest.approx({"color": 7 / 12, "texture": 1.0})
    assert out["clipped_scores"] == 1 and out["attributes_without_positives"] == 1
    with pytest.raises(ValueError, match="3 attributes"):
        metrics.ovad_attribute_map(scores[:, :2], labels[:, :2], vocabulary)


def test_caption_scores_match_pycocoevalcap(meteor):
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {1: ["A man riding a horse.", "a person on a horse"], 2: ["A red car parked."],
            3: ["Blue sky, white clouds"]}
    same = {1: "a man riding a horse", 2: "a red car parked", 3: "blue sky white clouds"}
    other = {1: "zebra grazing", 2: "kitchen sink", 3: "wooden table"}
    good = metrics.caption_scores(same, refs, meteor=meteor)
    bad = metrics.caption_scores(other, refs, meteor=meteor)
    assert good["meteor"] > 0.9 and bad["meteor"] < 0.05
    assert good["cider"] > bad["cider"] and bad["cider"] == pytest.approx(0.0)

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": r} for r in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in same.items()})
    assert good["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert good["meteor"] == pytest.approx(meteor.score([res[k][0] for k in refs], [gts[k] for k in refs])[0])

    # a missing prediction is scored as an empty caption and counted
    partial = metrics.caption_scores({1: same[1], 2: same[2], 9: "x"}, refs, meteor=meteor)
    blank = metrics.caption_scores({1: same[1], 2: same[2], 3: ""}, refs, meteor=meteor)
    assert partial["missing_predictions"] == 1 and partial["extra_predictions"] == 1
    assert (partial["cider"], partial["meteor"]) == pytest.approx((blank["cider"], blank["meteor"]))


def test_meteor_dead_process_is_an_error_not_a_hang(monkeypatch):
    # java dies while pycocoevalcap's Meteor holds its lock: the call fails with an error, the process is reaped,
    # and Meteor.__del__ (which takes that lock) returns instead of hanging
    scorer = metrics.MeteorScorer()
    inner = scorer._meteor
    proc, held = inner.meteor_p, inner.lock
    proc.kill()
    monkeypatch.setattr(proc, "poll", lambda: None)  # as if it died after the liveness check
    with pytest.raises(RuntimeError, match="METEOR failed"):
        scorer.score(["a cat"], [["a cat"]])
    assert held.locked() and proc.returncode is not None
    finalizer = threading.Thread(target=inner.__del__, daemon=True)
    finalizer.start()
    finalizer.join(timeout=10)
    assert not finalizer.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score(["a cat"], [["a cat"]])


def test_attribute_map_ignores_unlabelled_regions():
    labels = np.array([[1, 0, -1], [0, 1, -1], [1, -1, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.2, 0.5], [0.8, 0.7, 0.1], [0.3, 0.9, 0.4], [0.1, 0.6, 0.3]])
    out = metrics.attribute_map(scores, labels, ["red", "wet", "furry"], {"head": ["red"], "tail": ["wet", "furry"]})
    # red: ranking 1, 0, 1, 0 -> (1 + 2/3) / 2. wet: the top-scored region is unlabelled (-1) and left out,
    # leaving 1, 0, 0 -> 1. furry: no positive, not in the mean.
    assert out["ap"] == pytest.approx({"red": 5 / 6, "wet": 1.0})
    assert out["map"] == pytest.approx(11 / 12)
    assert out["groups"] == pytest.approx({"head": 5 / 6, "tail": 1.0})
    assert out["attributes_without_positives"] == 1


def test_recognition_accuracy_and_map():
    scores = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [-np.inf] * 3])
    targets = np.array([0, 0, 1, -1, 0])  # region 4's class is outside the vocabulary; region 5 was not predicted
    out = metrics.recognition_scores(scores, targets, ["cat", "dog", "car"])
    assert out["accuracy"] == pytest.approx(1 / 5)
    # cat: ranking 1, 0, 1, 0, 1 -> (1 + 2/3 + 3/5) / 3; dog: 0, 1, ... -> 1/2; car has no region
    assert out["ap"] == pytest.approx({"cat": 34 / 45, "dog": 0.5})
    assert out["map"] == pytest.approx((34 / 45 + 0.5) / 2)
    assert out["targets_outside_vocabulary"] == 1
