"""GGUF in and out: read llama.cpp model files as Hugging Face folders, and ship merges as GGUF.

GGUF in (``gguf_to_hf``): a bounded parse of the header checks the file (a truncated or hostile
file fails fast with a clear error, whatever its header claims) and yields its metadata and
tensor table. Tensors are dequantised with ``gguf.quants`` (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q2_K..Q6_K and the IQ types), renamed to Hugging Face names with
``gguf.get_tensor_name_map``, and llama's Q/K row permutation is undone; the config comes from
transformers' GGUF key table, the tokenizer from transformers' GGUF tokenizer conversion. The
result is an ordinary HF folder in a cache keyed by the file's content hash
(``$EVOMERGE_CACHE/gguf``, else ``~/.cache/evomerge/gguf``), written atomically and reused next
time. Llama-family files (llama, mistral, smollm) and qwen2 are supported; other architectures
raise ``GGUFError`` naming the architecture. (``gguf.GGUFReader`` is not used on this path: it
keeps ~1.4 KB of Python objects per metadata array element, 0.5 GB for a Llama 3 vocabulary.)

GGUF out (``export_gguf``): architecture metadata from the HF config, the tokenizer (byte-level BPE
as ``gpt2``, SentencePiece-style BPE as ``llama``, merges, special tokens, chat template), tensors
under GGUF names and layout (Q/K permuted), as f32, f16, bf16 or q8_0 -- written by
``gguf.GGUFWriter`` one tensor at a time into a temp file that is renamed when complete.

This module is the public face and the command line; the work lives in ``gguf_header`` (the
bounded header parse), ``gguf_import`` (GGUF in), ``gguf_export`` and ``gguf_tokenizer`` (GGUF
out) and ``gguf_layout`` (architectures, tensor names and Q/K order, shared by both directions).

Run it::

    python -m agent_forge.evomerge.gguf_utils export MODEL_DIR OUT.gguf [--outtype q8_0]
    python -m agent_forge.evomerge.gguf_utils info FILE.gguf [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .exceptions import GGUFError
from .gguf_export import OUTTYPES, export_gguf
from .gguf_header import DEQUANTISABLE_TYPES, GGUFArray, GGUFHeader, is_gguf_path, read_header
from .gguf_import import default_cache_dir, file_sha256, gguf_to_hf
from .gguf_layout import SUPPORTED_ARCHITECTURES, permute_qk

__all__ = [
    "DEQUANTISABLE_TYPES",
    "OUTTYPES",
    "SUPPORTED_ARCHITECTURES",
    "GGUFArray",
    "GGUFHeader",
    "default_cache_dir",
    "export_gguf",
    "file_sha256",
    "gguf_info",
    "gguf_to_hf",
    "is_gguf_path",
    "main",
    "permute_qk",
    "read_header",
]

logger = logging.getLogger(__name__)


def gguf_info(path: str | Path) -> dict[str, Any]:
    """A quick look at a GGUF file (from the bounded header parse alone; no tensor is read).

    Returns:
        architecture, whether EvoMerge can import it, parameter count, tensor types (counts),
        layer/width/head figures, tied embeddings, tokenizer kind and size, and more.

    Raises:
        GGUFError: the file is missing or malformed.
    """
    header = read_header(path)
    meta, arch = header.metadata, header.architecture or "?"
    names = {t.name for t in header.tensors}
    return {
        "path": str(header.path),
        "file_size": header.path.stat().st_size,
        "gguf_version": header.version,
        "architecture": arch,
        "supported": arch in SUPPORTED_ARCHITECTURES,
        "name": meta.get("general.name"),
        "file_type": meta.get("general.file_type"),
        "parameter_count": sum(math.prod(t.shape) for t in header.tensors),
        "tensor_count": len(header.tensors),
        "tensor_types": dict(Counter(t.qtype.name for t in header.tensors).most_common()),
        "block_count": meta.get(f"{arch}.block_count"),
        "embedding_length": meta.get(f"{arch}.embedding_length"),
        "head_count": meta.get(f"{arch}.attention.head_count"),
        "head_count_kv": meta.get(f"{arch}.attention.head_count_kv"),
        "context_length": meta.get(f"{arch}.context_length"),
        "tied_embeddings": "output.weight" not in names,
        "tokenizer": {
            "model": meta.get("tokenizer.ggml.model"),
            "pre": meta.get("tokenizer.ggml.pre"),
            "size": header.length_of("tokenizer.ggml.tokens"),
            "merges": header.length_of("tokenizer.ggml.merges"),
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "chat_template": "tokenizer.chat_template" in meta,
        },
    }


def _format_info(info: dict[str, Any]) -> str:
    tok = info["tokenizer"]
    types = ", ".join(f"{name} x{count}" for name, count in info["tensor_types"].items())
    lines = [
        f"file:          {info['path']} "
        f"({info['file_size'] / 1e6:.1f} MB, GGUF v{info['gguf_version']})",
        f"architecture:  {info['architecture']}"
        + ("" if info["supported"] else " (not supported)"),
        f"name:          {info['name']}",
        f"parameters:    {info['parameter_count']:,} in {info['tensor_count']} tensors",
        f"tensor types:  {types}",
        f"layers:        {info['block_count']}, hidden {info['embedding_length']}, "
        f"heads {info['head_count']}/{info['head_count_kv']} (q/kv), "
        f"context {info['context_length']}",
        f"embeddings:    {'tied' if info['tied_embeddings'] else 'untied'}",
        f"tokenizer:     {tok['model']} (pre {tok['pre']}), {tok['size']} tokens, "
        f"{tok['merges']} merges, "
        f"bos {tok['bos_token_id']}, eos {tok['eos_token_id']}, "
        f"chat template {'yes' if tok['chat_template'] else 'no'}",
    ]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m agent_forge.evomerge.gguf_utils", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    export = commands.add_parser("export", help="write a Hugging Face model folder as GGUF")
    export.add_argument("model_dir")
    export.add_argument("out_path")
    export.add_argument("--outtype", choices=sorted(OUTTYPES), default="f16")
    info = commands.add_parser("info", help="show what a GGUF file holds")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``export MODEL_DIR OUT.gguf [--outtype ...]`` or ``info FILE [--json]``."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        if args.command == "export":
            out = export_gguf(args.model_dir, args.out_path, args.outtype)
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.outtype})")
        else:
            info = gguf_info(args.path)
            print(json.dumps(info, indent=2) if args.json else _format_info(info))
    except GGUFError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
