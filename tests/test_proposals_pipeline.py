"""The proposal model's Ray Train pipeline: the Ray Data stage gives exactly the single-process examples, the job
configs load and refuse bad values, and (slow) a run on S3 trains, checkpoints, exports a loadable proposer and
resumes by rerun."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from dynrefer import storage, synth
from dynrefer.imageio import decode_image
from dynrefer.proposals import (
    Proposer,
    build_proposer,
    load_proposer,
    load_training_example,
    recall,
)
from pipelines.proposals import (
    CorpusSection,
    ProposalJob,
    RecallSection,
    as_examples,
    corpus_rows,
    decode_examples,
    proposal_config,
    shard_recall,
)
from pipelines.ray_training import WorkerSection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The tiny detector at a size where a step costs little: these tests are about plumbing, test_proposals about
#: learning.
SMALL = {"min_size": 128, "max_size": 192, "train": {"warmup_steps": 2}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """20 synthetic images: 16 train, 2 val, 2 test."""
    root = str(tmp_path_factory.mktemp("proposals-pipeline") / "corpus")
    synth.write_corpus(root, 20, seed=5, progress=False)
    return root


def small_job(root: str, **changes) -> ProposalJob:
    return dataclasses.replace(
        ProposalJob(model="tiny", model_overrides=SMALL, corpus=CorpusSection(root=root, decode_batch=4),
                    workers=WorkerSection(num=2, cpus=0.5), eval=RecallSection(max_images=8, batch_size=4)),
        **changes)


def test_job_configs_load_and_bad_values_are_refused(tmp_path):
    for name in ("train_tiny", "train_base_gpu"):
        job = ProposalJob.from_yaml(os.path.join(REPO, "configs", "proposals", f"{name}.yaml"), **{"corpus.root": "c"})
        job.validate()
        assert proposal_config(job).train.batch_size % job.workers.num == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: {root: c, shuffle: 3}\n")
    with pytest.raises(ValueError, match="shuffle"):
        ProposalJob.from_yaml(str(bad))
    with pytest.raises(ValueError, match="corpus.root"):
        ProposalJob().validate()
    with pytest.raises(ValueError, match="multiple of workers.num"):
        proposal_config(small_job("c", workers=WorkerSection(num=3)))


def test_the_ray_data_stage_gives_the_single_process_examples(corpus):
    job = small_job(corpus)
    cfg = proposal_config(job)
    rows, errors = corpus_rows(corpus, "train", None)
    assert len(rows) == 16 and errors == []
    out = decode_examples(pa.Table.from_pylist(rows[:3]), cfg.to_dict(), None)
    assert list(out["image_id"]) == [r["image_id"] for r in rows[:3]]
    for row, (image, target) in zip(rows[:3], as_examples(out)):
        record = {"file": row["file"], "regions": [{"box": b} for b in row["boxes"]]}
        ref_image, ref_target = load_training_example(record, cfg)
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and max(image.shape[1:]) <= 192
        assert torch.equal(image, ref_image)
        assert torch.equal(target["boxes"], ref_target["boxes"]) and torch.equal(target["labels"],
                                                                                 ref_target["labels"])
        assert len(target["boxes"]) == len(row["boxes"]) > 0


def test_malformed_regions_are_reported_not_dropped_silently(tmp_path, corpus):
    root = tmp_path / "broken"
    for name in ("image_data.json", "splits/train.json"):
        storage.write_bytes(str(root / name), storage.read_bytes(os.path.join(corpus, name)))
    regions = storage.read_json(os.path.join(corpus, "region_descriptions.json"))
    train = set(storage.read_json(os.path.join(corpus, "splits", "train.json")))
    entry = next(e for e in regions if e["id"] in train)
    entry["regions"][0]["width"] = "wide"
    storage.write_json(str(root / "region_descriptions.json"), regions)
    rows, errors = corpus_rows(str(root), "train", None)
    assert len(rows) == 16 and len(errors) == 1 and "width" in errors[0]
    assert sum(len(r["boxes"]) for r in rows) == sum(len(r["boxes"]) for r in corpus_rows(corpus, "train", None)[0]) - 1


def test_recall_on_streamed_images_is_recall_in_original_pixels(corpus):
    """Scoring the resized images the stage streams gives the recall of the same proposer on the original images."""
    cfg = proposal_config(small_job(corpus))
    torch.manual_seed(0)
    proposer = Proposer(build_proposer(cfg), cfg)
    rows, _ = corpus_rows(corpus, "train", None)
    batch = decode_examples(pa.Table.from_pylist(rows[:2]), cfg.to_dict(), None)
    value, boxes = shard_recall(proposer, [batch], 0.5)
    assert boxes == sum(len(r["boxes"]) for r in rows[:2])
    originals = [decode_image(storage.read_bytes(r["file"])) for r in rows[:2]]
    reference = recall([[b for b, _ in p] for p in proposer.propose_batch(originals)], [r["boxes"] for r in rows[:2]])
    assert value == pytest.approx(reference)


@pytest.mark.slow
def test_a_run_on_s3_trains_exports_and_resumes_by_rerun(ray_local, s3_server, corpus):
    from pipelines.proposals import run

    so = s3_server["storage_options"]
    storage.filesystem("s3://proposal-runs", so)[0].mkdir("proposal-runs")
    job = small_job(corpus, max_steps=6, checkpoint_every=3, log_every=3, storage_path="s3://proposal-runs/runs",
                    name="run", storage_options=so)
    out = run(job)
    assert out["checkpoint"] == "s3://proposal-runs/runs/run/checkpoint-00000006"
    state = storage.read_json(storage.join(out["checkpoint"], "train_state.json"), so)
    assert state["step"] == 6 and state["samples"] == 24 and state["resumed_from"] == []
    losses = state["losses"]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert set(state["recall"]) == {"0", "6"} and out["recall_before"] == state["recall"]["0"]
    assert 0 <= out["recall_after"] <= 1 and out["images_per_s"] > 0 and out["train_images"] == 16

    # The export loads on its own and proposes boxes for a held-out image.
    assert out["export"] == "s3://proposal-runs/runs/run/export"
    proposer = load_proposer(out["export"], so)
    image = decode_image(storage.read_bytes(corpus_rows(corpus, "test", None)[0][0]["file"]))
    boxes = proposer.propose(image)
    assert 0 < len(boxes) <= proposer.cfg.max_detections
    assert all(0 <= b[0] <= b[2] <= image.width and 0 <= b[1] <= b[3] <= image.height for b, _ in boxes)

    # Rerunning with the same storage path and name goes on from step 6.
    again = run(dataclasses.replace(job, max_steps=9))
    state = storage.read_json(storage.join(again["checkpoint"], "train_state.json"), so)
    assert again["checkpoint"].endswith("checkpoint-00000009")
    assert state["step"] == 9 and state["resumed_from"] == [6] and state["losses"][:6] == losses
    assert again["recall_before"] == out["recall_before"] and set(state["recall"]) == {"0", "6", "9"}
