"""dynrefer.checkpoint: an export is config.json + model.safetensors; loading gives back every saved tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dynrefer.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_pretrained, save_pretrained, saved_state
from dynrefer.config import load_config
from dynrefer.model import DynRefer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = load_config("tiny")
    cfg.tags.vocabulary = ["red", "circle"]
    cfg.recognition.categories = ["circle", "square"]
    return DynRefer(cfg).eval()


def test_save_and_load_round_trip_every_tensor_and_the_config(model, tmp_path):
    save_pretrained(model, str(tmp_path / "export"))
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert json.loads((tmp_path / "export" / CONFIG_FILE).read_text()) == model.cfg.to_dict()
    loaded = load_pretrained(str(tmp_path / "export"))
    assert loaded.cfg == model.cfg and not loaded.training
    saved, back = saved_state(model), saved_state(loaded)
    assert saved.keys() == back.keys() == load_file(str(tmp_path / "export" / WEIGHTS_FILE)).keys()
    for name, tensor in saved.items():
        assert torch.equal(back[name], tensor), name
    loaded_state = loaded.state_dict()
    for name, tensor in model.state_dict().items():  # the parts an export leaves out are rebuilt the same
        assert torch.equal(loaded_state[name], tensor), name


def test_an_export_holds_each_tied_tensor_once(model):
    state = saved_state(model)
    storages = [(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) for t in state.values()]
    assert len(storages) == len(set(storages))
    assert not any(name.startswith("embedding.encoder.") for name in state)  # the same module as encoder.


def test_weights_that_do_not_match_their_config_are_refused(model, tmp_path):
    save_pretrained(model, str(tmp_path / "export"))
    cfg = json.loads((tmp_path / "export" / CONFIG_FILE).read_text())
    cfg["qformer"]["num_layers"] += 1
    (tmp_path / "export" / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weights do not match its config"):
        load_pretrained(str(tmp_path / "export"))
