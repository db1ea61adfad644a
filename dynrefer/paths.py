"""Where this checkout's own files are: the one place that knows the repository root from a module's location."""

from __future__ import annotations

import os

#: The checkout holding dynrefer/, pipelines/ and configs/ (site-packages' parent for an installed copy).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_path(*parts: str) -> str:
    """A path inside the checkout, e.g. ``repo_path("configs", "model", "tiny.yaml")``."""
    return os.path.join(REPO_ROOT, *parts)
