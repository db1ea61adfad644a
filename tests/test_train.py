"""Ray Train + DeepSpeed on a real local Ray cluster: learning, checkpoints, resume, fault tolerance, ZeRO/DDP parity.

The corpus is a hand-made Visual Genome layout of coloured shapes, prepared by the prepare stage's own shard
function with split labels. End-to-end tests are ``slow``; DeepSpeed's CPU ops are JIT-built once into
TORCH_EXTENSIONS_DIR (default .cache/torch_extensions here).
"""

import dataclasses
import io
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))

from dynrefer import datasets, storage  # noqa: E402
from dynrefer.config import merge  # noqa: E402
from dynrefer.preprocess import PrepareConfig  # noqa: E402
from pipelines.prepare import PrepareJob, prepare_shard, summarize  # noqa: E402
from pipelines.ray_training import FaultSection, WorkerSection  # noqa: E402
from pipelines.steppers import deepspeed_config  # noqa: E402
from pipelines.train_data import caption_words  # noqa: E402
from pipelines.train_job import DataSection, EvalSection, OptimizerSection, ScheduleSection, TrainJob  # noqa: E402

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(draw, shape, box, color):
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        x1, y1, x2, y2 = box
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=color)


def write_shapes_corpus(root, num_images=54, seed=0):
    """Images of 4 shapes each; every shape is a region captioned "a <size> <color> <shape>"; 2/3 train, 1/3 val."""
    rng = np.random.default_rng(seed)
    images, entries = [], []
    for image_id in range(1, num_images + 1):
        w, h = 96, 96
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(180, 250, 3)))
        draw = ImageDraw.Draw(img)
        regions = []
        for i, (x, y) in enumerate([(4, 4), (50, 4), (4, 50), (50, 50)]):
            size = "large" if rng.random() < 0.5 else "small"
            side = 40 if size == "large" else 20
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            draw_shape(draw, shape, (x, y, x + side, y + side), COLORS[color])
            regions.append({"region_id": image_id * 10 + i, "image_id": image_id, "x": x, "y": y, "width": side,
                            "height": side, "phrase": f"a {size} {color} {shape}"})
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        storage.write_bytes(os.path.join(root, "images", f"{image_id}.jpg"), buf.getvalue())
        images.append({"image_id": image_id, "width": w, "height": h, "url": "", "coco_id": None, "flickr_id": None})
        entries.append({"id": image_id, "regions": regions})
    storage.write_json(os.path.join(root, "image_data.json"), images)
    storage.write_json(os.path.join(root, "region_descriptions.json"), entries)
    cut = num_images * 2 // 3
    storage.write_json(os.path.join(root, "splits", "train.json"), list(range(1, cut + 1)))
    storage.write_json(os.path.join(root, "splits", "val.json"), list(range(cut + 1, num_images + 1)))


def prepare_corpus(root, out, view_size=64, images_per_shard=8):
    """Prepared shards (with split labels) as the prepare stage writes them, plus tags.json and the manifest.

    The stage's own shard function, without the Ray Data job around it: the corpus is small and time is short.
    """
    job = PrepareJob(dataset="vg", root=root, out=out, prepare=PrepareConfig(view_size=view_size))
    records = list(datasets.read_visual_genome(root))  # labelled with their split from root/splits/
    shards = [records[i:i + images_per_shard] for i in range(0, len(records), images_per_shard)]
    for index, shard in enumerate(shards):
        prepare_shard(index, shard, job)
    storage.write_json(os.path.join(out, "manifest.json"), {"prepare": dataclasses.asdict(job.prepare)})
    summary = summarize(job, len(shards), sum(len(r["regions"]) for r in records), 1.0)
    assert summary["balanced"] and summary["regions"] == 4 * len(records)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    write_shapes_corpus(str(base / "vg"))
    return prepare_corpus(str(base / "vg"), str(base / "prepared"))


def small_job(prepared, tmp, **kw):
    """A short 2-worker run: 8 regions per worker per step, 9 steps per epoch of the 144 train regions."""
    fields = dict(
        model="tiny", data=DataSection(prepared=[prepared], shuffle_buffer=0, deterministic=True, decode_workers=1,
                                       decode_batch=32, decode_cpus=0.25, read_cpus=0.1),
        batch_size=8, max_steps=8, seed=0, log_every=1, checkpoint_every=4, keep_checkpoints=2,
        optimizer=OptimizerSection(lr=1e-3, weight_decay=0.05, grad_clip=1.0),
        schedule=ScheduleSection(warmup_steps=2, warmup_min_ratio=0.5, min_ratio=0.1),
        workers=WorkerSection(num=2, cpus=0.5), eval=EvalSection(every=0, max_regions=16, batch_size=8),
        storage_path=str(tmp / "runs"), name="run", max_failures=0,
        model_overrides={"language": {"max_new_tokens": 6, "num_beams": 1}},
    )
    fields.update(kw)
    return TrainJob(**fields)


