"""Metrics of DynRefer's four tasks, each computed over a whole split at once (no Ray here).

* Region captioning: METEOR and CIDEr, by pycocoevalcap's own scorers after its PTB tokenizer, as COCO's caption
  evaluation runs them. CIDEr's document frequencies come from the references scored, so a split must be scored
  whole: the mean of per-shard CIDEr scores is a different (wrong) number.
* Dense captioning: DenseCap's mAP as its evaluator at its head computes it (jcjohnson/densecap
  ``eval/eval_utils.lua``: 30 (IoU, METEOR) pairs), see :func:`densecap_map`.
* Attribute detection: OVAD's box mAP, the mean over attributes of each attribute's average precision over the
  regions labelled for it (label -1 is ignored), see :func:`attribute_map`.
* Region recognition (given boxes): top-1 accuracy and the mean over classes of per-class average precision.

METEOR and the PTB tokenizer are Java programs shipped inside the pycocoevalcap wheel (``meteor-1.5.jar`` with
``data/paraphrase-en.gz``, ``stanford-corenlp-3.4.1.jar``); they need ``java`` on PATH. Scores are returned as
fractions (METEOR 0..1, CIDEr 0..10); papers print both times 100.
"""

from __future__ import annotations

import collections
import shutil
import threading
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

DENSECAP_IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
#: A hit needs METEOR strictly above the threshold, so 0 asks for a caption sharing something with the reference.
DENSECAP_METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)  # detection mAP (the Lua's -1) is apart
DENSECAP_MERGE_IOU = 0.7
#: ``none``: a prediction overlapping no ground truth takes nothing; ``lua``: as the reference Lua code, it marks
#: its image's last merged box as taken (Torch reads index -1 as the last element).
DENSECAP_COMPAT = ("none", "lua")
DENSECAP_PROTOCOL = ("DenseCap mAP (jcjohnson/densecap eval_utils.lua at its head): the mean AP over 30 pairs, "
                     "IoU >= .3 .4 .5 .6 .7 x METEOR > 0 .05 .1 .15 .2 .25; ground truth merged at IoU >= .7; "
                     "detection mAP (any caption) apart")


def _recall_grid() -> np.ndarray:
    """The recall thresholds of DenseCap's ``for t=0,1,0.01``: a float loop that adds 0.01 a hundred times
    overshoots 1, so it yields 100 points (0 .. 0.99, with the loop's rounding), not 101."""
    points, t = [], 0.0
    while t <= 1.0:
        points.append(t)
        t += 0.01
    return np.array(points)


_RECALL_GRID = _recall_grid()


def _clean(text: str | None) -> str:
    """One line with no METEOR field separator: a newline or '|||' inside a caption would desynchronise the
    line protocol of the java processes."""
    return " ".join((text or "").replace("|||", " ").split())


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError("METEOR and the PTB tokenizer (pycocoevalcap) run on Java, and `java` is not on PATH: "
                           "install a JRE, e.g. `apt-get install -y default-jre-headless`")


