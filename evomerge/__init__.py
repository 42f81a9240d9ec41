"""``evomerge``: the short import name the specification's examples use.

``from evomerge.config import create_default_config`` gives exactly the objects of
``agent_forge.evomerge.config`` (the same module, not a copy), so both spellings mix freely.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

_TARGET = "agent_forge.evomerge"


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(_TARGET + spec.name[len(__name__) :])

    def exec_module(self, module: ModuleType) -> None:  # already executed under its real name
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(__name__ + "."):
            return None
        if importlib.util.find_spec(_TARGET + fullname[len(__name__) :]) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader())


if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())

from agent_forge.evomerge import *  # noqa: E402,F403
from agent_forge.evomerge import __version__  # noqa: E402,F401
