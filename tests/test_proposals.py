"""Class-agnostic region proposals: targets from records, the shape of proposals, exports that round-trip, frozen
backbone stages, and a detector trained from scratch that finds the synthetic corpus's objects in held-out images."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torchvision.ops import FrozenBatchNorm2d, box_iou

from dynrefer import proposals, storage, synth
from dynrefer.datasets import make_region, read_visual_genome
from dynrefer.imageio import decode_image
from dynrefer.proposals import (
    ProposalConfig,
    Proposer,
    build_proposer,
    fit,
    load_proposal_config,
    load_proposer,
    recall,
    records_to_targets,
    train_step,
)

#: Steps of the learning test: 160 images at the tiny config's 256 px, about 42 s on two idle cores.
LEARN_STEPS = 40
#: Held-out recall (IoU 0.5, 100 proposals; 116 boxes) measured after LEARN_STEPS: 0.64 with the config's seed 0,
#: 0.53 and 0.45 with seeds 1 and 2 (what other hardware's rounding may amount to); untrained: 0.0.
MIN_RECALL = 0.3


def record(boxes, width=100, height=80):
    return {"image_id": "1", "file": "", "width": width, "height": height, "split": None,
            "regions": [make_region(i, b) for i, b in enumerate(boxes)]}


def small_config(**changes) -> ProposalConfig:
    """The tiny config at a size where a forward pass costs little, for tests of plumbing rather than learning."""
    return dataclasses.replace(load_proposal_config("tiny"), min_size=128, max_size=192, **changes)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """48 synthetic images: 36 to train on, 12 held out (ids 37-48)."""
    root = str(tmp_path_factory.mktemp("proposals") / "corpus")
    synth.write_corpus(root, 48, seed=3, progress=False)
    records = sorted(read_visual_genome(root, use_objects=False), key=lambda r: int(r["image_id"]))
    return records[:36], records[36:]


@pytest.fixture(scope="module")
def held_out(corpus):
    _, test = corpus
    images = [decode_image(storage.read_bytes(r["file"])) for r in test]
    return images, [[region["box"] for region in r["regions"]] for r in test]


@pytest.fixture(scope="module")
def trained(corpus):
    train, _ = corpus
    cfg = load_proposal_config("tiny")
    return fit(train, cfg, LEARN_STEPS)


# --- targets --------------------------------------------------------------------------------------------------------

def test_records_to_targets_clips_to_the_image_and_skips_degenerate_boxes():
    rec = record([[10, 10, 30, 40],        # kept as is
                  [-5, 70, 20, 95],        # clipped to [0, 70, 20, 80]
                  [50, 20, 50, 60],        # zero width
                  [60, 30, 40, 50],        # x2 < x1
                  [120, 10, 150, 30],      # wholly right of the image: nothing left after clipping
                  [90, 10, 100.5, 30],     # clipped to 10 px wide
                  [99.5, 0, 130, 10],      # 0.5 px left after clipping
                  [float("nan"), 0, 5, 5]])
    rec["regions"].append({**make_region("bad", [0, 0, 0, 0]), "error": "malformed"})
    target = records_to_targets([rec])[0]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["boxes"].tolist() == [[10, 10, 30, 40], [0, 70, 20, 80], [90, 10, 100, 30]]
    assert target["labels"].tolist() == [proposals.REGION_LABEL] * 3

    scaled = records_to_targets([rec], sizes=[(50, 200)], scales=[(2.0, 0.5)])[0]  # the decoded size wins
    assert scaled["boxes"].tolist() == [[20, 5, 60, 20], [0, 35, 40, 47.5]]

    empty = records_to_targets([record([[5, 5, 5, 50]])])[0]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    with pytest.raises(ValueError, match="no image size"):
        records_to_targets([record([[1, 1, 5, 5]], width=None)])


# --- configs and architectures ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "base"])
def test_shipped_configs_build_a_two_class_detector(name):
    cfg = load_proposal_config(name)
    model = build_proposer(cfg)
    assert model.head.classification_head.num_classes == 2
    assert ProposalConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_rejects_unknown_keys_and_architectures(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("architecture: fcos_resnet18_fpn\nmin_sise: 300\n")
    with pytest.raises(ValueError, match="min_sise"):
        ProposalConfig.from_yaml(path)
    with pytest.raises(ValueError, match="unknown 'yolo'"):
        build_proposer(ProposalConfig(architecture="yolo"))
    with pytest.raises(ValueError, match="5 pyramid levels"):
        build_proposer(ProposalConfig(anchor_sizes=[8, 16]))
    with pytest.raises(ValueError, match="only for the architectures composed here"):
        build_proposer(ProposalConfig(architecture="retinanet_resnet50_fpn", head_convs=2))


def test_torchvision_builders_are_accepted_by_name():
    model = build_proposer(ProposalConfig(architecture="fasterrcnn_mobilenet_v3_large_fpn", min_size=128,
                                          max_size=160, max_detections=7))
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    assert model.roi_heads.detections_per_img == 7


def test_train_step_returns_finite_losses_with_gradients_everywhere():
    torch.manual_seed(0)
    cfg = small_config()
    model = build_proposer(cfg)
    images = [torch.rand(3, 128, 160), torch.rand(3, 140, 128)]
    targets = records_to_targets([record([[10, 10, 60, 50], [80, 20, 120, 70]], 160, 128),
                                  record([[5, 5, 25, 25]], 128, 140)])
    losses = train_step(model, images, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness", "loss"}
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    assert torch.isclose(losses["loss"], losses["classification"] + losses["bbox_regression"] + losses["bbox_ctrness"])
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing


def test_fit_is_reproducible_from_its_seed(corpus):
    train, _ = corpus
    cfg = small_config()
    cfg.train.batch_size = 2
    a, b = fit(train[:2], cfg, 2), fit(train[:2], cfg, 2)
    assert a.losses == b.losses
    cfg.train.seed = 1
    assert fit(train[:2], cfg, 2).losses != a.losses


# --- frozen backbone stages -----------------------------------------------------------------------------------------

def test_frozen_stages_need_weights_and_stay_fixed(tmp_path):
    torch.manual_seed(0)
    cfg = small_config()
    Proposer(build_proposer(cfg), cfg).save(str(tmp_path / "start"))
    with pytest.raises(ValueError, match="freezes randomly initialised"):
        build_proposer(dataclasses.replace(cfg, trainable_backbone_layers=2))

    frozen_cfg = dataclasses.replace(cfg, trainable_backbone_layers=2, weights=str(tmp_path / "start"))
    model = build_proposer(frozen_cfg)
    saved = load_file(str(tmp_path / "start" / proposals.WEIGHTS_FILE))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer2[0].bn1, FrozenBatchNorm2d)
    assert isinstance(body.layer3[0].bn1, torch.nn.BatchNorm2d)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.body.conv1", "backbone.body.layer1", "backbone.body.layer2"))
                          for n in frozen)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train_step(model, [torch.rand(3, 128, 128)], records_to_targets([record([[10, 10, 70, 60]], 128, 128)])
               )["loss"].backward()
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone.body.layer2"))
    assert not torch.equal(before["backbone.body.layer4.0.conv1.weight"], after["backbone.body.layer4.0.conv1.weight"])

    file_cfg = dataclasses.replace(frozen_cfg, weights=str(tmp_path / "start" / proposals.WEIGHTS_FILE))
    assert all(torch.equal(v, saved[k]) for k, v in build_proposer(file_cfg).state_dict().items())


# --- a trained proposer ---------------------------------------------------------------------------------------------

def test_training_from_scratch_finds_held_out_objects(trained, held_out):
    images, boxes = held_out
    cfg = trained.proposer.cfg
    untrained = Proposer(build_proposer(cfg), cfg)
    before = recall([[b for b, _ in p] for p in untrained.propose_batch(images)], boxes)
    after = recall([[b for b, _ in p] for p in trained.proposer.propose_batch(images)], boxes)
    print(f"recall@100 IoU 0.5 on {sum(map(len, boxes))} held-out boxes: untrained {before:.3f}, "
          f"after {LEARN_STEPS} steps {after:.3f}; {trained.images_per_second:.2f} images/s")
    assert after >= MIN_RECALL and after >= before + 0.25
    assert np.mean(trained.losses[-5:]) < 0.7 * np.mean(trained.losses[:5])
    assert recall([[b for b, _ in p] for p in trained.proposer.propose_batch(images)], boxes, iou=0.95) < after


def test_propose_gives_sorted_boxes_in_image_pixels_after_nms(trained, held_out):
    images, _ = held_out
    proposer = trained.proposer
    for image in images[:3]:
        out = proposer.propose(image)
        assert 0 < len(out) <= proposer.cfg.max_detections
        width, height = image.size
        for box, score in out:
            assert isinstance(box, list) and len(box) == 4 and all(isinstance(v, float) for v in box)
            assert isinstance(score, float) and 0.0 <= score <= 1.0
            assert 0 <= box[0] <= box[2] <= width and 0 <= box[1] <= box[3] <= height
        scores = [s for _, s in out]
        assert scores == sorted(scores, reverse=True)
        iou = box_iou(torch.tensor([b for b, _ in out]), torch.tensor([b for b, _ in out]))
        assert float(iou.fill_diagonal_(0).max()) <= proposer.cfg.nms_iou + 1e-6
    few = Proposer(proposer.model, dataclasses.replace(proposer.cfg, max_detections=5))
    assert len(few.propose(images[0])) == 5
    assert few.propose(images[0]) == proposer.propose(images[0])[:5]


def test_save_and_load_give_identical_proposals(trained, held_out, tmp_path, s3_server):
    images, _ = held_out
    proposer = trained.proposer
    expected = proposer.propose_batch(images[:2])
    local = str(tmp_path / "export")
    proposer.save(local)
    assert sorted(os.listdir(local)) == [proposals.CONFIG_FILE, proposals.WEIGHTS_FILE]
    assert load_file(os.path.join(local, proposals.WEIGHTS_FILE))  # safetensors, no pickle
    again = load_proposer(local)
    assert again.cfg == proposer.cfg and not again.model.training
    assert again.propose_batch(images[:2]) == expected

    so = s3_server["storage_options"]
    storage.filesystem("s3://proposals", so)[0].mkdir("proposals")
    proposer.save("s3://proposals/run/export", so)
    assert load_proposer("s3://proposals/run/export", so).propose_batch(images[:2]) == expected

    broken = dataclasses.replace(proposer.cfg, head_convs=proposer.cfg.head_convs + 1).to_dict()
    storage.write_json(os.path.join(local, proposals.CONFIG_FILE), broken)
    with pytest.raises(ValueError, match="do not match"):
        load_proposer(local)