class MeteorScorer:
    """pycocoevalcap's METEOR 1.5 process, started once, scoring many batches, and always closed.

    pycocoevalcap's ``Meteor`` stops its java process only in ``__del__``, which first takes a lock that a failed
    call leaves held (a hang at garbage collection), and it never reads java's stderr. Here a thread drains stderr
    (kept for error messages), a dead process is reported with that stderr, and :meth:`close` (also on leaving a
    ``with`` block) kills the process and gives ``__del__`` a fresh lock so it cannot hang.
    """

    def __init__(self) -> None:
        _require_java()
        from pycocoevalcap.meteor.meteor import Meteor

        self._meteor: Any = Meteor()
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._drain = threading.Thread(target=self._read_stderr, args=(self._meteor.meteor_p.stderr,), daemon=True)
        self._drain.start()

    def _read_stderr(self, stream: Any) -> None:
        for line in iter(stream.readline, b""):
            self._stderr.append(line.decode(errors="replace").rstrip())

    def _failure(self, what: str) -> RuntimeError:
        self.close()
        tail = "\n".join(self._stderr)
        return RuntimeError(f"METEOR {what}" + (f"; java said:\n{tail}" if tail else ""))

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
        """(corpus METEOR, one METEOR per candidate) in one batched call; every candidate needs a reference."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        if not candidates:
            return 0.0, []
        gts: dict[int, list[str]] = {}
        for i, refs in enumerate(references):
            gts[i] = [r for r in map(_clean, refs) if r]
            if not gts[i]:
                raise ValueError(f"candidate {i} has no non-empty reference")
        res = {i: [_clean(c)] for i, c in enumerate(candidates)}
        if self._meteor is None:
            raise RuntimeError("METEOR scorer is closed")
        if self._meteor.meteor_p.poll() is not None:
            raise self._failure(f"process exited with code {self._meteor.meteor_p.returncode}")
        try:
            total, each = self._meteor.compute_score(gts, res)
        except (OSError, ValueError) as e:  # a broken pipe, or an empty line where a score should be
            raise self._failure(f"failed: {e!r}") from e
        return float(total), [float(s) for s in each]

    def close(self) -> None:
        meteor, self._meteor = self._meteor, None
        if meteor is None:
            return
        proc = meteor.meteor_p
        try:
            proc.stdin.close()
        except OSError:
            pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._drain.join(timeout=5)
        proc.stdout.close()
        proc.stderr.close()
        meteor.lock = threading.Lock()

    def __enter__(self) -> "MeteorScorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_meteor", None) is not None:
            self.close()


def ptb_tokenize(texts: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTB tokenizer (lower case, punctuation dropped) over many captions in one java call."""
    _require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keys = list(texts)
    if not any(texts.values()):
        return {k: [] for k in keys}
    tokens = PTBTokenizer().tokenize({i: [{"caption": _clean(t)} for t in texts[k]] for i, k in enumerate(keys)})
    if any(len(tokens.get(i, [])) != len(texts[k]) for i, k in enumerate(keys)):
        raise RuntimeError("PTB tokenizer returned a different number of lines than it was given")
    return {k: tokens.get(i, []) for i, k in enumerate(keys)}