def scalars(log_dir, tag):
    """(step, value) pairs of one TensorBoard scalar, across every event file of the directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


# --- fast: configuration ------------------------------------------------------------------------------------------

def test_deepspeed_configs_are_filled_from_the_training_config():
    job = TrainJob(batch_size=12, grad_accum=3, max_steps=500, precision="bf16",
                   optimizer=OptimizerSection(lr=3e-4, weight_decay=0.1, grad_clip=0.5),
                   schedule=ScheduleSection(warmup_steps=40, min_ratio=0.02))
    for stage in (0, 2, 3):
        cfg = deepspeed_config(dataclasses.replace(job, deepspeed=f"configs/deepspeed/zero{stage}.json"))
        assert cfg["zero_optimization"]["stage"] == stage
        assert cfg["train_micro_batch_size_per_gpu"] == 12 and cfg["gradient_accumulation_steps"] == 3
        assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                                 "weight_decay": 0.1}}
        assert cfg["scheduler"]["params"]["total_num_steps"] == 500
        assert cfg["scheduler"]["params"]["warmup_num_steps"] == 40 and cfg["gradient_clipping"] == 0.5
        assert cfg["torch_autocast"]["enabled"] is True
        assert '"auto"' not in json.dumps(cfg)


def test_lavis_epoch_cosine_schedule_steps_once_per_epoch_on_both_engines():
    """epoch_cosine (the official schedule): epoch 0 at the base lr, then (1 + cos(pi e / E)) / 2 per epoch."""
    import torch

    from pipelines.steppers import lr_scheduler

    job = TrainJob(optimizer=OptimizerSection(lr=1e-4), max_steps=20,
                   schedule=ScheduleSection(type="epoch_cosine", steps_per_epoch=4, epochs=5))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = lr_scheduler(optimizer, job)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-4 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5) for _ in range(4)]
    assert lrs == pytest.approx(expected)
    assert lrs[:4] == [1e-4] * 4 and lrs[-1] == pytest.approx(1e-4 * 0.0955, rel=1e-3)
    assert "scheduler" not in deepspeed_config(job)  # DeepSpeed gets it as a client scheduler
    with pytest.raises(ValueError, match="steps_per_epoch"):
        ScheduleSection(type="epoch_cosine")
    with pytest.raises(ValueError, match="schedule.type"):
        ScheduleSection(type="linear")


@pytest.mark.parametrize("name", ["tiny", "tiny_qformer", "base_gpu", "paper_gpu", "refcocog_ft_gpu"])
def test_training_configs_load(name):
    job = TrainJob.from_yaml(os.path.join(REPO, "configs", "train", f"{name}.yaml"))
    job.validate()
    deepspeed_config(job)
    if not name.startswith("tiny"):
        assert job.workers.use_gpu and job.precision == "bf16" and job.workers.num >= 8


def test_the_tiny_model_trains_from_its_qformer_run():
    """The demo's two runs: the first trains the embedding by ITC with the two heads beside (no LM), the second
    starts from its export with DynRefer's losses (its ITC projection left behind)."""
    first, second = (TrainJob.from_yaml(os.path.join(REPO, "configs", "train", f"{n}.yaml"))
                     for n in ("tiny_qformer", "tiny"))
    assert first.model_overrides["loss"] == {"caption": 0.0, "tags": 0.05, "contrastive": 0.5, "itc": 1.0}
    assert first.eval.every == -1 and second.init_from.endswith(os.path.join("qformer-tiny", "export"))
    assert second.model_overrides["loss"]["itc"] == 0.0


def test_init_from_a_missing_export_says_what_to_run(tmp_path):
    from pipelines.train import model_config

    job = dataclasses.replace(TrainJob.from_yaml(os.path.join(REPO, "configs", "train", "tiny.yaml")),
                              init_from=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="no export there.*tiny_qformer.yaml"):
        model_config(job, None)


