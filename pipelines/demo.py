"""The built-in demo: every stage of the system on the synthetic corpus, on a local Ray cluster.

Stages run in order and each is skipped when its output is already there (``--force`` reruns them):
synth -> prepare -> report. Later stages (pretrain, train, caption, evaluate, serve) plug in here as they land.

    dynrefer demo [--out demo] [--images 300] [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from dynrefer import storage
from pipelines.args import setup_logging

log = logging.getLogger("dynrefer.demo")


def stage(name: str, done: bool, force: bool) -> bool:
    """Whether to run a stage, logging the decision so progress is visible."""
    if done and not force:
        log.info("[%s] already done, reusing it (--force to redo)", name)
        return False
    log.info("[%s] running", name)
    return True


def run_synth(out: str, images: int, force: bool) -> str:
    from dynrefer import synth

    root = os.path.join(out, "synth")
    if stage("synth", os.path.exists(os.path.join(root, "synth_meta.json")), force):
        synth.write_corpus(root, images, seed=0)
    return root


def run_prepare(out: str, root: str, force: bool) -> tuple[str, dict[str, Any]]:
    from pipelines.prepare import PrepareJob, run

    prepared = os.path.join(out, "prepared")
    job = PrepareJob.from_yaml(os.path.join(_repo(), "configs", "prepare", "synthetic.yaml"), root=root, out=prepared)
    summary_file = os.path.join(prepared, "summary.json")
    if stage("prepare", os.path.exists(summary_file), force):
        run(job, force=force)
    return prepared, storage.read_json(summary_file)


def write_report(out: str, root: str, summaries: dict[str, dict[str, Any]], examples: int = 3) -> str:
    """demo/report.md with the stage summaries and pictures of held-out images with their regions."""
    from dynrefer import datasets
    from dynrefer.imageio import decode_image
    from dynrefer.visualize import draw_regions

    lines = ["# DynRefer demo report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    for name, summary in summaries.items():
        lines += [f"## {name}", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary.items()]
        lines.append("")
    lines += ["## Held-out images", ""]
    for i, record in enumerate(datasets.read_visual_genome(root, split="test")):
        if i == examples:
            break
        image = decode_image(storage.read_bytes(record["file"]))
        regions = record["regions"][:8]
        picture = draw_regions(image, [r["box"] for r in regions], [r["caption"] or "" for r in regions])
        name = f"example-{record['image_id']}.png"
        picture.save(os.path.join(out, name))
        lines += [f"![image {record['image_id']}]({name})", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    root = run_synth(args.out, args.images, args.force)
    _, prepared = run_prepare(args.out, root, args.force)
    report = write_report(args.out, root, {"prepare": prepared})
    ray.shutdown()
    print(json.dumps({"report": report, "prepare": prepared, "seconds": round(time.perf_counter() - start, 1)},
                     indent=2))
    return 0 if prepared.get("balanced") else 1


if __name__ == "__main__":
    sys.exit(main())
