"""The ``dynrefer`` command: one subcommand per stage, each with ``--help``; configs are files, paths local or s3://.

Ray-backed stages (prepare, train, ...) hand their arguments to their own module's ``main``, so that
``python -m pipelines.prepare`` (e.g. under ``ray job submit``) and ``dynrefer prepare`` are the same program.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from pipelines.args import add_storage_args, storage_options_from_args

log = logging.getLogger("dynrefer")


def cmd_model(args: argparse.Namespace) -> int:
    import torch

    from dynrefer.config import load_config
    from dynrefer.model import DynRefer, parameter_counts

    cfg = load_config(args.config)
    device = torch.device("meta") if args.meta else torch.device("cpu")
    with device:
        model = DynRefer(cfg, storage_options_from_args(args))
    total, trainable = parameter_counts(model)
    rows = {"config": args.config, "total_parameters": total, "trainable_parameters": trainable}
    for name in ["encoder", "embedding.alignment", "embedding.fusion", "embedding.qformer", "tags", "contrastive",
                 "language.lm", "language.proj"]:
        module = model.get_submodule(name)
        rows[f"{name}_parameters"] = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for key, value in rows.items():
            print(f"{key:<36} {value:>16,}" if isinstance(value, int) else f"{key:<36} {value:>16}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from dynrefer import synth

    summary = synth.write_corpus(args.out, args.num_images, seed=args.seed, storage_options=storage_options_from_args(args),
                                 jpeg_quality=args.jpeg_quality, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "model": (cmd_model, "build a model from a config and print its parameter counts"),
    "synth": (cmd_synth, "generate the built-in synthetic corpus (Visual Genome v1.2 layout)"),
}
PIPELINES = {
    "prepare": ("pipelines.prepare", "Ray Data: decode images, compute views and pHASH codes, write Parquet shards"),
    "pretrain": ("pipelines.pretrain", "Ray Train: contrastive pre-training of the encoder's CLIP on region crops"),
    "proposals": ("pipelines.proposals", "Ray Train: the class-agnostic proposal model on a VG-layout corpus; export"),
    "train": ("pipelines.train", "Ray Train + DeepSpeed: train DynRefer on prepared shards, checkpoint, resume, export"),
    "demo": ("pipelines.demo", "run the whole system on the built-in synthetic corpus and write demo/report.md"),
    "caption": ("pipelines.caption", "Ray Data batch inference: captions and tags for every prepared region"),
    "evaluate": ("pipelines.evaluate", "score predictions: METEOR/CIDEr, DenseCap mAP, attribute mAP, recognition"),
    "serve": ("pipelines.serve", "Ray Serve app: region captions over HTTP (JSON API and a web page)"),
    "convert-official": ("pipelines.convert_official", "the authors' released checkpoint and the weights it "
                         "builds on -> an export (config.json + model.safetensors)"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynrefer", description="DynRefer region-level vision-language model on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("model", help=COMMANDS["model"][1], description=COMMANDS["model"][1])
    m.add_argument("--config", default="tiny", help="model config: a name under configs/model/ or a YAML path")
    m.add_argument("--meta", action="store_true", help="build on the meta device (no memory; for the large configs)")
    m.add_argument("--json", action="store_true", help="print JSON")
    add_storage_args(m)

    s = sub.add_parser("synth", help=COMMANDS["synth"][1], description=COMMANDS["synth"][1])
    s.add_argument("--out", required=True, help="output directory or s3:// prefix")
    s.add_argument("--num-images", type=int, default=1000, help="number of images (10 to 1,000,000)")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same corpus)")
    s.add_argument("--jpeg-quality", type=int, default=95)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    add_storage_args(s)
    for name, (_, help_text) in PIPELINES.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PIPELINES:
        import importlib

        return importlib.import_module(PIPELINES[argv[0]][0]).main(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command][0](args)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
