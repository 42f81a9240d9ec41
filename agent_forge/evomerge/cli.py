"""EvoMerge's command line: ``python -m agent_forge.evomerge.cli`` (installed as ``evomerge``).

Run ``python -m agent_forge.evomerge.cli --help`` for the operations and examples. Every user
mistake ends with one ``error: …`` line and exit code 2 (1 for an internal failure); the
traceback appears only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .exceptions import EvoMergeException, RunInterrupted

logger = logging.getLogger("agent_forge.evomerge.cli")

EXAMPLES = """\
examples:
  run the evolutionary tournament with the embedded default models (offline, CPU):
    python -m agent_forge.evomerge.cli --run
  run it with models from Hugging Face (or local folders, or .gguf files, mixed freely):
    python -m agent_forge.evomerge.cli --run --model1 bert-base-uncased --model2 roberta-base \
--model3 distilbert-base-uncased
  fewer than three models: the remaining slots come from the configuration's defaults:
    python -m agent_forge.evomerge.cli --run --model1 bert-base-uncased --model2 roberta-base
  evaluate a merged model on the configured tasks (test split):
    python -m agent_forge.evomerge.cli --evaluate path/to/merged/model
  generate text with a merged model:
    python -m agent_forge.evomerge.cli --generate path/to/merged/model --prompt "Your prompt here"
  use a configuration file (flags given on the command line override it):
    python -m agent_forge.evomerge.cli --config path/to/config.json --run
  continue an interrupted run / rebuild a model from its recipe:
    python -m agent_forge.evomerge.cli --resume evomerge_runs/run-20261127-120000
    python -m agent_forge.evomerge.cli --merge path/to/best/evomerge_recipe.json --output merged
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise _UsageError(f"{message} (see --help)")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="evomerge",
        description="Merge language models and evolve the merges.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ops = parser.add_argument_group("operations (choose one)")
    ops.add_argument("--run", action="store_true", help="run the evolutionary tournament")
    ops.add_argument(
        "--evaluate",
        metavar="PATH",
        help="evaluate a model folder, hub id or .gguf on the test split",
    )
    ops.add_argument(
        "--generate", metavar="PATH", help="generate text with a model (needs --prompt)"
    )
    ops.add_argument(
        "--merge",
        metavar="RECIPE",
        help="merge once from a recipe (evomerge_recipe.json or mergekit YAML)",
    )
    ops.add_argument(
        "--resume", metavar="RUN_DIR", help="continue an interrupted --run from its folder"
    )
    models = parser.add_argument_group("models")
    for i in (1, 2, 3):
        models.add_argument(
            f"--model{i}", metavar="MODEL", help="Hugging Face id, local folder or .gguf file"
        )
    models.add_argument(
        "--base", metavar="MODEL", help="base model the task vectors are taken against"
    )
    models.add_argument(
        "--source",
        action="append",
        metavar="NAME=PATH",
        help="with --merge: read the recipe's model NAME from PATH (a model that has moved); "
        "repeat for several",
    )
    run = parser.add_argument_group("run settings")
    run.add_argument("--config", metavar="PATH", help="JSON or YAML configuration file")
    run.add_argument("--output", metavar="DIR", help="run folder (--run) or model folder (--merge)")
    run.add_argument("--generations", type=int, metavar="N", help="generations per search stage")
    run.add_argument("--population", type=int, metavar="N", help="candidates per generation")
    run.add_argument("--strategy", choices=["tournament", "cmaes"])
    run.add_argument(
        "--method", metavar="NAME", help="a technique (ties, slerp, …), or mixed, ps, dfs, ps_dfs"
    )
    run.add_argument("--seed", type=int, metavar="N")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])
    run.add_argument(
        "--workers", type=int, metavar="N", help="parallel scorers (with --backend ray)"
    )
    run.add_argument("--backend", choices=["serial", "ray"])
    run.add_argument(
        "--fitness-sample-size", type=int, metavar="N", help="score fitness on N examples per task"
    )
    out = parser.add_argument_group("generation and export")
    out.add_argument("--prompt", metavar="TEXT")
    out.add_argument(
        "--max-length",
        type=int,
        default=100,
        metavar="N",
        help="new tokens to generate (default 100)",
    )
    out.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)"
    )
    out.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample among the k most likely tokens (with --temperature)",
    )
    out.add_argument(
        "--export-gguf", action="store_true", help="also write the merged model as GGUF"
    )
    out.add_argument(
        "--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16", help="GGUF tensor type"
    )
    logs = parser.add_argument_group("logging")
    logs.add_argument("--verbose", "-v", action="store_true", help="debug logs and tracebacks")
    logs.add_argument("--quiet", "-q", action="store_true", help="only errors and the final result")
    logs.add_argument("--log-file", metavar="PATH", help="also write debug logs to this file")
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    return parser


def given_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> set[str]:
    """The destinations of the flags the command line set (to a value other than the default)."""
    return {
        action.dest
        for action in parser._actions  # argparse has no public list of its actions
        if action.dest not in ("help", "version")
        and getattr(args, action.dest, action.default) != action.default
    }


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    root = logging.getLogger("agent_forge")
    root.setLevel(logging.DEBUG)
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(
        logging.Formatter("%(levelname)s %(message)s" if args.verbose else "%(message)s")
    )
    root.addHandler(console)
    if args.log_file:
        handler = logging.FileHandler(args.log_file)
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(handler)
    root.propagate = False
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        operations = [
            op for op in ("run", "evaluate", "generate", "merge", "resume") if getattr(args, op)
        ]
        if len(operations) != 1:
            raise _UsageError(
                "choose exactly one of --run, --evaluate, --generate, --merge, --resume "
                "(see --help)"
                if operations
                else "nothing to do: give --run, --evaluate, --generate, --merge or "
                "--resume (see --help)"
            )
        if args.source and operations[0] != "merge":
            raise _UsageError("--source NAME=PATH applies to --merge only")
        args.given_flags = given_flags(parser, args)
        setup_logging(args)
        from . import commands

        return getattr(commands, f"cmd_{operations[0]}")(args)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EvoMergeException as exc:
        if args is not None and args.verbose:
            logging.getLogger("agent_forge").exception("details")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted before any checkpoint was written; run the command again",
            file=sys.stderr,
        )
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if args is not None and args.verbose:
            raise
        print(
            f"error: internal failure: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''} "
            "(run with --verbose for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


def run_main(argv: Any = None) -> None:
    sys.exit(main(argv))


if __name__ == "__main__":
    run_main()
