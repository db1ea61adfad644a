"""Linear probes of frozen features: labels read from categories and attributes, accuracy that tells separable
features from noise, facets scored only on regions that answer them."""

import numpy as np
import pytest

from dynrefer import synth
from dynrefer.probe import facet_labels, linear_probe, majority_baseline, parse_facets, probe_scores, synthetic_facets


def test_facet_labels_come_from_the_category_and_each_vocabulary():
    facets = synthetic_facets()
    assert facet_labels("star", ["red", "striped", "tiny"], facets) == \
        {"shape": "star", "colour": "red", "pattern": "striped", "size": "tiny"}
    assert facet_labels(None, ["striped", "purple"], facets) == {"colour": "purple", "pattern": "striped"}
    assert facet_labels("dog", None, {"kind": None, "colour": ["brown"]}) == {"kind": "dog"}
    _, objects = synth.render_scene(0, 1)
    o = objects[0]
    assert facet_labels(o["shape"], o["attributes"], facets) == {k: o[k] for k in ("shape", "colour", "pattern",
                                                                                   "size")}
    assert parse_facets({"kind": None, "colour": ["red"]}) == {"kind": None, "colour": ["red"]}
    with pytest.raises(ValueError, match="probe facets"):
        parse_facets("web")


def test_linear_probe_reads_separable_features_and_not_noise():
    rng = np.random.default_rng(0)
    classes = np.array(["a", "b", "c"])
    y = classes[rng.integers(3, size=600)]
    centres = rng.normal(size=(3, 16)) * 3
    x = centres[np.searchsorted(classes, y)] + rng.normal(size=(600, 16))
    assert linear_probe(x[:400], y[:400], x[400:], y[400:]) > 0.95
    noise = rng.normal(size=(600, 16))
    assert linear_probe(noise[:400], y[:400], noise[400:], y[400:]) < 0.5
    # a test answer never seen in training is an error, a single training class predicts itself
    assert linear_probe(x[:10], ["a"] * 10, x[:4], ["a", "a", "z", "z"]) == 0.5
    with pytest.raises(ValueError, match="one label per feature row"):
        linear_probe(x[:4], ["a"] * 3, x[:2], ["a", "b"])


def test_probe_scores_each_facet_on_the_regions_that_answer_it():
    rng = np.random.default_rng(1)
    colours = rng.integers(2, size=300)
    x = np.stack([colours * 4.0 + rng.normal(size=300), rng.normal(size=300)], axis=1)  # (300, 2)
    labels = [{"colour": "red" if c else "blue"} | ({"size": "tiny"} if i % 2 else {}) for i, c in enumerate(colours)]
    scores = probe_scores(x[:200], labels[:200], x[200:], labels[200:], ["colour", "size", "shape"])
    assert set(scores) == {"colour", "size"} and scores["colour"] > 0.95 and scores["size"] == 1.0
    base = majority_baseline(labels[:200], labels[200:], ["colour", "shape"])
    assert set(base) == {"colour"} and 0.3 < base["colour"] < 0.7
