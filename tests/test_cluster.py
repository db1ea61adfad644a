"""cluster/: the KubeRay manifests checked strictly against KubeRay's CRD schemas (as `kubectl apply
--validate=strict` would), the cluster-launcher YAML through Ray's own config validation, and every module, config
and argument the manifests name against this repository."""

from __future__ import annotations

import copy
import functools
import importlib
import os
import re
import shlex
from typing import Any

import jsonschema
import pytest
import ray
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(REPO, "cluster")
KUBERAY = os.path.join(CLUSTER, "kuberay")
CRDS = os.path.join(os.path.dirname(REPO), "shared", "schemas", "kuberay")
LAUNCHER = os.path.join(CLUSTER, "ray-cluster.aws.yaml")
MANIFESTS = sorted(f for f in os.listdir(KUBERAY) if f.endswith(".yaml"))
RAYJOBS = ["rayjob-caption.yaml", "rayjob-train.yaml"]

# The ObjectMeta fields a manifest may set; the CRDs leave the top-level metadata to the API server's own schema.
OBJECT_META = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
    "namespace": {"type": "string"}, "generateName": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}


def load_yaml(path: str) -> Any:
    with open(path) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def strict(node: Any) -> Any:
    """A CRD's OpenAPI v3 schema as a JSON schema with kubectl's strict field validation.

    Objects with ``properties`` and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``
    get ``additionalProperties: false``; ``x-kubernetes-int-or-string`` becomes integer-or-string, ``nullable``
    admits null. A field carrying CEL rules (``x-kubernetes-validations``) is refused outright: jsonschema cannot
    evaluate them, so no manifest may rely on them unchecked.
    """
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    if "x-kubernetes-validations" in node:
        return False
    out = {k: strict(v) for k, v in node.items() if k not in ("properties", "additionalProperties")}
    if "properties" in node:
        out["properties"] = {k: strict(v) for k, v in node["properties"].items()}
    if "additionalProperties" in node:
        out["additionalProperties"] = strict(node["additionalProperties"])
    elif "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


@functools.cache
def crds() -> list[dict[str, Any]]:
    return [load_yaml(os.path.join(CRDS, name)) for name in sorted(os.listdir(CRDS)) if name.endswith(".yaml")]


