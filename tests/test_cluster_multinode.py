"""A real two-node Ray cluster on this machine: prepare, train and caption with every path on (moto) S3.

A head and a second raylet (`ray start --address`, its own temp dir, a custom resource ``node2``), both with token
auth. One driver runs the three stages as a user's program would: synthesise a few images to S3, prepare them
(Ray Data actors on both nodes), train a handful of steps with one Ray Train worker on each node (each node
holds 3 CPUs and a worker asks for 2), and caption the prepared regions with the model actor forced onto the
second node (``actor_resources``). Nothing is handed over through the local disk: the nodes share this machine's
files, so that is checked by construction (every URI is ``s3://``; the nodes' environment has no S3 credentials,
which travel inside the jobs' storage options).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dynrefer import storage
from pipelines.args import write_token
from tests.ray_nodes import REPO, RayNodes, token_env

DRIVER = r"""
import json, sys
import ray
from dynrefer import storage, synth
from dynrefer.preprocess import PrepareConfig
from pipelines import caption, prepare, train
from pipelines.ray_training import WorkerSection
from pipelines.train_job import DataSection, EvalSection, TrainJob

cfg = json.loads(sys.argv[1])
so, base = cfg["storage_options"], cfg["base"]
ray.init(address=cfg["address"], log_to_driver=False)
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
node2 = [i for i, r in nodes.items() if "node2" in r]

synth.write_corpus(f"{base}/vg", 12, seed=3, storage_options=so, progress=False, workers=1)
prep = prepare.run(prepare.PrepareJob(dataset="vg", root=f"{base}/vg", out=f"{base}/prepared", images_per_shard=3,
                                      prepare=PrepareConfig(view_size=64), storage_options=so), progress=False)

job = TrainJob(
    model="tiny", data=DataSection(prepared=[f"{base}/prepared"], shuffle_buffer=0, deterministic=True,
                                   decode_workers=1, decode_batch=16, decode_cpus=0.2, read_cpus=0.1),
    ddp=True, batch_size=4, max_steps=3, seed=0, log_every=1, checkpoint_every=3, keep_checkpoints=1,
    workers=WorkerSection(num=2, cpus=2.0), eval=EvalSection(every=-1),
    storage_path=f"{base}/runs", name="multinode", max_failures=1, storage_options=so,
    model_overrides={"language": {"max_new_tokens": 4, "num_beams": 1}})
trained = train.run(job)
state = storage.read_json(storage.join(trained["checkpoint"], "train_state.json"), so)

cap = caption.run(caption.CaptionJob(model=trained["export"], prepared=f"{base}/prepared", out=f"{base}/captions",
                                     batch_size=8, actors=1, cpus_per_actor=1.0, actor_resources={"node2": 1},
                                     input_workers=1, cpus_per_input_worker=0.5, storage_options=so),
                  progress=False)

# Where every actor of the job ran, from the GCS actor table (the state API needs the dashboard, not started).
from ray.core.generated import gcs_pb2
accessor = ray._private.state.state._connect_and_get_accessor()
actors = []
for blob in accessor.get_actor_table(None, None):
    a = gcs_pb2.ActorTableData.FromString(blob)
    actors.append({"class": a.class_name, "repr": a.repr_name, "node": a.address.node_id.hex(),
                   "resources": dict(a.required_resources)})
print("RESULT " + json.dumps({"nodes": list(nodes), "node2": node2, "prepare": prep, "state": state,
                              "trained": {k: trained[k] for k in ("checkpoint", "export")}, "caption": cap,
                              "actors": actors}, default=str))
"""


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_prepare_train_and_caption_across_two_nodes_on_s3(s3_server, tmp_path):
    so = s3_server["storage_options"]
    storage.filesystem("s3://multinode", so)[0].mkdir("multinode")
    base = "s3://multinode/run"
    token = write_token(str(tmp_path / "token"))
    # The nodes get no AWS credentials: workers can reach S3 only through the storage options the jobs carry.
    env = {k: v for k, v in token_env(token).items() if not k.startswith("AWS_")}
    with RayNodes(env) as cluster:
        # 3 logical CPUs a node: a training worker takes 2, so each node holds one, and the whole CPU left on
        # each node is what Ray Data's budget needs for the view stage (it gives none from half a CPU a node).
        address = cluster.head(num_cpus=3)
        cluster.worker(num_cpus=3, resources={"node2": 1})
        driver = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(
            {"address": address, "storage_options": so, "base": base})], cwd=REPO, env=env, capture_output=True,
            text=True, timeout=1300)
        lines = [line for line in driver.stdout.splitlines() if line.startswith("RESULT ")]
        assert driver.returncode == 0 and lines, (driver.stdout[-3000:], driver.stderr[-6000:])
        got = json.loads(lines[-1][len("RESULT "):])
        assert not cluster.stop()

    assert len(got["nodes"]) == 2 and len(got["node2"]) == 1
    (node2,) = got["node2"]
    (head,) = set(got["nodes"]) - {node2}

    # Prepare: every input region accounted for, written to S3.
    prep = got["prepare"]
    assert prep["balanced"] and prep["regions"] > 0 and prep["shards"] == 4 and prep["shards_written_now"] == 4
    assert len(storage.listdir(f"{base}/prepared/regions", so)) == 4
    assert storage.listdir(f"{base}/prepared/plan", so) == []  # each shard's plan removed once written

    # Train: one worker on each node, every step taken once, the checkpoint and export on S3.
    workers = [a for a in got["actors"] if a["class"] == "RayTrainWorker"]
    assert len(workers) == 2 and {w["node"] for w in workers} == {head, node2}, workers
    state = got["state"]
    assert state["step"] == 3 and state["samples"] == 3 * 4 * 2
    assert got["trained"]["checkpoint"].startswith(f"{base}/runs/multinode/checkpoint-")
    assert storage.exists(storage.join(got["trained"]["export"], "model.safetensors"), so)

    # Caption: the model actor ran on the second node only; every prepared region came out exactly once.
    models = [a for a in got["actors"] if "node2" in a["resources"]]
    assert models and all(a["node"] == node2 for a in models), got["actors"]
    assert any("CaptionModel" in a["repr"] for a in models) or all(a["class"] == "_MapWorker" for a in models), models
    cap = got["caption"]
    assert cap["exactly_once"] and cap["captioned"] == prep["regions"] and cap["errors"] == 0, cap
    from pipelines.caption import read_captions

    rows = read_captions(f"{base}/captions", "parquet", so)
    # A 3-step model may write an empty caption; every row still carries one (a string) and no error.
    assert len(rows) == prep["regions"] and all(isinstance(r["caption"], str) and not r["error"] for r in rows)
    assert {r["region_id"] for r in rows} == {r["region_id"] for r in rows if r["image_id"]} and \
        len({r["region_id"] for r in rows}) == len(rows)
