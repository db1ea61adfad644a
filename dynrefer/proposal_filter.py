"""Which proposed boxes become regions: the one rule that dense captioning in Serve and in batch jobs share.

A detector (an untrained one above all) proposes boxes a fraction of a pixel wide, or on the image border, which
:func:`dynrefer.views.validate_box` would refuse. The client never sent those, so refusing the request (or writing
error rows) about them would be wrong: they are dropped here, by the very rule ``validate_box`` applies, so that
every box kept is one the view code accepts.
"""

from __future__ import annotations

import math
from typing import Sequence

from dynrefer.views import validate_box


def keep_proposals(proposed: Sequence[tuple[Sequence[float], float]], width: int, height: int, min_score: float,
                   max_regions: int) -> list[tuple[list[float], float]]:
    """The best ``max_regions`` of ``(box, score)`` proposals scoring at least ``min_score`` (finite scores only),
    best first (ties keep the detector's order), each box clipped to the ``width`` x ``height`` image; boxes with
    less than 1 px inside the image in either direction are dropped."""
    kept: list[tuple[list[float], float]] = []
    for box, score in proposed:
        s = float(score)
        if not math.isfinite(s) or s < min_score:
            continue
        try:
            clipped = validate_box(box, width, height)
        except (ValueError, TypeError):
            continue
        kept.append(([float(v) for v in clipped], s))
    kept.sort(key=lambda p: -p[1])
    return kept[:max(0, max_regions)]
