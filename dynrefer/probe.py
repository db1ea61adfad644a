"""Linear probes of a frozen encoder: can a linear classifier read a region's shape, colour, pattern and size off
its embedding? (no Ray here)

DynRefer keeps its CLIP frozen, so whatever the CLIP cannot tell apart the region model never sees. A linear probe
(multinomial logistic regression on standardised features, fitted on one set of regions, scored on another) is the
usual measure of what a representation holds; held-out region -> caption retrieval mixes all facets into one number.

A *facet* is one question with a closed set of answers, read from a region's ``category`` and ``attributes`` (the
prepared rows' columns): ``category`` itself, or the attribute that belongs to a given vocabulary.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

#: Facet -> the vocabulary its answer comes from (None: the region's category).
Facets = Mapping[str, "Sequence[str] | None"]


def synthetic_facets() -> dict[str, list[str] | None]:
    """The built-in corpus's facets: shape (the category), colour, pattern and size (its three attributes)."""
    from dynrefer import synth

    return {"shape": None, "colour": list(synth.COLOURS), "pattern": list(synth.PATTERNS), "size": list(synth.SIZES)}


def facet_labels(category: str | None, attributes: Sequence[str] | None, facets: Facets) -> dict[str, str]:
    """A region's answer to each facet it has one for: its category, or its first attribute in the facet's
    vocabulary."""
    out: dict[str, str] = {}
    attrs = list(attributes) if attributes is not None else []
    for name, vocabulary in facets.items():
        if vocabulary is None:
            if category:
                out[name] = str(category)
            continue
        words = set(vocabulary)
        hit = next((str(a) for a in attrs if a in words), None)
        if hit is not None:
            out[name] = hit
    return out


def linear_probe(train_x: np.ndarray, train_y: Sequence[str], test_x: np.ndarray, test_y: Sequence[str],
                 c: float = 1.0, max_iter: int = 1000) -> float:
    """Accuracy on (test_x, test_y) of a logistic regression fitted on (train_x, train_y); features (N, D) are
    standardised with the training set's statistics. Test labels never seen in training count as errors."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(train_x) != len(train_y) or len(test_x) != len(test_y) or not len(test_y):
        raise ValueError(f"need one label per feature row and a non-empty test set, got {len(train_x)} x "
                         f"{len(train_y)} and {len(test_x)} x {len(test_y)}")
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(set(train_y.tolist())) < 2:
        return float((test_y == train_y[0]).mean()) if len(train_y) else 0.0
    scaler = StandardScaler().fit(train_x)
    model = LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(train_x), train_y)
    return float((model.predict(scaler.transform(test_x)) == test_y).mean())


def probe_scores(train_x: np.ndarray, train_labels: Sequence[Mapping[str, str]], test_x: np.ndarray,
                 test_labels: Sequence[Mapping[str, str]], facets: Sequence[str]) -> dict[str, float]:
    """Linear-probe accuracy per facet, each on the regions that have an answer for it (facets no test region
    answers are left out)."""
    scores: dict[str, float] = {}
    for name in facets:
        tr = [i for i, labels in enumerate(train_labels) if name in labels]
        te = [i for i, labels in enumerate(test_labels) if name in labels]
        if not tr or not te:
            continue
        scores[name] = linear_probe(train_x[tr], [train_labels[i][name] for i in tr], test_x[te],
                                    [test_labels[i][name] for i in te])
    return scores


def majority_baseline(train_labels: Sequence[Mapping[str, str]], test_labels: Sequence[Mapping[str, str]],
                      facets: Sequence[str]) -> dict[str, float]:
    """Accuracy of always answering the training set's most common answer, per facet: the floor a probe beats."""
    from collections import Counter

    out: dict[str, float] = {}
    for name in facets:
        counts = Counter(labels[name] for labels in train_labels if name in labels)
        answers = [labels[name] for labels in test_labels if name in labels]
        if counts and answers:
            top = counts.most_common(1)[0][0]
            out[name] = float(np.mean([a == top for a in answers]))
    return out


def parse_facets(spec: Any) -> dict[str, list[str] | None]:
    """A config's facets: ``synthetic`` (the built-in corpus's), or a mapping facet -> vocabulary list or null
    (null: the category)."""
    if spec == "synthetic":
        return synthetic_facets()
    if isinstance(spec, Mapping):
        return {str(k): (None if v is None else [str(w) for w in v]) for k, v in spec.items()}
    raise ValueError(f"probe facets: 'synthetic' or a mapping facet -> vocabulary (or null), got {spec!r}")