def test_init_from_a_qformer_run_keeps_its_embedding_and_drops_its_itc_head(tmp_path):
    import torch

    from dynrefer.checkpoint import save_pretrained
    from dynrefer.config import DynReferConfig
    from pipelines.train import build_model
    from pipelines.train_job import resolved_model_config

    words = ["a", "red", "blue", "circle", "square"]
    stage1 = resolved_model_config("tiny", {"loss": {"caption": 0.0, "tags": 0.0, "contrastive": 0.0, "itc": 1.0}})
    stage1.tags.vocabulary, stage1.language.vocabulary = ["red", "circle"], words
    model = build_model(stage1, 0, None)
    assert model.itc is not None
    views = torch.randint(0, 255, (4, 64, 64, 3), dtype=torch.uint8)
    rois = torch.tensor([[0.0, 0.0, 64.0, 64.0], [8.0, 8.0, 40.0, 40.0], [0.0, 0.0, 64.0, 64.0]]).expand(2, 3, 4)
    losses = model(views, torch.tensor([[0, 1, 2], [3, 1, 2]]), rois, ["a red circle", "a blue square"],
                   [["red", "circle"], []])
    assert set(losses) == {"itc", "loss"} and float(losses["loss"]) == float(losses["itc"]) > 0
    save_pretrained(model, str(tmp_path / "export"))

    stage2 = merge(stage1.to_dict(), {"loss": {"caption": 1.0, "tags": 0.01, "contrastive": 0.5, "itc": 0.0}})
    started = build_model(DynReferConfig.from_dict(stage2), 1, None, init_from=str(tmp_path / "export"))
    assert started.itc is None
    for name, tensor in model.embedding.qformer.state_dict().items():
        assert torch.equal(started.embedding.qformer.state_dict()[name], tensor), name
    assert torch.equal(started.embedding.fusion.mlp[0].weight, model.embedding.fusion.mlp[0].weight)
    from safetensors.torch import save_file

    from dynrefer.checkpoint import saved_state

    save_file({**saved_state(model), "stray.weight": torch.zeros(1)}, str(tmp_path / "export" / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected"):  # other leftovers are still refused
        build_model(DynReferConfig.from_dict(stage2), 1, None, init_from=str(tmp_path / "export"))


def test_unknown_keys_and_bad_values_are_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {prepared: [x], shufle_buffer: 3}\n")
    with pytest.raises(ValueError, match="shufle_buffer"):
        TrainJob.from_yaml(str(path))
    with pytest.raises(ValueError, match="precision"):
        TrainJob(data=DataSection(prepared=["x"]), precision="fp16").validate()


def test_tag_calibration_only_for_a_trained_tag_head_and_only_on_rank_0():
    """With the tag loss off (caption-only training) the head's scores mean nothing; off rank 0 there are no rows."""
    import torch

    from dynrefer.config import DynReferConfig
    from pipelines.train import calibrate_tags, tag_head_trained

    cfg = DynReferConfig()
    cfg.tags.vocabulary = ["red", "circle"]
    assert tag_head_trained(cfg)
    cfg.loss.tags = 0.0
    assert not tag_head_trained(cfg)
    module = SimpleNamespace(cfg=cfg)
    assert calibrate_tags(module, None, 0.8) == {} and cfg.tags.threshold == 0.7
    rows = [(torch.tensor([[0.95, 0.615]]), torch.tensor([[1.0, 0.0]])),  # two batches of one region each
            (torch.tensor([[0.9, 0.3]]), torch.tensor([[1.0, 0.0]]))]
    chosen = calibrate_tags(module, rows, 0.8)  # above 0.61 only the two right tags remain
    assert chosen == {"tag_threshold": 0.62, "val_tag_precision": 1.0, "val_tag_recall": 1.0}
    assert cfg.tags.threshold == 0.62


def test_words_cider_and_merge():
    from dynrefer.metrics import caption_scores

    def cider(predictions, references):
        scores = caption_scores(predictions, references, with_meteor=False)
        assert "meteor" not in scores
        return scores["cider"]

    assert caption_words(["A red circle.", "a blue circle"]) == ["a", "circle", ".", "blue", "red"]
    references = {"1": ["a red circle"], "2": ["a blue square"]}
    assert cider({"1": "a red circle", "2": "a blue square"}, references) > \
        cider({"1": "a blue square", "2": "a red circle"}, references)
    assert merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}, "d": 3}


# --- slow: real runs on a local Ray cluster ----------------------------------------------------------------------

def checkpoint_state(checkpoint, so=None):
    return storage.read_json(storage.join(checkpoint, "train_state.json"), so)


