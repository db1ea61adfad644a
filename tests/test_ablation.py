"""benchmarks/ablation.py's config: the shipped one parses, each variant's two runs are wired as the demo's."""

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_ablation():
    spec = importlib.util.spec_from_file_location("bench_ablation", os.path.join(REPO, "benchmarks", "ablation.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through the module
    spec.loader.exec_module(module)
    return module


def test_each_variant_trains_from_its_own_first_run_or_the_one_it_names(tmp_path, monkeypatch):
    ablation = load_ablation()
    monkeypatch.chdir(REPO)
    config = ablation.Ablation.from_yaml("configs/ablation/tiny.yaml")
    variants = {v.name: v for v in config.variants}
    assert config.first_run == "configs/train/tiny_qformer.yaml" and config.max_steps is None
    trained = []
    monkeypatch.setattr(ablation, "_train", lambda job, what: trained.append((what, job)) or f"/x/{job.name}/export")

    export = ablation.train_variant(config, variants["single view t=0"], variants)
    (first_what, first), (what, second) = trained
    assert export == "/x/single-view-t-0/export" and what == "single view t=0"
    assert first.name == "single-view-t-0-first" and second.init_from == "/x/single-view-t-0-first/export"
    assert first.max_steps == 200 and second.max_steps == 600  # each config's own steps, as in the demo
    assert first.model_overrides["views"] == second.model_overrides["views"] == {
        "num_views": 1, "fixed_ts": [0.0], "train_selection": "fixed", "selection": "fixed"}
    assert first.model_overrides["loss"]["itc"] == 1.0 and second.model_overrides["loss"]["itc"] == 0.0
    assert first.eval.every == -1 and second.eval.every == 0  # one val pass at the end sets the tag threshold

    trained.clear()
    ablation.train_variant(config, variants["pHASH multi-view, caption loss only"], variants)
    (_, first), (_, second) = trained
    assert first.name == "random-multi-view-first" and second.init_from == "/x/random-multi-view-first/export"
    assert first.model_overrides["loss"]["tags"] == 0.05 and second.model_overrides["loss"]["tags"] == 0.0
    assert not variants["caption loss only, no control words"].control_words

    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  - {name: a, first_run_as: b}\n")
    with pytest.raises(ValueError, match="variant 'a' is first_run_as unknown variant 'b'"):
        ablation.Ablation.from_yaml(str(bad))