def caption_scores(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                   meteor: MeteorScorer | None = None, with_meteor: bool = True) -> dict[str, Any]:
    """METEOR and CIDEr of a whole split, as COCO's caption evaluation computes them.

    Every region with a non-blank reference is scored; one without a prediction is scored as an empty caption
    and counted in ``missing_predictions``. Predictions without a reference are counted, not scored. ``meteor``
    lets callers reuse one METEOR process (its start loads a 60 MB paraphrase table); ``with_meteor=False``
    scores CIDEr alone (no "meteor" key), for frequent validation during training.
    """
    from pycocoevalcap.cider.cider import Cider

    tokens = ptb_tokenize({k: [r for r in refs if _clean(r)] for k, refs in references.items()})
    gts = {k: refs for k, refs in tokens.items() if any(refs)}  # "..." tokenizes to nothing
    ids = list(gts)
    if not ids:
        raise ValueError("no region has a reference caption")
    res = ptb_tokenize({k: [predictions.get(k) or ""] for k in ids})
    cider, _ = Cider().compute_score(gts, res)
    scores: dict[str, Any] = {}
    if with_meteor and meteor is None:
        with MeteorScorer() as own:
            scores["meteor"], _ = own.score([res[k][0] for k in ids], [gts[k] for k in ids])
    elif with_meteor:
        scores["meteor"], _ = meteor.score([res[k][0] for k in ids], [gts[k] for k in ids])
    return {
        **scores, "cider": float(cider), "regions": len(ids),
        "missing_predictions": sum(k not in predictions for k in ids),
        "extra_predictions": sum(k not in references for k in predictions),
        "regions_without_reference": len(references) - len(ids),
    }


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of ``[x1, y1, x2, y2]`` boxes with exclusive x2/y2 (DenseCap's inclusive ``+1`` pixel
    arithmetic on x, y, w, h boxes gives the same numbers)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def merge_ground_truth(boxes: np.ndarray, captions: Sequence[Sequence[str]], threshold: float = DENSECAP_MERGE_IOU
                       ) -> tuple[np.ndarray, list[list[str]]]:
    """DenseCap's merge of one image's overlapping ground truth: repeatedly take the box with the most unmerged
    boxes at IoU >= ``threshold`` (itself included; the first such box on a tie), replace that group by its mean
    box carrying all their captions. Visual Genome annotates one thing many times; merged, it is one target."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    close = box_iou(boxes, boxes) >= threshold
    np.fill_diagonal(close, True)
    remaining = np.ones(len(boxes), dtype=bool)
    merged_boxes, merged_captions = [], []
    while remaining.any():
        live = close & remaining[:, None] & remaining[None, :]
        top = int(np.argmax(live.sum(axis=1)))
        group = np.flatnonzero(live[top])
        merged_boxes.append(boxes[group].mean(axis=0))
        merged_captions.append([c for j in group for c in captions[j]])
        remaining[group] = False
    return np.array(merged_boxes).reshape(-1, 4), merged_captions


def densecap_ap(tp: np.ndarray, num_positives: int) -> float:
    """DenseCap's interpolated AP of a score-ranked list of hits: the mean over its recall grid of the best
    precision at recall >= t (0 where that recall is never reached)."""
    tp = np.asarray(tp, dtype=bool)
    if num_positives <= 0 or tp.size == 0:
        return 0.0
    hits = np.cumsum(tp)
    recall = hits / num_positives
    precision = hits / np.arange(1, tp.size + 1)
    best_after = np.maximum.accumulate(precision[::-1])[::-1]
    first = np.searchsorted(recall, _RECALL_GRID, side="left")  # recall never decreases down the list
    reached = first < tp.size
    return float(np.where(reached, best_after[np.minimum(first, tp.size - 1)], 0.0).mean())


def _meteor_key(threshold: float) -> str:
    return f"{threshold:g}"


def densecap_map(predictions: Sequence[Mapping[str, Any]], ground_truth: Sequence[Mapping[str, Any]],
                 meteor: MeteorScorer | None = None, compat: str = "none") -> dict[str, Any]:
    """DenseCap's dense captioning mAP, as the reference evaluator computes it at its head.

    ``predictions``: ``{image_id, box, caption, score}``; ``ground_truth``: ``{image_id, box, caption}`` (or
    ``captions``, a list). Boxes are ``[x1, y1, x2, y2]``. Each image's ground truth is merged
    (:func:`merge_ground_truth`); its predictions, by decreasing score, each take the merged box they overlap most
    (the first such box on a tie), and one whose box an earlier prediction took is a false positive whatever the
    thresholds. A prediction is a true positive at (IoU t, METEOR m) when that overlap is >= t and the METEOR of its
    caption against the box's captions is > m. All predictions are then ranked by score and :func:`densecap_ap`
    taken per (t, m). ``map`` is the mean over the 30 pairs m in 0 .. 0.25 (``ap``); ``det_map`` the mean over the
    5 IoU thresholds of detection AP, any caption (``det_ap``). METEOR is computed in one batched call, only for
    predictions that can be a true positive.

    Ties in score are broken by input order (a stable sort), both for which prediction takes a box and in the
    ranking; the Lua code's ``torch.sort`` is not stable beyond a handful of items, so its order on ties is
    arbitrary. ``compat="lua"`` reproduces the reference's one artifact: a prediction that overlaps no merged box
    keeps index -1, which Torch reads as the last element, so it marks its image's last merged box as taken (a
    later prediction on that box is then a false positive). The default (``"none"``) takes no box for it.
    """
    if compat not in DENSECAP_COMPAT:
        raise ValueError(f"compat must be one of {DENSECAP_COMPAT}, got {compat!r}")
    gt_by_image: dict[Any, list[Mapping[str, Any]]] = collections.defaultdict(list)
    for g in ground_truth:
        gt_by_image[g["image_id"]].append(g)
    merged: dict[Any, tuple[np.ndarray, list[list[str]]]] = {}
    for image_id, rows in gt_by_image.items():
        caps = [list(r.get("captions") or [r["caption"]]) for r in rows]
        merged[image_id] = merge_ground_truth(np.array([r["box"] for r in rows], dtype=np.float64), caps)
    num_positives = sum(len(b) for b, _ in merged.values())

    pred_by_image: dict[Any, list[int]] = collections.defaultdict(list)
    for i, p in enumerate(predictions):
        pred_by_image[p["image_id"]].append(i)
    n = len(predictions)
    scores = np.array([float(p["score"]) for p in predictions], dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"densecap: {int((~np.isfinite(scores)).sum())} predictions have a score that is not finite")
    overlap = np.zeros(n)
    free = np.zeros(n, dtype=bool)
    target: list[list[str] | None] = [None] * n
    last_box_taken_by_miss = 0
    for image_id, idx in pred_by_image.items():
        boxes, caps = merged.get(image_id, (np.zeros((0, 4)), []))
        if not len(boxes):
            continue
        order = sorted(idx, key=lambda i: -scores[i])  # stable: ties keep input order
        ious = box_iou(np.array([predictions[i]["box"] for i in order], dtype=np.float64), boxes)  # (P, M)
        taken = np.zeros(len(boxes), dtype=bool)
        for row, i in enumerate(order):
            j = int(np.argmax(ious[row]))
            if ious[row, j] <= 0:
                if compat == "lua" and not taken[-1]:
                    taken[-1] = True
                    last_box_taken_by_miss += 1
                continue
            overlap[i], free[i], target[i] = ious[row, j], not taken[j], caps[j]
            taken[j] = True

    meteor_each = np.zeros(n)
    scored = [i for i in range(n) if free[i] and overlap[i] >= min(DENSECAP_IOU_THRESHOLDS)]
    if scored:
        candidates = [str(predictions[i]["caption"] or "") for i in scored]
        references = [target[i] for i in scored]
        if meteor is None:
            with MeteorScorer() as own:
                _, each = own.score(candidates, references)
        else:
            _, each = meteor.score(candidates, references)
        meteor_each[scored] = each

    ranked = np.argsort(-scores, kind="stable")
    table: dict[str, dict[str, float]] = {}
    detection: dict[str, float] = {}
    for t in DENSECAP_IOU_THRESHOLDS:
        located = free & (overlap >= t)
        detection[f"{t:g}"] = densecap_ap(located[ranked], num_positives)
        table[f"{t:g}"] = {_meteor_key(m): densecap_ap((located & (meteor_each > m))[ranked], num_positives)
                           for m in DENSECAP_METEOR_THRESHOLDS}
    return {
        "map": float(np.mean([v for row in table.values() for v in row.values()])),
        "det_map": float(np.mean(list(detection.values()))), "ap": table, "det_ap": detection,
        "protocol": DENSECAP_PROTOCOL, "pairs": sum(len(row) for row in table.values()), "compat": compat,
        "ties": "by input order (stable sort)",
        "predictions": n, "ground_truth_regions": len(ground_truth),
        "merged_ground_truth_regions": num_positives, "images": len(gt_by_image),
        "predictions_on_images_without_ground_truth": sum(len(v) for k, v in pred_by_image.items()
                                                          if k not in merged),
        "predictions_overlapping_nothing": int(sum(1 for k, v in pred_by_image.items() if k in merged
                                                   for i in v if target[i] is None)),
        "last_box_taken_by_a_miss": last_box_taken_by_miss,
        "meteor_pairs_scored": len(scored),
    }


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the step precision-recall curve (sklearn's ``average_precision_score``, which OVAD uses):
    sum over score thresholds of (recall gain) x precision, tied scores forming one threshold. NaN without
    positives."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    positives = int(labels.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, hits = scores[order], np.cumsum(labels[order])
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # last position of each run of tied scores
    precision = hits[ends] / (ends + 1)
    recall = hits[ends] / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def attribute_map(scores: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None,
                  groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """OVAD box mAP: ``scores`` and ``labels`` are (regions, attributes); labels 1 positive, 0 negative, -1 ignored.

    Each attribute's AP ranks the regions labelled 1 or 0 for it; attributes without a positive are left out of
    the mean (and counted). ``groups`` (e.g. OVAD's head/medium/tail name lists) adds each group's mean AP.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be the same (regions, attributes)")
    names = list(names) if names is not None else [str(a) for a in range(scores.shape[1])]
    per: dict[str, float] = {}
    for a, name in enumerate(names):
        keep = labels[:, a] >= 0
        if (labels[keep, a] == 1).any():
            per[name] = average_precision(scores[keep, a], labels[keep, a] == 1)
    out: dict[str, Any] = {
        "map": float(np.mean(list(per.values()))) if per else float("nan"), "regions": int(scores.shape[0]),
        "attributes_evaluated": len(per), "attributes_without_positives": len(names) - len(per), "ap": per,
    }
    if groups:
        out["groups"] = group_means(per, groups)
    return out


def group_means(per: Mapping[str, float], groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Each group's mean of the per-attribute APs it has (NaN for a group with none)."""
    return {g: float(np.mean(v)) if (v := [per[n] for n in members if n in per]) else float("nan")
            for g, members in groups.items()}


OVAD_PROTOCOL = ("OVAD box oracle: every labelled box given; per-attribute AP (average_precision_score) over the "
                 "boxes labelled 1 or 0 for it (-1 ignored), scores clipped to [0, 1]; mAP the NaN-free mean over "
                 "attributes with a positive; head/medium/tail from each attribute's freq_set")


def ovad_attribute_map(scores: np.ndarray, labels: np.ndarray, vocabulary: Sequence[Mapping[str, Any]]
                       ) -> dict[str, Any]:
    """OVAD's box-oracle attribute evaluation: ``scores`` and ``labels`` (boxes, attributes) with columns in
    ``vocabulary`` order (OVAD's ``attributes`` entries: ``name``, and optionally ``freq_set`` and
    ``parent_type``).

    As OVAD's evaluator does, scores outside [0, 1] are clipped (counted in ``clipped_scores``), each attribute's
    AP ranks only the boxes labelled for it, and every mean skips attributes without a positive (NaN-free). The
    frequency groups (head, medium, tail) and the parent types ("color", "material", ...) get their own means.
    """
    names = [str(a["name"]) for a in vocabulary]
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(names):
        raise ValueError(f"scores {scores.shape} must be (boxes, {len(names)} attributes of the vocabulary)")
    clipped = int((np.isfinite(scores) & ((scores < 0) | (scores > 1))).sum())  # -inf: a box never scored
    frequency: dict[str, list[str]] = collections.defaultdict(list)
    types: dict[str, list[str]] = collections.defaultdict(list)
    for a in vocabulary:
        if a.get("freq_set"):
            frequency[str(a["freq_set"])].append(str(a["name"]))
        if a.get("parent_type"):
            types[str(a["parent_type"])].append(str(a["name"]))
    out = attribute_map(np.clip(scores, 0.0, 1.0), labels, names)
    out.update(frequency_groups=group_means(out["ap"], frequency), type_groups=group_means(out["ap"], types),
               clipped_scores=clipped, protocol=OVAD_PROTOCOL)
    return out


def recognition_scores(scores: np.ndarray, targets: np.ndarray, names: Sequence[str] | None = None
                       ) -> dict[str, Any]:
    """Region recognition with given boxes: ``scores`` (regions, classes), ``targets`` the class index (-1: a
    class outside the vocabulary, always wrong; so is a region scored -inf throughout). Top-1 accuracy, and mAP
    over the classes having a region."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores {scores.shape} must be (regions, classes) and targets {targets.shape} (regions,)")
    names = list(names) if names is not None else [str(c) for c in range(scores.shape[1])]
    correct = np.zeros(len(targets), dtype=bool)
    if scores.shape[1]:  # a region scored -inf for every class (one never predicted) is wrong, even for class 0
        correct = (np.argmax(scores, axis=1) == targets) & np.isfinite(scores.max(axis=1))
    per = {names[c]: average_precision(scores[:, c], targets == c) for c in range(scores.shape[1])
           if (targets == c).any()}
    return {
        "accuracy": float(correct.mean()) if len(targets) else float("nan"),
        "map": float(np.mean(list(per.values()))) if per else float("nan"),
        "regions": int(len(targets)), "classes_evaluated": len(per),
        "targets_outside_vocabulary": int((targets < 0).sum()), "ap": per,
    }
