"""Encoder pre-training: the pure pieces (distinct captions, crops, loss, retrieval, checkpoint files), then a real
Ray Train run on the synthetic corpus whose open_clip checkpoint retrieves held-out captions far better than the
random initialisation, resumes, and loads into DynRefer as a frozen encoder."""

import dataclasses
import math
import os

import numpy as np
import open_clip
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))

from dynrefer import storage  # noqa: E402
from dynrefer.config import load_config  # noqa: E402
from dynrefer.pretraining import (ContrastivePretrainer, caption_facets, caption_key, distinct_captions,  # noqa: E402
                                  facet_text, pick_crops, retrieval_scores, save_clip, step_texts,
                                  synthetic_text_facets)
from pipelines.pretrain import AugmentSection, PretrainJob, ProbeSection, TextSection, stage_settings  # noqa: E402
from pipelines.ray_training import WorkerSection  # noqa: E402
from pipelines.train_job import EvalSection, OptimizerSection, PreparedData, ScheduleSection, TrainJob  # noqa: E402


def tiny_encoder():
    return load_config("tiny").encoder


# --- fast: the pure pieces -----------------------------------------------------------------------------------------

def test_distinct_captions_across_ranks_are_unique_and_equal_sized():
    per_rank = [["A red  circle", "a blue square", "a red circle", "a green star"],
                ["a blue square", "a pink heart", "a cyan ring", "a pink heart"]]
    keep = [distinct_captions(per_rank, r) for r in (0, 1)]
    assert keep == [[0, 3], [0, 1]]  # turns: r0 red circle, r1 blue square, r0 green star, r1 pink heart, r0 out
    kept = [caption_key(per_rank[r][i]) for r in (0, 1) for i in keep[r]]
    assert len(set(kept)) == len(kept) == 4
    assert distinct_captions([["x", "X", "y"]], 0) == [0, 2]
    # Few distinct texts (short phrases) are shared out evenly, not all kept by the first rank.
    shapes = [["the star", "the ring", "the heart", "the cross"]] * 2
    assert [len(distinct_captions(shapes, r)) for r in (0, 1)] == [2, 2]
    assert {shapes[r][i] for r in (0, 1) for i in distinct_captions(shapes, r)} == set(shapes[0])


def test_caption_facets_read_the_subject_only():
    facets = synthetic_text_facets()
    assert caption_facets("a small red star with stripes left of the green cross", facets) == \
        {"colour": "red", "pattern": "striped", "shape": "star"}  # not the neighbour's green cross
    assert caption_facets("the dotted pink heart beside a black ring", facets) == \
        {"colour": "pink", "pattern": "dotted", "shape": "heart"}
    assert caption_facets("a man in a hat", facets) == {}
    assert facet_text({"colour": "red", "shape": "star"}, ("shape", "colour"), facets.order) == "the red star"
    assert facet_text({"colour": "red"}, ("shape",), facets.order) is None
    assert len(facets.subsets()) == 7 and facets.subsets()[-1] == ("colour", "pattern", "shape")


def test_step_texts_name_one_set_of_facets_per_step_without_false_negatives():
    from dynrefer import synth

    captions = [o["caption"] for i in range(1, 9) for o in synth.render_scene(0, i)[1]]
    facets = synthetic_text_facets()
    values = [caption_facets(c, facets) for c in captions]
    steps = [step_texts(captions, facets, 0.25, np.random.default_rng([0, s])) for s in range(60)]
    full = [texts == captions for texts in steps]
    assert 5 <= sum(full) <= 25  # about a quarter of the steps keep the captions
    words = set()
    for texts in (t for t, f in zip(steps, full) if not f):
        named = {len(t.split()) for t in texts}
        assert len(named) == 1 and all(t.startswith("the ") for t in texts)  # one set of facets for the whole step
        keep = distinct_captions([texts], 0)
        for i in keep:  # every other kept text differs from region i's own in a facet that text names
            for j in keep:
                if i != j:
                    assert texts[j] != facet_text(values[i], [f for f in facets.order
                                                              if values[j][f] in texts[j].split()], facets.order)
        words |= {w for t in texts for w in t.split()[1:]}
    assert words & set(synth.SHAPES) and words & set(synth.COLOURS) and words & set(synth.PATTERNS)
    # The same generator state draws the same texts (every rank must), and no facets means captions.
    assert step_texts(captions, facets, 0.25, np.random.default_rng(7)) == \
        step_texts(captions, facets, 0.25, np.random.default_rng(7))
    assert step_texts(captions, None, 0.0, np.random.default_rng(0)) == captions
    # A caption without the chosen facets keeps itself.
    assert step_texts(["a man in a hat"], facets, 0.0, np.random.default_rng(0)) == ["a man in a hat"]


