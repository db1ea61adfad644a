"""DynRefer: region-level multi-modality via dynamic resolution (arXiv 2405.16071). Knows nothing of Ray."""

__version__ = "0.1.0"
