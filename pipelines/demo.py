"""The built-in demo: every stage of the system on the synthetic corpus, on one local Ray cluster.

synth -> prepare (Ray Data) -> pretrain the tiny CLIP (Ray Train) -> align the Q-former's queries with text
(BLIP-2's first stage, Ray Train + DeepSpeed) -> train DynRefer from there (Ray Train + DeepSpeed, 2 workers) ->
train the proposal model (Ray Train) -> caption the held-out regions (Ray Data) -> dense-caption the
held-out images (Ray Data, proposals) -> evaluate -> serve (Ray Serve on 127.0.0.1: real HTTP requests, then stop)
-> ``<out>/report.md`` with the metrics and pictures of held-out images with their generated captions.

Each stage is the same program as its subcommand (``dynrefer synth|prepare|pretrain|train|proposals|caption|
evaluate|serve``), called with the arguments shown in the log; a stage whose output exists is reused, so a second
run is quick and an interrupted one resumes (``--force`` redoes everything).

    dynrefer demo [--out demo] [--images 300] [--force]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import time
from typing import Any, Callable

from dynrefer import storage
from dynrefer.paths import repo_path
from pipelines.args import secure_ray_env, setup_logging

log = logging.getLogger("dynrefer.demo")

STAGES = ("synth", "prepare", "pretrain", "qformer", "train", "proposals", "caption", "dense", "evaluate", "serve", "report")


def config(*parts: str) -> str:
    return repo_path("configs", *parts)


class Demo:
    """The stages in order; each knows its output, so finished ones are skipped."""

    def __init__(self, out: str, images: int, force: bool):
        self.out, self.images, self.force = os.path.abspath(out), images, force
        self.timings: dict[str, float] = {}
        self.summaries: dict[str, Any] = {}
        self.clip = self.path("runs", "pretrain-tiny", "clip.safetensors")

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def stage(self, name: str, marker: str, run: Callable[[], None]) -> None:
        """Run ``run`` unless ``marker`` exists (or --force); the marker is written last by every stage."""
        number = STAGES.index(name) + 1
        if os.path.exists(marker) and not self.force:
            log.info("[%d/%d %s] done already, reusing %s (--force to redo)", number, len(STAGES), name,
                     os.path.relpath(marker, self.out))
            return
        log.info("[%d/%d %s] running", number, len(STAGES), name)
        start = time.perf_counter()
        run()
        self.timings[name] = round(time.perf_counter() - start, 1)
        log.info("[%d/%d %s] finished in %.0f s", number, len(STAGES), name, self.timings[name])

    def command(self, module: str, argv: list[str]) -> None:
        """Run one pipeline's ``main(argv)`` in this process (the same code as its subcommand)."""
        import importlib

        log.info("$ dynrefer %s %s", module.rsplit(".", 1)[-1], shlex.join(argv))
        code = importlib.import_module(module).main(argv)
        if code:
            raise RuntimeError(f"dynrefer {module.rsplit('.', 1)[-1]} exited with {code}")

    # ------------------------------------------------------------------------------------------- the stages

    def synth(self) -> None:
        from dynrefer import synth

        root = self.path("synth")
        meta = os.path.join(root, "synth_meta.json")
        if os.path.exists(meta) and not self.force:
            with open(meta) as f:
                version = json.load(f).get("version")
            if version != synth.GENERATOR_VERSION:
                raise SystemExit(f"{root} holds synthetic corpus version {version}, this code writes version "
                                 f"{synth.GENERATOR_VERSION}: every stage after it would reuse stale outputs; run "
                                 "`dynrefer demo --force` (or give --out a new directory)")
        self.stage("synth", meta,
                   lambda: synth.write_corpus(root, self.images, seed=0))

    def prepare(self) -> None:
        self.stage("prepare", self.path("prepared", "summary.json"), lambda: self.command("pipelines.prepare", [
            "--config", config("prepare", "synthetic.yaml"), "--root", self.path("synth"),
            "--out", self.path("prepared"), "--address", "auto"] + (["--force"] if self.force else [])))
        self.summaries["prepare"] = storage.read_json(self.path("prepared", "summary.json"))

    def pretrain(self) -> None:
        self.stage("pretrain", self.clip, lambda: self.command("pipelines.pretrain", [
            "--config", config("pretrain", "tiny.yaml"), "--prepared", self.path("prepared"),
            "--storage-path", self.path("runs"), "--name", "pretrain-tiny", "--export", self.clip,
            "--address", "auto"]))

    def proposals(self) -> None:
        self.stage("proposals", self.path("runs", "proposals", "export", "model.safetensors"),
                   lambda: self.command("pipelines.proposals", [
                       "--config", config("proposals", "train_tiny.yaml"), "--corpus", self.path("synth"),
                       "--storage-path", self.path("runs"), "--address", "auto"]))

    def qformer(self) -> None:
        self.stage("qformer", self.path("runs", "qformer-tiny", "export", "model.safetensors"), lambda: self.command(
            "pipelines.train", ["--config", config("train", "tiny_qformer.yaml"), "--prepared", self.path("prepared"),
                                "--storage-path", self.path("runs"), "--name", "qformer-tiny", "--address", "auto",
                                "--encoder-checkpoint", self.clip]))

    def train(self) -> None:
        self.stage("train", self.path("runs", "tiny", "export", "model.safetensors"), lambda: self.command(
            "pipelines.train", ["--config", config("train", "tiny.yaml"), "--prepared", self.path("prepared"),
                                "--storage-path", self.path("runs"), "--name", "tiny", "--address", "auto",
                                "--encoder-checkpoint", self.clip,
                                "--init-from", self.path("runs", "qformer-tiny", "export")]))

    def caption(self) -> None:
        out = self.path("captions")
        self.stage("caption", os.path.join(out, "summary.json"), lambda: self.command("pipelines.caption", [
            "--config", config("caption", "synthetic.yaml"), "--model", self.path("runs", "tiny", "export"),
            "--prepared", self.path("prepared"), "--out", out, "--address", "auto", "--quiet"]))
        self.summaries["caption"] = storage.read_json(os.path.join(out, "summary.json"))

    def dense(self) -> None:
        out = self.path("dense")
        self.stage("dense", os.path.join(out, "summary.json"), lambda: self.command("pipelines.caption", [
            "--config", config("caption", "synthetic_dense.yaml"), "--model", self.path("runs", "tiny", "export"),
            "--images", self.path("synth"), "--proposals", self.path("runs", "proposals", "export"), "--out", out,
            "--address", "auto", "--quiet"]))
        self.summaries["dense"] = storage.read_json(os.path.join(out, "summary.json"))

    def evaluate(self) -> None:
        """The test split's own boxes (every task, GT-box dense captioning ranked by caption score, and what the
        captions say slot by slot) and the proposals' dense captioning, each from its job file."""
        for name, job in (("captions", "synthetic.yaml"), ("dense", "synthetic_dense.yaml")):
            out = self.path("metrics", name)
            metrics_json = os.path.join(out, "metrics.json")
            if os.path.exists(metrics_json) and stale_metrics(storage.read_json(metrics_json), config("evaluate", job)):
                log.info("%s was written by an older evaluation protocol; scoring again", metrics_json)
                os.remove(metrics_json)
            self.stage("evaluate", metrics_json, lambda: self.command("pipelines.evaluate", [
                "--config", config("evaluate", job), "--predictions", self.path(name, "captions"),
                "--prepared", self.path("prepared"), "--out", out]))
            self.summaries[f"metrics ({name})"] = storage.read_json(metrics_json)

    def serve(self) -> None:
        out = self.path("serve", "responses.json")
        self.stage("serve", out, lambda: storage.write_json(out, serve_requests(self)))
        self.summaries["serve"] = storage.read_json(out)

    def report(self) -> str:
        """Always rewritten: it is cheap and shows this run's timings."""
        log.info("[%d/%d report] writing %s", len(STAGES), len(STAGES), self.path("report.md"))
        return write_report(self)


