"""DynRefer: region-level multi-modality via dynamic resolution (arXiv 2405.16071). Knows nothing of Ray.

``dynrefer.load(export)`` is the Python entry point (see :mod:`dynrefer.predictor`).
"""

__version__ = "0.1.0"

_API = ("load", "Predictor", "Region", "View")


def __getattr__(name: str):
    """``load``, ``Predictor``, ``Region`` and ``View`` from :mod:`dynrefer.predictor`, imported on first use so
    that ``import dynrefer.views`` (CPU workers) does not import torch."""
    if name in _API:
        from dynrefer import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'dynrefer' has no attribute {name!r}")
