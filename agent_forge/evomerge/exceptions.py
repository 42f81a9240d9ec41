"""The exceptions EvoMerge raises. Each carries a message that names the problem and the fix.

The CLI maps every `EvoMergeException` to one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations


class EvoMergeException(Exception):
    """Base class of every error EvoMerge raises on purpose (bad input, missing model, ...)."""


class ConfigurationError(EvoMergeException, ValueError):
    """A configuration, recipe or setting is invalid."""


class ModelLoadError(EvoMergeException):
    """A model could not be found, read or trusted (missing path, not cached offline, pickle)."""


class IncompatibleModelsError(EvoMergeException):
    """The models cannot be merged weight by weight (architecture, names, shapes, vocabulary)."""


class MergeError(EvoMergeException):
    """A merge failed while computing or writing tensors."""


class EvaluationError(EvoMergeException):
    """A task could not be loaded or a model could not be evaluated."""


class GGUFError(ModelLoadError):
    """A GGUF file is malformed, unsupported, or could not be written."""


class RunInterrupted(EvoMergeException):
    """A run was interrupted; its folder holds a checkpoint that ``--resume`` finishes."""
