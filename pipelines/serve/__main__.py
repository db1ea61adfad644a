"""``python -m pipelines.serve --config configs/serve/local.yaml``."""

import sys

from .cli import main

sys.exit(main())