def test_pick_crops_takes_t0_or_the_larger_view():
    views = np.stack([np.full((6, 4, 4, 3), v, dtype=np.uint8) for v in (0, 1)], axis=1)  # (6, 2, 4, 4, 3)
    rng = np.random.default_rng(0)
    assert (pick_crops(views, 0.0, rng) == 0).all()
    assert (pick_crops(views, 1.0, rng) == 1).all()
    mixed = pick_crops(np.repeat(views, 100, axis=0), 0.3, rng)[:, 0, 0, 0]
    assert mixed.shape == (600,) and 0.2 < mixed.mean() < 0.4
    assert (pick_crops(views[:, :1], 1.0, rng) == 0).all()  # one view: always t=0
    with pytest.raises(ValueError, match="B, V, S, S, 3"):
        pick_crops(views[0], 0.5, rng)


def test_retrieval_scores_ranks_each_region_among_distinct_captions():
    eye = torch.eye(4)
    captions = ["a", "b", "c", "d"]
    perfect = retrieval_scores(eye, eye, captions)
    assert perfect["recall@1"] == 1.0 and perfect["mean_rank"] == 1.0 and perfect["candidates"] == 4
    shifted = retrieval_scores(eye, eye[[1, 2, 3, 0]], captions)  # every region matches the next caption best
    assert shifted["recall@1"] == 0.0 and shifted["mean_rank"] > 1
    # Two regions sharing a caption share one candidate: the duplicate's own text is not a rival.
    same = retrieval_scores(eye[[0, 0, 2]], eye[[0, 1, 2]], ["a", "A", "c"])
    assert same["candidates"] == 2 and same["recall@1"] == 1.0
    with pytest.raises(ValueError, match="one image and one text"):
        retrieval_scores(eye, eye, ["a"])