@pytest.mark.slow
def test_zero2_on_s3_learns_survives_a_killed_worker_resumes_by_rerun_and_exports(ray_local, s3_server, prepared,
                                                                                   tmp_path):
    from dynrefer.batching import build_inputs, load_images
    from dynrefer.checkpoint import load_pretrained
    from dynrefer.tags import TagVocabulary
    from pipelines.train import run

    so = s3_server["storage_options"]
    storage.filesystem("s3://train-runs", so)[0].mkdir("train-runs")
    marker = tmp_path / "rank1-killed"
    log_dir = str(tmp_path / "tensorboard")
    # Retries to spare: on a loaded machine Ray Train's placement-group cleaner can take the controller for dead
    # when the state API does not answer, and end a healthy attempt (it resumes from the last checkpoint).
    job = small_job(prepared, tmp_path, max_steps=8, checkpoint_every=4, max_failures=3, eval=EvalSection(every=-1),
                    storage_path="s3://train-runs/runs", storage_options=so, tensorboard_dir=log_dir,
                    fault=FaultSection(rank=1, after_step=4, marker=str(marker)))
    out = run(job)
    # Rank 1 exited after step 4; Ray Train restarted the workers, which went on from the step-4 checkpoint.
    assert marker.exists()
    assert out["checkpoint"] == "s3://train-runs/runs/run/checkpoint-00000008"
    state = checkpoint_state(out["checkpoint"], so)
    assert state["step"] == 8 and 4 in state["resumed_from"] and state["samples"] == 8 * 16
    files = set(storage.listdir(storage.join(out["checkpoint"], "deepspeed"), so))
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files  # each rank's part of the ZeRO-2 state
    loss, caption = scalars(log_dir, "train/loss"), scalars(log_dir, "train/caption")
    assert [s for s, _ in loss] == list(range(1, 9))  # every step once: no step was redone, none skipped
    values = [v for _, v in loss]
    assert all(math.isfinite(v) for v in values)
    assert np.mean(values[-2:]) < np.mean(values[:2])
    assert caption[-1][1] < 0.6 * caption[0][1]

    # Rerunning with the same storage path and name resumes from the latest checkpoint (here: to train on,
    # scoring the val slice at the end and choosing the export's tag threshold on it: the slice is the whole split).
    again = run(dataclasses.replace(job, max_steps=12, eval=EvalSection(every=0, max_regions=1000, batch_size=8,
                                                                          tag_precision=0.5)))
    state = checkpoint_state(again["checkpoint"], so)
    assert state["step"] == 12 and state["resumed_from"][-1] == 8
    assert [s for s, _ in scalars(log_dir, "train/loss")] == list(range(1, 13))
    kept = [d for d in storage.listdir("s3://train-runs/runs/run", so) if d.startswith("checkpoint-")]
    assert kept == ["checkpoint-00000008", "checkpoint-00000012"]
    assert np.isfinite(again["metrics"]["val_cider"]) and again["metrics"]["throughput"] > 0
    assert [s for s, _ in scalars(log_dir, "val/cider")] == [12]

    # The export loads on its own and captions regions of held-out images.
    assert again["export"] == "s3://train-runs/runs/run/export"
    model = load_pretrained(again["export"], so)
    assert model.cfg.tags.vocabulary == TagVocabulary.load(os.path.join(prepared, "tags.json")).tags
    import pyarrow.parquet as pq
    import torch

    from dynrefer.decoders import calibrated_threshold

    val_rows = [r for r in pq.read_table(os.path.join(prepared, "regions")).to_pylist() if r["split"] == "val"]
    inputs = build_inputs(val_rows, load_images(r["file"] for r in val_rows), model.cfg.views, model.cfg.image_size,
                          "phash", prepared_size=64)
    model.eval()
    with torch.no_grad():
        x = [torch.from_numpy(a) for a in (inputs.views, inputs.view_index, inputs.rois)]
        probs = torch.sigmoid(model.tags(model.embedding(*x)))
    chosen = calibrated_threshold(probs, model.tags.targets([r["tags"] for r in val_rows]), 0.5)
    assert model.cfg.tags.threshold == (chosen[0] if chosen else 0.7)
    rows = val_rows[:4]
    inputs = build_inputs(rows, load_images(r["file"] for r in rows), model.cfg.views, model.cfg.image_size, "phash",
                          prepared_size=64)
    preds = model.predict(*(torch.from_numpy(a) for a in (inputs.views, inputs.view_index, inputs.rois)),
                          texts=["a red circle"])
    assert len(preds) == 4
    words = set(model.cfg.language.vocabulary)
    for p in preds:
        assert p.caption and set(p.caption.split()) <= words
        assert all(t in model.cfg.tags.vocabulary for t, _ in p.tags) and 0 <= p.text_scores["a red circle"] <= 1


