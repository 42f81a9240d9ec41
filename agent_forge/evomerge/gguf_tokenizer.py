"""GGUF out, the tokenizer: a Hugging Face fast BPE tokenizer as llama.cpp's metadata.

Byte-level BPE is written as ``gpt2`` (with llama.cpp's pre-tokenizer name), SentencePiece-style
BPE as ``llama`` (with merge-rank scores and the space-prefix flag); then the vocabulary padded to
the embedding size, token types, merges, special tokens, BOS/EOS flags and the chat template.
(GGUF in uses transformers' own GGUF tokenizer conversion instead.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf

from .exceptions import GGUFError

logger = logging.getLogger(__name__)


def _load_fast_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (ValueError, OSError) as err:
        raise GGUFError(
            f"{model_dir}: tokenizer could not be loaded ({err}); save one beside the model"
        ) from err
    if not getattr(tokenizer, "is_fast", False):
        raise GGUFError(f"{model_dir}: only fast (tokenizers-backed) tokenizers can be exported")
    return tokenizer


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (``tokenizer.ggml.pre``)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = pre or {}
    kind = pre.get("type")
    parts = pre.get("pretokenizers", []) if kind == "Sequence" else []
    kinds = [p.get("type") for p in parts]
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = parts[0].get("pattern", {}).get("Regex")
        preferred = ["llama-bpe", "qwen2", "gpt-4o", "tekken", "qwen35"]
        names = [n for n, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex]
        for name in sorted(names, key=lambda n: preferred.index(n) if n in preferred else 99):
            return name
    logger.warning(
        "unrecognised pre-tokenizer %s; writing 'gpt-2' (llama.cpp may split text differently)", pre
    )
    return "gpt-2"


def _is_sentencepiece(spec: dict[str, Any]) -> bool:
    """SentencePiece-style BPE: byte fallback, or words marked with ``▁`` instead of bytes."""
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")], ensure_ascii=False)
    return bool(spec["model"].get("byte_fallback")) or "Metaspace" in text or "\u2581" in text


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts ``▁`` before the text (Metaspace's scheme or a Prepend)."""
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")], ensure_ascii=False)
    return (
        '"prepend_scheme": "first"' in text
        or '"prepend_scheme": "always"' in text
        or ('"Prepend"' in text)
    )


def _merge_pairs(spec: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]
    ]
    if any(len(p) != 2 or " " in p[0] or " " in p[1] for p in pairs):
        raise GGUFError("tokenizer merges contain spaces inside tokens; GGUF cannot store them")
    return pairs  # type: ignore[return-value]


def _vocabulary(tokenizer: Any, spec: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings by id (padded to the embedding size) and their llama.cpp token types."""
    T = gguf.TokenType
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [int(T.UNUSED)] * n_vocab
    for token, index in tokenizer.get_vocab().items():
        if index >= n_vocab:
            raise GGUFError(
                f"token {token!r} has id {index} but the model embeds only {n_vocab} ids"
            )
        tokens[index], types[index] = token, int(T.NORMAL)
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = int(T.CONTROL if added.special else T.USER_DEFINED)
    if _is_sentencepiece(spec):
        for index, token in enumerate(tokens):
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[index] = int(T.BYTE)
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = int(T.UNKNOWN)
    return tokens, types


def _merge_scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """SentencePiece scores for llama.cpp: earlier merges score higher (``-rank``)."""
    rank: dict[str, int] = {}
    for index, (left, right) in enumerate(merges):
        rank.setdefault(left + right, index)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _special_flags(tokenizer: Any) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, measured rather than read from config files."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(with_special) > len(plain)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "bos": bool(extra and bos is not None and with_special[0] == bos),
        "eos": bool(extra and eos is not None and with_special[-1] == eos),
    }


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, config: Any) -> None:
    """Write the folder's fast BPE tokenizer into ``writer``'s metadata (``tokenizer.ggml.*``).

    Raises:
        GGUFError: no loadable fast tokenizer, not BPE, or merges GGUF cannot store.
    """
    tokenizer = _load_fast_tokenizer(model_dir)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise GGUFError(
            f"tokenizer model {spec['model']['type']!r} cannot be exported; GGUF export handles "
            "BPE tokenizers (byte-level 'gpt2' or SentencePiece-style 'llama')"
        )
    tokens, types = _vocabulary(tokenizer, spec, config.vocab_size)
    merges = _merge_pairs(spec)
    if _is_sentencepiece(spec):
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(_merge_scores(tokens, merges))
        writer.add_add_space_prefix(_adds_space_prefix(spec))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{left} {right}" for left, right in merges])
    _add_special_tokens(writer, tokenizer, config)


def _add_special_tokens(writer: gguf.GGUFWriter, tokenizer: Any, config: Any) -> None:
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is None:
            token_id = getattr(config, f"{kind}_token_id", None)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    flags = _special_flags(tokenizer)
    writer.add_add_bos_token(flags["bos"])
    writer.add_add_eos_token(flags["eos"])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
