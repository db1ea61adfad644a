"""dynrefer.config: model configs by name or path, nested building that refuses typos, and merging overrides."""

import os

import pytest

from dynrefer.config import DynReferConfig, _build, config_path, load_config, merge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_config_loads_by_name_and_by_path_alike():
    path = os.path.join(REPO, "configs", "model", "tiny.yaml")
    assert os.path.samefile(config_path("tiny"), path)
    assert load_config("tiny") == load_config(path)
    assert load_config("tiny").image_size == 64
    with pytest.raises(FileNotFoundError, match="'no-such-model' not found"):
        load_config("no-such-model")


def test_to_dict_and_from_dict_round_trip():
    cfg = load_config("tiny")
    assert DynReferConfig.from_dict(cfg.to_dict()) == cfg


def test_merge_overrides_nested_keys_and_keeps_their_siblings():
    base = load_config("tiny").to_dict()
    merged = merge(base, {"views": {"num_views": 2}, "image_size": 32})
    assert merged["views"]["num_views"] == 2 and merged["image_size"] == 32
    assert merged["views"]["candidate_ts"] == base["views"]["candidate_ts"]
    assert base["views"]["num_views"] == 3  # the base is not changed
    assert DynReferConfig.from_dict(merged).views.num_views == 2
    assert merge({"a": {"b": 1}}, {"a": 5}) == {"a": 5}  # a value replaces a section


def test_unknown_keys_are_refused_where_they_are(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("qformer: {num_querys: 4}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: model.qformer: unknown key\(s\) \['num_querys'\]"):
        DynReferConfig.from_yaml(path)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['imagesize'\]"):
        DynReferConfig.from_dict({"imagesize": 64})
    with pytest.raises(ValueError, match="job.views: expected a mapping, got list"):
        _build(DynReferConfig, {"views": [1, 2]}, "job")
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping at the top level"):
        DynReferConfig.from_yaml(path)