def test_loss_is_open_clips_clip_loss_and_training_lowers_it():
    torch.manual_seed(0)
    model = ContrastivePretrainer(tiny_encoder())
    images = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    captions = ["a red circle", "a blue square", "a green star", "a pink heart", "a cyan ring", "a brown cross"]
    out = model(images, captions)
    image, text = model.features(images, captions)
    logits = math.exp(model.clip.logit_scale.item()) * image @ text.T
    target = torch.arange(6)
    cross_entropy = torch.nn.functional.cross_entropy
    manual = (cross_entropy(logits, target) + cross_entropy(logits.T, target)) / 2
    assert out["loss"].item() == pytest.approx(manual.item(), rel=1e-5)
    assert float(out["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = out["loss"].item()
    for _ in range(15):
        loss = model(images, captions)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model(images, captions)["loss"].item() < 0.5 * first
    with torch.no_grad():
        model.clip.logit_scale.fill_(10.0)
    assert float(model(images, captions)["logit_scale"]) == pytest.approx(100.0)  # clamped as open_clip trains


@pytest.mark.parametrize("name", ["clip.safetensors", "clip.pt"])
def test_checkpoint_is_an_ordinary_open_clip_checkpoint(tmp_path, name):
    from dynrefer.encoder import build_clip, model_config

    torch.manual_seed(1)
    trained = ContrastivePretrainer(tiny_encoder()).clip
    path = str(tmp_path / name)
    save_clip(trained, path)
    fresh = build_clip(tiny_encoder(), model_config(tiny_encoder()))
    open_clip.load_checkpoint(fresh, path, weights_only=True)  # strict
    for (key, a), b in zip(fresh.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), key
    with pytest.raises(ValueError, match="ends with"):
        save_clip(trained, str(tmp_path / "clip.ckpt"))


def test_configs_wire_pretraining_into_training(tmp_path):
    gpu = PretrainJob.from_yaml(os.path.join(REPO, "configs", "pretrain", "base_gpu.yaml"))
    gpu.validate()
    assert gpu.workers.use_gpu and gpu.precision == "bf16" and gpu.export_uri.endswith("/clip.safetensors")
    job = PretrainJob.from_yaml(os.path.join(REPO, "configs", "pretrain", "tiny.yaml"))
    job.validate()
    train = TrainJob.from_yaml(os.path.join(REPO, "configs", "train", "tiny.yaml"))
    assert train.model_overrides["encoder"]["checkpoint"] == job.export_uri == "demo/runs/pretrain-tiny/clip.safetensors"
    assert job.data.prepared == train.data.prepared
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {prepared: [x]}\naugment: {larger: 0.5, candiate_ts: [0.1]}\n")
    with pytest.raises(ValueError, match="candiate_ts"):
        PretrainJob.from_yaml(str(bad))
    with pytest.raises(ValueError, match="probability"):
        PretrainJob(data=PreparedData(prepared=["x"]), augment=AugmentSection(larger=2.0)).validate()
    with pytest.raises(ValueError, match="ends with"):
        PretrainJob(data=PreparedData(prepared=["x"]), export="clip.ckpt").validate()
    assert job.text.resolved() is not None and job.probe.facets == "synthetic"
    with pytest.raises(ValueError, match="one non-negative weight per set"):
        PretrainJob(data=PreparedData(prepared=["x"]), text=TextSection(facets="synthetic", weights=[1.0])).validate()
    with pytest.raises(ValueError, match="text.facets"):
        PretrainJob(data=PreparedData(prepared=["x"]), text=TextSection(facets="web")).validate()
    with pytest.raises(ValueError, match="probe facets"):
        PretrainJob(data=PreparedData(prepared=["x"]), probe=ProbeSection(facets="colours")).validate()
    train_stage, val_stage = stage_settings(job, 64, 64)  # the tiny config shows t=0 crops only
    assert (train_stage.mode, train_stage.views["num_views"], train_stage.views["candidate_ts"]) == ("train", 1, [])
    assert (val_stage.mode, val_stage.views["num_views"], val_stage.views["fixed_ts"]) == ("fixed", 1, [0.0])
    larger = dataclasses.replace(job, augment=AugmentSection(larger=0.3, candidate_ts=[0.1, 0.2, 0.3]))
    train_stage, _ = stage_settings(larger, 64, 64)
    assert (train_stage.views["num_views"], train_stage.views["candidate_ts"]) == (2, [0.1, 0.2, 0.3])


# --- slow: a real run on a local Ray cluster -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The synthetic corpus (60 images), prepared at 64 px by the prepare stage's own shard function."""
    from dynrefer import datasets, synth
    from dynrefer.preprocess import PrepareConfig
    from pipelines.prepare import PrepareJob, prepare_shard

    base = tmp_path_factory.mktemp("pretrain")
    root, out = str(base / "synth"), str(base / "prepared")
    synth.write_corpus(root, 60, seed=3, progress=False)
    job = PrepareJob(dataset="vg", root=root, out=out, prepare=PrepareConfig(view_size=64))
    records = list(datasets.read_visual_genome(root))
    for index in range(0, len(records), 20):
        summary = prepare_shard(index // 20, records[index:index + 20], job)
        assert summary["regions"] == summary["input_regions"]
    storage.write_json(os.path.join(out, "manifest.json"), {"prepare": dataclasses.asdict(job.prepare)})
    return out


def heldout(prepared_dir):
    """Every val region's t=0 crop (as the batching module cuts it) and caption."""
    import pyarrow.parquet as pq

    from dynrefer.batching import build_inputs, load_images
    from dynrefer.config import ViewConfig

    rows = [r for r in pq.read_table(os.path.join(prepared_dir, "regions")).to_pylist() if r["split"] == "val"]
    inputs = build_inputs(rows, load_images(r["file"] for r in rows), ViewConfig(num_views=1, fixed_ts=[0.0]), 64,
                          "fixed", prepared_size=64)
    return torch.from_numpy(inputs.region_views()[:, 0]), inputs.captions


@pytest.mark.slow
def test_pretrained_clip_retrieves_heldout_captions_resumes_and_loads_frozen(ray_local, s3_server, prepared, tmp_path,
                                                                              monkeypatch):
    from safetensors.torch import load_file

    from dynrefer.config import DynReferConfig
    from dynrefer.model import DynRefer
    from pipelines.pretrain import run

    images, captions = heldout(prepared)
    assert len(captions) >= 40
    job = PretrainJob(
        data=PreparedData(prepared=[prepared], shuffle_buffer=64, decode_workers=1, decode_batch=64, decode_cpus=0.25,
                          read_cpus=0.1),
        augment=AugmentSection(larger=0.3, candidate_ts=[0.1, 0.2]), batch_size=32, max_steps=40, seed=0,
        optimizer=OptimizerSection(lr=2e-3, weight_decay=0.1, betas=[0.9, 0.98]),
        schedule=ScheduleSection(warmup_steps=5, warmup_min_ratio=0.1, min_ratio=0.1),
        workers=WorkerSection(num=2, cpus=0.5), log_every=10, checkpoint_every=20, max_failures=3,
        eval=EvalSection(every=-1), storage_path=str(tmp_path / "runs"), name="pt")
    # Retries to spare, as in test_train: on a loaded machine Ray Train may end a healthy attempt, which then
    # resumes from the last checkpoint.
    out = run(job)
    assert out["checkpoint"].endswith("checkpoint-00000040") and out["metrics"]["step"] == 40
    assert math.isfinite(out["metrics"]["loss"])

    torch.manual_seed(job.seed)  # the run's initial weights
    model = ContrastivePretrainer(tiny_encoder())
    before = retrieval_scores(*model.embed(images, captions), captions)
    model.clip.load_state_dict(load_file(out["export"]))
    after = retrieval_scores(*model.embed(images, captions), captions)
    assert after["mean_rank"] < 0.5 * before["mean_rank"], (before, after)
    assert after["recall@5"] > before["recall@5"] + 0.1, (before, after)

    # Rerun with the same storage path and name: it resumes from step 40, scores the held-out slice at the end
    # and exports to s3.
    so = s3_server["storage_options"]
    storage.filesystem("s3://pretrained", so)[0].mkdir("pretrained")
    again = run(dataclasses.replace(job, max_steps=44, eval=EvalSection(every=0, max_regions=1000, batch_size=64),
                                    probe=ProbeSection(facets="synthetic", max_train=400),
                                    export="s3://pretrained/tiny/clip.safetensors", storage_options=so))
    # The linear probe of the final encoder is in the last report, one accuracy per facet.
    assert {f"val_probe_{f}" for f in ("shape", "colour", "pattern", "size")} <= set(again["metrics"])
    assert again["metrics"]["val_probe_colour"] > 0.5  # colour is linearly legible even early
    state = storage.read_json(storage.join(again["checkpoint"], "train_state.json"))
    assert state["step"] == 44 and state["resumed_from"][-1] == 40 and state["mode"] == "ddp"
    # The run's own held-out score is the one its exported checkpoint gives here, on the same regions.
    monkeypatch.setenv("DYNREFER_CACHE", str(tmp_path / "cache"))
    model.clip.load_state_dict(load_file(storage.local_copy(again["export"], so)))
    final = retrieval_scores(*model.embed(images, captions), captions)
    assert again["metrics"]["val_regions"] == len(captions)
    assert again["metrics"]["val_mean_rank"] == pytest.approx(final["mean_rank"], rel=0.02)
    assert again["metrics"]["val_recall@1"] == pytest.approx(final["recall@1"], abs=1.5 / len(captions))

    # DynRefer takes it as any real checkpoint: built from encoder.checkpoint (on s3), frozen, tensors equal.
    cfg = load_config("tiny")
    cfg.encoder.checkpoint = again["export"]
    cfg.tags.vocabulary = ["red", "circle"]
    dynrefer = DynRefer(DynReferConfig.from_dict(cfg.to_dict()), storage_options=so)
    weights = load_file(storage.local_copy(again["export"], so))
    clip = dynrefer.encoder.clip
    assert not any(p.requires_grad for p in clip.parameters()) and not clip.training
    state_dict = clip.state_dict()
    assert sorted(state_dict) == sorted(weights)
    # DynRefer promotes scalar parameters (the CLIP's logit scale) to shape (1,) for DeepSpeed: same values.
    assert all(torch.equal(state_dict[k], weights[k].reshape(state_dict[k].shape)) for k in weights)
    assert state_dict["logit_scale"].numel() == 1
