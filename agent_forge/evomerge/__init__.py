"""EvoMerge: merge language models and evolve the merges.

Importing the package is cheap: heavy modules (torch, transformers) load only when the
submodule that needs them is imported.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
