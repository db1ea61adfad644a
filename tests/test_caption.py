"""Bulk captioning on a real local Ray cluster: every prepared region comes out exactly once, also after a rerun."""

import os

import pyarrow.parquet as pq
import pytest
import torch

from dynrefer import synth
from dynrefer.checkpoint import save_pretrained
from dynrefer.config import load_config
from dynrefer.model import DynRefer
from dynrefer.preprocess import PrepareConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_local):
    """A prepared 12-image synthetic corpus and an exported (untrained) tiny model."""
    from pipelines.prepare import PrepareJob, run

    root = tmp_path_factory.mktemp("caption")
    synth.write_corpus(str(root / "synth"), 12, seed=3, progress=False)
    run(PrepareJob(dataset="vg", root=str(root / "synth"), out=str(root / "prepared"), images_per_shard=4,
                   prepare=PrepareConfig(view_size=64)), progress=False)
    cfg = load_config("tiny")
    cfg.tags.vocabulary = ["red", "blue", "circle", "striped"]
    cfg.language.max_new_tokens = 6
    torch.manual_seed(0)
    save_pretrained(DynRefer(cfg), str(root / "model"))
    return root


def job(corpus, out, **kw):
    from pipelines.caption import CaptionJob

    return CaptionJob(model=str(corpus / "model"), prepared=str(corpus / "prepared"), out=str(out),
                      batch_size=16, **kw)


def test_every_region_is_captioned_exactly_once_and_a_rerun_only_fills_gaps(corpus, tmp_path):
    from pipelines.caption import read_captions, run

    summary = run(job(corpus, tmp_path / "out"), progress=False)
    prepared = pq.read_table(corpus / "prepared" / "regions")
    assert summary["exactly_once"] and summary["errors"] == 0
    assert summary["captioned"] == prepared.num_rows
    rows = read_captions(str(tmp_path / "out"))
    assert all(isinstance(r["caption"], str) and len(r["view_ts"]) == 3 and r["view_ts"][0] == 0.0 for r in rows)
    os.remove(tmp_path / "out" / "captions" / "shard-00001.parquet")
    again = run(job(corpus, tmp_path / "out"), progress=False)
    assert again["shards_written_now"] == 1 and again["exactly_once"]
    assert sorted(r["region_id"] for r in read_captions(str(tmp_path / "out"))) == sorted(r["region_id"] for r in rows)


def test_fixed_views_jsonl_and_unreadable_images_become_error_rows(corpus, tmp_path):
    from pipelines.caption import read_captions, run

    test_ids = [r for r in pq.read_table(corpus / "prepared" / "regions").to_pylist() if r["split"] == "test"]
    victim = test_ids[0]["file"]
    saved = open(victim, "rb").read()
    open(victim, "wb").write(b"gone")
    try:
        summary = run(job(corpus, tmp_path / "out", split="test", views="fixed", format="jsonl"), progress=False)
    finally:
        open(victim, "wb").write(saved)
    rows = read_captions(str(tmp_path / "out"), "jsonl")
    lost = [r for r in test_ids if r["file"] == victim]
    assert summary["exactly_once"] and summary["errors"] == len(lost) > 0
    assert summary["captioned"] + summary["errors"] == len(test_ids)
    assert all(r["view_ts"] == [0.0, 0.5, 1.0] for r in rows if not r["error"])
    assert all(r["error"].startswith(f"{victim}: not an image") for r in rows if r["error"])