def parity_loop(config):
    """Three steps on the same three batches under ZeRO-0, ZeRO-2, ZeRO-3 and DDP, each from the same seed.

    Reports every step's losses, and from rank 0 how far each mode's trained weights (gathered as the export
    gathers them) are from DDP's, and whether captioning works with each mode's (gathered) parameters.
    """
    import random
    import tempfile

    import ray.train
    import ray.train.torch
    import torch

    from dynrefer.checkpoint import saved_state
    from dynrefer.config import DynReferConfig
    from pipelines.ray_training import all_mean
    from pipelines.steppers import build_stepper, tensors
    from pipelines.train import LOSSES, build_model
    from pipelines.train_data import train_batches

    job = TrainJob.from_dict(config["job"])
    cfg = DynReferConfig.from_dict(config["model"])
    rank = ray.train.get_context().get_world_rank()
    batches = []
    for inputs in train_batches(ray.train.get_dataset_shard("train"), job, rank):
        batches.append(inputs)
        if len(batches) == 3:
            break
    device = ray.train.torch.get_device()
    losses, weights, captions = {}, {}, {}
    for name in ("zero0", "zero2", "zero3", "ddp"):
        run_job = dataclasses.replace(job, ddp=name == "ddp", deepspeed=f"configs/deepspeed/{name}.json"
                                      if name != "ddp" else job.deepspeed)
        stepper = build_stepper(run_job, build_model(cfg, job.seed, None),
                                None if run_job.ddp else deepspeed_config(run_job), device)
        random.seed(rank)
        torch.manual_seed(rank)
        losses[name] = [all_mean({k: float(v) for k, v in stepper.train_step(b, device)[0].items()}, LOSSES)
                        for b in batches]
        with stepper.gathered():
            weights[name] = {k: v.clone() for k, v in saved_state(stepper.module).items()}
            stepper.module.eval()
            captions[name] = [p.caption for p in stepper.module.predict(*tensors(batches[0], device))]
    def norm(a, b):
        return math.sqrt(sum(float((a[k].float() - b[k].float()).square().sum()) for k in a))

    distance = {name: norm(w, weights["ddp"]) for name, w in weights.items()}  # L2 over all exported tensors
    moved = norm(weights["ddp"], saved_state(build_model(cfg, job.seed, None)))
    result = {"losses": losses, "distance": distance, "moved": moved, "captions": captions,
              "keys": {name: sorted(w) == sorted(weights["ddp"]) for name, w in weights.items()}}
    # Ray Train keeps the metrics that come with a checkpoint, so rank 0 reports one.
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "parity.json"), "w") as f:
            json.dump(result, f)
        ray.train.report({"parity": json.dumps(result)},
                         checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)


@pytest.mark.slow
def test_zero_stages_and_ddp_give_the_same_first_steps(ray_local, prepared, tmp_path):
    import ray.cloudpickle
    import sys

    from pipelines.train import run

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    out = run(small_job(prepared, tmp_path, max_steps=3, name="parity", eval=EvalSection(every=-1), max_failures=2),
              train_fn=parity_loop)
    parity = json.loads(out["metrics"]["parity"])
    losses = parity["losses"]
    reference = losses["zero2"]
    assert all(math.isfinite(step["loss"]) for step in reference)
    assert reference[1]["loss"] != pytest.approx(reference[0]["loss"], rel=1e-3)  # the first update changed things
    for name in ("zero0", "zero3", "ddp"):
        for step, (got, want) in enumerate(zip(losses[name], reference)):
            for key in want:
                tolerance = 1e-6 if step == 0 else 1e-4  # after updates: fused vs torch AdamW, reduction order
                assert got[key] == pytest.approx(want[key], rel=tolerance, abs=1e-5), (name, step, key)
    # The same weights after three updates, also gathered from ZeRO-3's partitions; and far more than noise moved.
    assert all(parity["keys"].values())
    assert parity["moved"] > 1e-2
    assert max(parity["distance"].values()) < 1e-2 * parity["moved"]
    assert all(len(c) == 8 and all(isinstance(x, str) for x in c) for c in parity["captions"].values())