# ------------------------------------------------------------------------------------------- serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_requests(demo: Demo, images: int = 2) -> dict[str, Any]:
    """Start the Serve app on 127.0.0.1, send held-out images to /v1/regions and /v1/dense, stop it."""
    import requests
    import yaml
    from ray import serve

    from dynrefer import datasets
    from pipelines.serve import app_builder

    with open(config("serve", "local.yaml")) as f:
        args = yaml.safe_load(f)["applications"][0]["args"]
    args.update(model=demo.path("runs", "tiny", "export"), proposals=demo.path("runs", "proposals", "export"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    calls: list[dict[str, Any]] = []
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder(args), name="dynrefer-demo", route_prefix="/")
        for i, record in enumerate(datasets.read_visual_genome(demo.path("synth"), split="test")):
            if i == images:
                break
            data = base64.b64encode(storage.read_bytes(record["file"])).decode()
            boxes = [r["box"] for r in record["regions"][:4]]
            for route, body in (("/v1/regions", {"image": data, "boxes": boxes}), ("/v1/dense", {"image": data})):
                start = time.perf_counter()
                response = requests.post(base + route, json=body, timeout=120)
                calls.append({"route": route, "image_id": record["image_id"], "status": response.status_code,
                              "seconds": round(time.perf_counter() - start, 2), "response": response.json()})
        model = requests.get(base + "/v1/model", timeout=30).json()
    finally:
        serve.delete("dynrefer-demo")
        serve.shutdown()
    failed = [c for c in calls if c["status"] != 200]
    if failed:
        raise RuntimeError(f"serve: {len(failed)} requests failed, e.g. {failed[0]}")
    return {"url": base, "model": model.get("config", model), "calls": calls}


# ------------------------------------------------------------------------------------------- report


def stale_metrics(result: dict[str, Any], job_file: str) -> bool:
    """Whether a metrics.json lacks a task its job file asks for, or holds DenseCap mAP of the old 25-pair
    protocol (before the reference's METEOR > 0 threshold was counted)."""
    import yaml

    with open(job_file) as f:
        tasks = yaml.safe_load(f).get("tasks") or []
    dense = result.get("dense")
    return any(t not in result for t in tasks) or (dense is not None and dense.get("pairs") != 30)


def headline(demo: Demo) -> list[str]:
    """One table of the numbers that matter, each with its protocol, above the full metrics."""
    given = demo.summaries.get("metrics (captions)", {})
    dense = demo.summaries.get("metrics (dense)", {}).get("dense", {})
    caption, content, gt_dense = given.get("caption", {}), given.get("content", {}), given.get("dense", {})
    if not (caption or dense):
        return []

    def pct(value: Any) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    slots = content.get("slots", {})
    rows = [("METEOR / CIDEr (region captioning, the split scored whole)",
             f"{pct(caption.get('meteor'))} / {pct(caption.get('cider'))}"),
            ("caption names the right shape / colour / pattern / size",
             " / ".join(pct(slots.get(s, {}).get("correct")) for s in ("shape", "colour", "pattern", "size"))),
            ("all four right at once / with the size right or left out",
             f"{pct(content.get('all_four'))} / {pct(content.get('all_four_size_optional'))}"),
            ("relation / neighbour right (regions whose reference names one)",
             f"{pct(slots.get('relation', {}).get('correct'))} / {pct(slots.get('neighbour', {}).get('correct'))}"),
            ("tags precision / recall", f"{pct(content.get('tags', {}).get('precision'))} / "
                                        f"{pct(content.get('tags', {}).get('recall'))}"),
            ("category / attribute (all three) accuracy", f"{pct(content.get('category_accuracy'))} / "
             f"{pct(content.get('attribute_accuracy', {}).get('all_three'))}"),
            ("DenseCap mAP, 30 pairs: test boxes ranked by caption score / proposals",
             f"{pct(gt_dense.get('map'))} / {pct(dense.get('map'))}"),
            ("detection mAP: test boxes / proposals", f"{pct(gt_dense.get('det_map'))} / {pct(dense.get('det_map'))}")]
    lines = ["## Headline (split test)", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return lines + ["", f"DenseCap protocol: {dense.get('protocol') or gt_dense.get('protocol', 'n/a')}.", ""]


def _table(title: str, rows: dict[str, Any]) -> list[str]:
    lines = [f"### {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows.items() if not isinstance(v, (dict, list))]
    return lines + [""]


def write_report(demo: Demo, examples: int = 3) -> str:
    """report.md: the metrics, pictures of held-out images with their generated captions, the stage summaries."""
    from dynrefer.imageio import decode_image
    from dynrefer.visualize import draw_regions
    from pipelines.caption import read_captions

    lines = ["# DynRefer demo report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{demo.out}`.", ""]
    lines += headline(demo)
    for name in ("captions", "dense"):
        md = demo.path("metrics", name, "metrics.md")
        if os.path.exists(md):
            lines += [f"## Metrics: {name}", "", open(md).read(), ""]
    lines += ["## Held-out images", "",
              "Left: the test split's own boxes with the generated captions. Right: dense captioning (proposal boxes).",
              ""]
    given = _by_image(read_captions(demo.path("captions")))
    dense = _by_image(read_captions(demo.path("dense")))
    from dynrefer import datasets

    for record in list(datasets.read_visual_genome(demo.path("synth"), split="test"))[:examples]:
        image = decode_image(storage.read_bytes(record["file"]))
        for kind, rows in (("regions", given.get(record["image_id"], [])), ("dense", dense.get(record["image_id"], []))):
            rows = [r for r in rows if not r.get("error")][:6]
            labels = [_label(r) for r in rows]
            picture = draw_regions(image, [r["box"] for r in rows], labels)
            name = f"{kind}-{record['image_id']}.png"
            picture.save(demo.path(name))
            lines += [f"![{kind} of image {record['image_id']}]({name})", ""]
    if "serve" in demo.summaries:
        calls = demo.summaries["serve"]["calls"]
        lines += ["## Serve", "", f"{len(calls)} requests to the app on 127.0.0.1, all answered 200:", "",
                  "| route | image | seconds | regions |", "|---|---|---|---|"]
        lines += [f"| {c['route']} | {c['image_id']} | {c['seconds']} | {len(c['response'].get('regions', []))} |"
                  for c in calls]
        lines.append("")
    lines += ["## Stages", ""]
    for name, summary in demo.summaries.items():
        if name.startswith("metrics") or name == "serve":
            continue
        lines += _table(name, summary)
    if demo.timings:
        lines += _table("seconds per stage (this run)", demo.timings)
    path = demo.path("report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _by_image(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: -(r.get("score") or 0.0)):
        out.setdefault(str(r["image_id"]), []).append(r)
    return out


def _label(row: dict[str, Any]) -> str:
    text = row.get("caption") or ""
    if row.get("category"):
        text += f" [{row['category']}]"
    return text


# ------------------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo", help="output directory (default: demo/)")
    p.add_argument("--images", type=int, default=300, help="images in the synthetic corpus")
    p.add_argument("--force", action="store_true", help="rerun every stage")
    return p


def main(argv: list[str] | None = None) -> int:
    import ray

    args = parser().parse_args(argv)
    setup_logging()
    if args.force and os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", repo_path(".cache", "torch_extensions"))
    start = time.perf_counter()
    demo = Demo(args.out, args.images, force=False)
    secure_ray_env()  # token auth: Ray's ports listen beyond loopback
    ray.init(include_dashboard=False, log_to_driver=True, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for name in STAGES[:-1]:
            getattr(demo, name)()
        report = demo.report()
    finally:
        ray.shutdown()
    given = demo.summaries.get("metrics (captions)", {})
    dense = demo.summaries.get("metrics (dense)", {}).get("dense", {})
    print(json.dumps({"report": report, "seconds": round(time.perf_counter() - start, 1),
                      "stage_seconds": demo.timings, "caption": given.get("caption", {}),
                      "content": {k: v for k, v in given.get("content", {}).items() if k != "protocol"},
                      "dense (test boxes)": given.get("dense", {}).get("map"), "dense": dense},
                     indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