@functools.cache
def crd_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    """The strict validator of the CRD version that ``api_version`` names (it must be served)."""
    group, version = api_version.split("/")
    for crd in crds():
        if crd["spec"]["names"]["kind"] != kind or crd["spec"]["group"] != group:
            continue
        served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
        assert version in served, f"{kind}: {api_version} is not a served version ({sorted(served)})"
        schema = strict(copy.deepcopy(served[version]["schema"]["openAPIV3Schema"]))
        schema["properties"].update(apiVersion={"const": api_version}, kind={"const": kind}, metadata=OBJECT_META)
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
        return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"no CRD for {kind} in group {group} under {CRDS}")


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    validator = crd_validator(manifest["kind"], manifest["apiVersion"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def manifest(name: str) -> dict[str, Any]:
    return load_yaml(os.path.join(KUBERAY, name))


def cluster_spec(m: dict[str, Any]) -> dict[str, Any]:
    return m["spec"]["rayClusterSpec"] if m["kind"] == "RayJob" else m["spec"]["rayClusterConfig"]


def containers(m: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster_spec(m)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def group(m: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in cluster_spec(m)["workerGroupSpecs"] if g["groupName"] == name)


def quantity(value: Any) -> float:
    """A Kubernetes CPU quantity ("4", 4, "500m") in cores."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_limits(g: dict[str, Any]) -> tuple[float, int]:
    """(CPUs, GPUs) of one pod of a worker group."""
    limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
    return quantity(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0))


def dockerfile_workdir() -> str:
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        return re.findall(r"^WORKDIR\s+(\S+)", f.read(), flags=re.MULTILINE)[-1]


def makefile_torch_pins() -> list[str]:
    with open(os.path.join(REPO, "Makefile")) as f:
        return re.findall(r"\b(torch(?:vision)?==\S+)", f.read())


# ---------------------------------------------------------------------------------------------- CRD validation


def test_every_kind_has_a_manifest() -> None:
    kinds = sorted(manifest(n)["kind"] for n in MANIFESTS)
    assert kinds == ["RayJob", "RayJob", "RayJob", "RayService"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid_against_its_crd(name: str) -> None:
    assert schema_errors(manifest(name)) == []


def test_crds_expand_pod_templates() -> None:
    """No subtree of the CRDs keeps unknown fields, so strict validation reaches into the pod templates."""
    assert len(crds()) == 3
    for crd in crds():
        assert "x-kubernetes-preserve-unknown-fields" not in repr(crd)


def test_misspelled_fields_fail() -> None:
    m = manifest("rayjob-train.yaml")
    m["spec"]["entrypoint_"] = m["spec"].pop("entrypoint")
    head = m["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")
    worker = m["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    worker["resource"] = worker.pop("resources")
    m["metadata"]["label"] = {"a": "b"}
    errors = schema_errors(m)
    for field in ("'entrypoint_'", "'rayStartParam'", "'resource'", "'label'"):
        assert any(field in e and "not allowed" in e for e in errors), (field, errors)


def test_wrong_types_fail() -> None:
    m = manifest("rayservice.yaml")
    cpu = group(m, "cpu")
    cpu["replicas"] = "one"
    cpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = ["16"]
    m["spec"]["serveConfigV2"] = {"applications": []}
    errors = schema_errors(m)
    assert any(e.startswith("spec/rayClusterConfig/workerGroupSpecs/0/replicas:") for e in errors), errors
    assert any("resources/limits/cpu:" in e for e in errors), errors
    assert any(e.startswith("spec/serveConfigV2:") for e in errors), errors


def test_int_or_string_quantities_and_unchecked_cel_fields() -> None:
    m = manifest("rayjob-caption.yaml")
    limits = group(m, "gpu")["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"], limits["memory"] = 40, "160Gi"
    assert schema_errors(m) == []
    limits["cpu"] = True
    assert schema_errors(m) != []
    m = manifest("rayjob-caption.yaml")
    m["spec"]["managedBy"] = "ray.io/kuberay-operator"  # guarded by CEL rules, which jsonschema cannot run
    assert schema_errors(m) == ["spec: False schema does not allow 'ray.io/kuberay-operator'"]


def test_api_version_and_kind_must_match_a_served_crd() -> None:
    m = manifest("rayjob-train.yaml")
    with pytest.raises(AssertionError, match="not a served version"):
        schema_errors({**m, "apiVersion": "ray.io/v2"})
    # v1alpha1 is served too, but lacks fields the job uses: the version the manifest names is the one checked.
    assert sorted(schema_errors({**m, "apiVersion": "ray.io/v1alpha1"})) == [
        "spec/rayClusterSpec: Additional properties are not allowed ('authOptions' was unexpected)",
        "spec: Additional properties are not allowed ('backoffLimit', 'submissionMode' were unexpected)"]


# ------------------------------------------------------------------------------- what the manifests point at


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_entrypoint_runs_a_real_module_with_valid_arguments(name: str) -> None:
    m = manifest(name)
    words = shlex.split(m["spec"]["entrypoint"])
    assert words[:2] == ["python", "-m"], words
    module, args = words[2], words[3:]
    assert module.startswith("pipelines.") and os.path.isfile(os.path.join(REPO, *module.split(".")) + ".py")
    parsed = importlib.import_module(module).parser().parse_args(args)
    assert parsed.address == "auto"
    configs = [a for a in args if a.startswith("configs/")]
    for path in configs:
        assert os.path.isfile(os.path.join(REPO, path)), path
        with open(os.path.join(REPO, path)) as f:
            text = f.read()
        for inner in re.findall(r"\bconfigs/[\w./-]+", text):  # e.g. the DeepSpeed JSON a training config names
            assert os.path.isfile(os.path.join(REPO, inner)), (path, inner)
    # The entrypoint runs in the image's copy of the repository, where those relative paths resolve.
    assert yaml.safe_load(m["spec"]["runtimeEnvYAML"]) == {"working_dir": dockerfile_workdir()}


def test_train_job_fits_its_cluster() -> None:
    m = manifest("rayjob-train.yaml")
    from pipelines.train import parser

    args = parser().parse_args(shlex.split(m["spec"]["entrypoint"])[3:])
    cfg = load_yaml(os.path.join(REPO, args.config))
    gpu = group(m, "gpu")
    cpus, gpus = pod_limits(gpu)
    per_pod = gpus // cfg["workers"]["gpus"]
    assert gpu["replicas"] * per_pod == cfg["workers"]["num"], "one Ray Train worker per GPU"
    assert cpus >= per_pod * cfg["workers"]["cpus"]
    cpu_pods = group(m, "cpu")
    assert cpu_pods["replicas"] * pod_limits(cpu_pods)[0] >= cfg["data"]["decode_workers"] * cfg["data"]["decode_cpus"]


def test_caption_job_fits_its_cluster() -> None:
    from pipelines.caption import parser

    m = manifest("rayjob-caption.yaml")
    args = parser().parse_args(shlex.split(m["spec"]["entrypoint"])[3:])
    gpu = group(m, "gpu")
    assert gpu["replicas"] * pod_limits(gpu)[1] == args.actors * args.gpus_per_actor
    for path in (args.model, args.prepared, args.out):
        assert path.startswith("s3://")


def test_stages_chain_through_s3() -> None:
    """prepare writes what training and captioning read; captioning and serving load what training exports."""
    from pipelines import caption, train

    prepared = load_yaml(os.path.join(REPO, "configs", "prepare", "visual_genome.yaml"))["out"]
    train_args = train.parser().parse_args(shlex.split(manifest("rayjob-train.yaml")["spec"]["entrypoint"])[3:])
    cfg = load_yaml(os.path.join(REPO, train_args.config))
    assert (train_args.prepared or cfg["data"]["prepared"]) == [prepared]
    export = cfg["export"] or "/".join([train_args.storage_path or cfg["storage_path"], train_args.name or cfg["name"],
                                        train.TrainJob.EXPORT_NAME])
    caption_args = caption.parser().parse_args(shlex.split(manifest("rayjob-caption.yaml")["spec"]["entrypoint"])[3:])
    assert caption_args.prepared == prepared and caption_args.model == export
    serve_config = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    assert [a["args"]["model"] for a in serve_config["applications"]] == [export]


def test_rayservice_runs_the_serve_app_of_configs_serve_gpu() -> None:
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from pipelines.serve import parse_config

    m = manifest("rayservice.yaml")
    serve_config = yaml.safe_load(m["spec"]["serveConfigV2"])
    ServeDeploySchema.parse_obj(serve_config)  # Ray Serve's own schema of `serve deploy` files
    reference = load_yaml(os.path.join(REPO, "configs", "serve", "gpu.yaml"))
    assert serve_config["http_options"] == {**reference["http_options"], "host": "0.0.0.0"}
    assert serve_config["proxy_location"] == reference["proxy_location"]
    for app in serve_config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.__fields__), set(app) - set(ServeApplicationSchema.__fields__)
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        cfg = parse_config(app["args"])
        assert app == next(a for a in reference["applications"] if a["name"] == app["name"])
        gpu, cpu = group(m, "gpu"), group(m, "cpu")
        gpu_cpus, gpus = pod_limits(gpu)
        assert gpu_cpus >= cfg.predictor.num_cpus and gpus >= cfg.predictor.num_gpus
        assert gpu["maxReplicas"] * (gpus // cfg.predictor.num_gpus) >= cfg.predictor.autoscaling.max_replicas
        cpu_total = cpu["maxReplicas"] * pod_limits(cpu)[0]
        assert cpu_total >= (cfg.preprocess.num_cpus * cfg.preprocess.autoscaling.max_replicas
                             + cfg.ingress.num_cpus * cfg.ingress.autoscaling.max_replicas)


@pytest.mark.parametrize("name", MANIFESTS)
def test_images_match_the_pinned_ray_and_the_gpus(name: str) -> None:
    m = manifest(name)
    assert cluster_spec(m)["rayVersion"] == ray.__version__
    for group_name, c in containers(m):
        gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert c["image"].endswith("-py311-gpu" if gpus else "-py311"), (group_name, c["image"])
        assert c["resources"]["requests"] == c["resources"]["limits"], group_name  # Ray sizes itself by limits
    assert cluster_spec(m)["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_dockerfile_installs_the_pinned_stack() -> None:
    with open(os.path.join(CLUSTER, "Dockerfile")) as f:
        text = f.read()
    assert f"ARG BASE=rayproject/ray:{ray.__version__}-py311-gpu" in text
    pins = makefile_torch_pins()
    assert pins and f"pip install --no-cache-dir {' '.join(pins)}" in text
    assert text.index("torch==") < text.index("pip install --no-cache-dir .")


# ------------------------------------------------------------------------------------------ cluster launcher


def prepared_launcher(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before it calls the cloud: defaults merged, then Ray's schema and consistency rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_launcher_passes_rays_validation() -> None:
    config = prepared_launcher(load_yaml(LAUNCHER))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    cpu, gpu = types["cpu"], types["gpu"]
    assert "GPU" not in cpu["resources"] and cpu["resources"]["CPU"] > 0
    assert gpu["resources"]["GPU"] > 0 and gpu["docker"]["worker_image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311"
    train = load_yaml(os.path.join(REPO, "configs", "train", "base_gpu.yaml"))["workers"]
    assert gpu["max_workers"] * gpu["resources"]["GPU"] >= train["num"] * train["gpus"]


def test_launcher_installs_the_mounted_repository_with_the_pinned_torch_first() -> None:
    config = prepared_launcher(load_yaml(LAUNCHER))
    mounts = config["file_mounts"]  # the repository, and the cluster's Ray auth token
    (remote, local), = [(r, m) for r, m in mounts.items() if not m.endswith("auth_token")]
    assert os.path.realpath(os.path.join(REPO, local)) == REPO  # `ray up` runs from the repository root
    assert list(mounts.values()).count(".cache/ray/auth_token") == 1 and len(mounts) == 2
    commands = config["setup_commands"]
    assert commands == [f"pip install -q {' '.join(makefile_torch_pins())}", f"pip install -q {remote}"]
    for path in (".venv", ".git"):
        assert path in config["rsync_exclude"]


def test_launcher_validation_rejects_unknown_fields_and_bad_sizes() -> None:
    config = load_yaml(LAUNCHER)
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu"]["resourcez"] = bad["available_node_types"]["gpu"].pop("resources")
    with pytest.raises(jsonschema.ValidationError, match="resourcez"):
        prepared_launcher(bad)
    bad = copy.deepcopy(config)
    bad["available_node_types"]["cpu"]["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        prepared_launcher(bad)
