"""The caption job's proposal stage (dense captioning without a detections file): a proposal model's boxes for
every image of a shard, cut by the rule Serve applies too."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from PIL import Image

from dynrefer.config import _build
from dynrefer.preprocess import PrepareConfig, decode_record
from dynrefer.proposal_filter import keep_proposals
from pipelines.caption_job import CaptionJob, read_plan
from pipelines.prepare import read_image_bytes


def propose_shard(proposer: Any, records: list[dict[str, Any]], job: CaptionJob) -> list[dict[str, Any]]:
    """The records with their proposed regions (best first, after ``min_score`` and ``max_regions``); an
    unreadable image keeps none (the next stage turns it into its error row). Proposals with less than a pixel
    inside the image are no regions and are not kept (:func:`dynrefer.proposal_filter.keep_proposals`, the rule
    Serve applies too)."""
    so = job.storage_options or None
    prep = PrepareConfig()
    for start in range(0, len(records), job.batch_size):
        decoded: list[tuple[dict[str, Any], Image.Image]] = []
        for record in records[start: start + job.batch_size]:
            if "error" in record:
                continue
            try:
                image, _ = decode_record(record, read_image_bytes(record["file"], so), prep)
            except OSError:
                continue
            if image is not None:
                decoded.append((record, image))
        proposed = proposer.propose_batch([image for _, image in decoded]) if decoded else []
        for (record, image), boxes in zip(decoded, proposed):
            kept = keep_proposals(boxes, *image.size, job.min_score, job.max_regions)
            record["regions"] = [{"region_id": f"{record['image_id']}-p{k}", "box": box, "score": score,
                                  "detection_category_id": None} for k, (box, score) in enumerate(kept)]
    return records


class ProposeRegions:
    """Ray Data actor: loads the proposal model once, then proposes the regions of every shard of images."""

    def __init__(self, job: dict[str, Any]):
        import torch

        from dynrefer.proposals import load_proposer

        self.job = _build(CaptionJob, job, "job")
        device = "cuda" if self.job.gpus_per_proposer > 0 and torch.cuda.is_available() else "cpu"
        self.proposer = load_proposer(self.job.proposals, self.job.storage_options or None, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        so = self.job.storage_options or None
        records = [json.dumps(propose_shard(self.proposer, read_plan(str(p), so)["records"], self.job))
                   for p in batch["plan"]]
        return {**batch, "records": np.array(records, dtype=object)}
