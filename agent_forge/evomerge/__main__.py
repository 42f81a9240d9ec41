"""``python -m agent_forge.evomerge`` is the same as ``python -m agent_forge.evomerge.cli``."""

from .cli import run_main

run_main()
