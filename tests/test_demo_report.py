"""The demo report's evaluation part: the headline table and the check that reruns metrics of an old protocol."""

import pytest

from pipelines import demo, evaluate
from tests.test_evaluate import SYNTH_PREDICTIONS, SYNTH_REGIONS


def test_headline_names_slots_and_protocol(tmp_path):
    given = evaluate.evaluate(SYNTH_PREDICTIONS, SYNTH_REGIONS, ["content", "recognition"])
    run = demo.Demo(str(tmp_path), images=3, force=False)
    run.summaries["metrics (captions)"] = given
    run.summaries["metrics (dense)"] = {"dense": {"map": 0.204, "det_map": 0.5, "pairs": 30,
                                                  "protocol": "DenseCap mAP (30 pairs)"}}
    lines = demo.headline(run)
    table = dict([c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| "))
    # from test_evaluate's hand-written case: shape wrong on one of two regions, the rest right
    assert table["caption names the right shape / colour / pattern / size"] == "50.0 / 100.0 / 100.0 / 100.0"
    assert table["all four right at once / with the size right or left out"] == "50.0 / 50.0"
    assert table["tags precision / recall"] == "75.0 / 42.9"
    assert table["DenseCap mAP, 30 pairs: test boxes ranked by caption score / proposals"] == "n/a / 20.4"
    assert "DenseCap protocol: DenseCap mAP (30 pairs)." in lines
    assert demo.headline(demo.Demo(str(tmp_path), images=3, force=False)) == []


def test_stale_metrics_are_scored_again():
    job = demo.config("evaluate", "synthetic_dense.yaml")
    assert demo.stale_metrics({"dense": {"map": 0.2}}, job)  # the 25-pair protocol wrote no "pairs"
    assert demo.stale_metrics({"caption": {}}, job)  # the job asks for dense
    assert not demo.stale_metrics({"dense": {"map": 0.2, "pairs": 30}}, job)
    assert demo.stale_metrics({"dense": {"pairs": 30}, "caption": {}}, demo.config("evaluate", "synthetic.yaml"))


def test_demo_refuses_a_corpus_of_another_generator_version(tmp_path):
    """A demo directory from an older corpus would silently feed every later stage stale outputs."""
    import json

    from dynrefer import synth
    from pipelines.demo import Demo

    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "synth_meta.json").write_text(json.dumps({"version": "0"}))
    with pytest.raises(SystemExit, match="--force"):
        Demo(str(tmp_path), 3, False).synth()
    (tmp_path / "synth" / "synth_meta.json").write_text(json.dumps({"version": synth.GENERATOR_VERSION}))
    Demo(str(tmp_path), 3, False).synth()  # the current version is reused, not regenerated
    assert not (tmp_path / "synth" / "images").exists()
