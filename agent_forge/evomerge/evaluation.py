"""Score a live model on tasks: exact-match generation, multiple-choice log-likelihood, perplexity.

A task is data, not code: a JSON descriptor next to one JSONL file per split::

    {"name": "sorting", "type": "exact_match", "metric": "exact_match", "weight": 1.0,
     "max_new_tokens": 8, "splits": {"fitness": "fitness.jsonl", "test": "test.jsonl"}}

Rows are ``{"prompt", "answer"}`` (exact_match), ``{"prompt", "choices", "label"}``
(multiple_choice) or ``{"text"}`` (perplexity). Every score is in [0, 1], higher is better:

- ``exact_match``: the greedy completion, cut at the first newline or EOS, equals the answer
  (both stripped). On ``teacher_forced_splits`` (the fitness split by default) one forward pass
  decides it instead of decoding: greedy decoding emits the answer's tokens and then a stop token
  exactly when the argmax at every answer position is the next answer token and the argmax after
  the answer is EOS or a newline. Both tests agree whenever the model emits the tokenizer's own
  tokenisation of the answer (checked on the shipped models); otherwise the fast one under-counts.
- ``multiple_choice``: accuracy of the choice with the highest summed log-likelihood given the
  prompt (``accuracy``) or the highest log-likelihood per character (``accuracy_norm``).
- ``perplexity``: ``inverse_perplexity`` = exp(-mean token NLL) = 1 / perplexity, the geometric
  mean probability of each token; ``raw`` keeps the perplexity itself.

The aggregate is the weighted mean of the task scores (the plain mean if every weight is 0).
Evaluation is batched (left-padded greedy decoding with the KV cache; one forward pass per batch
of log-likelihoods) and deterministic for a fixed thread count.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agent_forge.evomerge.exceptions import EvaluationError

logger = logging.getLogger(__name__)

TASK_METRICS = {
    "exact_match": ("exact_match",),
    "multiple_choice": ("accuracy", "accuracy_norm"),
    "perplexity": ("inverse_perplexity",),
}
ROW_FIELDS: dict[str, dict[str, type]] = {
    "exact_match": {"prompt": str, "answer": str},
    "multiple_choice": {"prompt": str, "choices": list, "label": int},
    "perplexity": {"text": str},
}
DESCRIPTOR_KEYS = {"name", "type", "metric", "weight", "max_new_tokens", "splits", "description"}
DEFAULT_MAX_NEW_TOKENS = 32
Picker = Callable[[torch.Tensor], torch.Tensor]  # (B, V) logits -> (B,) next token ids


# --------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One task: what to measure (``type``, ``metric``), its weight, and its split files."""

    name: str
    type: str
    metric: str
    weight: float
    max_new_tokens: int
    splits: dict[str, Path]
    description: str = ""

    def examples(self, split: str) -> list[dict]:
        """The validated rows of one split. Raises EvaluationError naming the file and line."""
        if split not in self.splits:
            have = ", ".join(self.splits)
            raise EvaluationError(f"task {self.name!r} has no split {split!r} (it has: {have})")
        path = self.splits[split]
        with path.open(encoding="utf-8") as f:
            rows = [self._row(f"{path}:{n}", line) for n, line in enumerate(f, 1) if line.strip()]
        if not rows:
            raise EvaluationError(f"{path}: split {split!r} of task {self.name!r} is empty")
        return rows

    def _row(self, where: str, line: str) -> dict:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvaluationError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise EvaluationError(f"{where}: each line must be a JSON object")
        for key, kind in ROW_FIELDS[self.type].items():
            value = row.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise EvaluationError(f"{where}: a {self.type} row needs {key!r} ({kind.__name__})")
        if self.type == "multiple_choice":
            choices = row["choices"]
            if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise EvaluationError(f"{where}: 'choices' must be two or more non-empty strings")
            if not 0 <= row["label"] < len(choices):
                raise EvaluationError(f"{where}: 'label' {row['label']} is not a choice index")
        return row


def _check(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise EvaluationError(f"task file {path}: {message}")


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def load_task(path: str | Path) -> Task:
    """Read and validate a task descriptor (JSON); its split paths are relative to it.

    Raises:
        EvaluationError: the file is missing or not JSON, a field is missing, unknown or
            invalid, or a split file does not exist; the message names the file and the field.
    """
    path = Path(path)
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvaluationError(f"task file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvaluationError(f"task file {path} is not readable JSON: {e}") from None
    _check(isinstance(desc, dict), path, "must hold a JSON object")
    unknown = sorted(set(desc) - DESCRIPTOR_KEYS)
    _check(not unknown, path, f"unknown field(s) {unknown}; allowed: {sorted(DESCRIPTOR_KEYS)}")
    name, kind = desc.get("name"), desc.get("type")
    _check(isinstance(name, str) and name != "", path, "'name' must be a non-empty string")
    _check(kind in TASK_METRICS, path, f"'type' {kind!r} must be one of {list(TASK_METRICS)}")
    metric = desc.get("metric", TASK_METRICS[kind][0])
    _check(
        metric in TASK_METRICS[kind],
        path,
        f"'metric' {metric!r} must be one of {list(TASK_METRICS[kind])} for type {kind!r}",
    )
    weight = desc.get("weight", 1.0)
    ok = _is_number(weight) and math.isfinite(weight) and weight >= 0
    _check(ok, path, f"'weight' {weight!r} must be a finite number >= 0")
    max_new = desc.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    ok = isinstance(max_new, int) and not isinstance(max_new, bool) and max_new >= 1
    _check(ok, path, f"'max_new_tokens' {max_new!r} must be an integer >= 1")
    splits = desc.get("splits")
    ok = (
        isinstance(splits, dict)
        and bool(splits)
        and all(isinstance(v, str) for v in splits.values())
    )
    _check(ok, path, "'splits' must map split names (e.g. 'fitness', 'test') to JSONL paths")
    files = {split: (path.parent / rel).resolve() for split, rel in splits.items()}
    for split, file in files.items():
        _check(file.is_file(), path, f"split {split!r}: file {file} does not exist")
    description = str(desc.get("description", ""))
    return Task(name, kind, metric, float(weight), max_new, files, description)


def load_tasks(paths: Sequence[str | Path]) -> list[Task]:
    """Load several task descriptors; their names must be distinct."""
    tasks = [load_task(p) for p in paths]
    _check_distinct([t.name for t in tasks])
    return tasks


def _check_distinct(names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EvaluationError(f"task names must be distinct; repeated: {', '.join(repeated)}")


# --------------------------------------------------------------------------- threads
def configure_torch_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count and return it.

    ``n=None``: ``EVOMERGE_THREADS`` if set; else 1 thread on machines with up to 4 usable cores
    (there one single-thread worker per core beats one multi-thread worker, and
    oversubscription costs 4x or more), else half the cores, at most 8.
    """
    if n is None and os.environ.get("EVOMERGE_THREADS"):
        n = int(os.environ["EVOMERGE_THREADS"])
    if n is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        cores = cores or os.cpu_count() or 1
        n = 1 if cores <= 4 else min(8, cores // 2)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------- model plumbing
_CACHE_KWARG: dict[type, str] = {}


def _forward(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any = None, use_cache: bool = False
) -> tuple[torch.Tensor, Any]:
    """One forward pass; returns (float32 logits (B, T, V), KV cache or None).

    Positions count real tokens only, so left padding does not shift them. transformers 5.x
    renamed ``past_key_values`` to ``cache``; the keyword the model takes is used.
    """
    if type(model) not in _CACHE_KWARG:
        params = inspect.signature(model.forward).parameters
        _CACHE_KWARG[type(model)] = "cache" if "cache" in params else "past_key_values"
    key = _CACHE_KWARG[type(model)]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]  # (B, T)
    extra = {key: cache} if cache is not None else {}
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache, **extra
    )
    return out.logits.float(), (getattr(out, key, None) if use_cache else None)


def _pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: Any, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to ``(ids, mask)``, both (B, T), on the left or the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokenizer's EOS and the model's generation-config EOS id(s)."""
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(gen if isinstance(gen, list) else [gen])}
    return {int(i) for i in ids if i is not None}


def _token_texts(tokenizer: Any) -> list[str]:
    """The text of every token id on its own (to find the ones that hold a newline)."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def _batches(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length, longest first (stable, so deterministic)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def _decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new: int,
    stop: set[int],
    pad_id: int,
    pick: Picker | None = None,
) -> list[list[int]]:
    """Batched decoding with the KV cache (greedy unless ``pick`` is given).

    Returns each row's new tokens, up to and including its first stop token.
    """
    ids, mask = _pad(prompts, pad_id, _device(model), left=True)
    stop_t = torch.tensor(sorted(stop), dtype=torch.long, device=ids.device)
    logits, cache = _forward(model, ids, mask, use_cache=True)
    new: list[torch.Tensor] = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=ids.device)
    for step in range(max_new):
        nxt = logits[:, -1].argmax(-1) if pick is None else pick(logits[:, -1])  # (B,)
        new.append(nxt)
        done |= torch.isin(nxt, stop_t)
        if bool(done.all()) or step == max_new - 1:
            break
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        logits, cache = _forward(model, nxt[:, None], mask, cache, use_cache=True)
    rows = torch.stack(new, dim=1).tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in rows]


@torch.inference_mode()
def _scored_logits(
    model: Any, seqs: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded forward pass: (logits (B, T, V), ids (B, T))."""
    ids, mask = _pad(seqs, pad_id, _device(model), left=False)
    return _forward(model, ids, mask)[0], ids


def _sequence_logprobs(
    model: Any, seqs: list[list[int]], starts: list[int], pad_id: int, batch_size: int
) -> list[float]:
    """For each sequence i, the sum of log p(seq[j] | seq[:j]) over j >= starts[i]."""
    out = [0.0] * len(seqs)
    for idx in _batches(seqs, batch_size):
        logits, ids = _scored_logits(model, [seqs[i] for i in idx], pad_id)
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        for row, i in enumerate(idx):
            out[i] = float(logp[row, starts[i] - 1 : len(seqs[i]) - 1].double().sum())
    return out


def _teacher_forced_hits(
    model: Any,
    prompts: list[list[int]],
    answers: list[list[int]],
    max_new: int,
    stop_start: set[int],
    pad_id: int,
    batch_size: int,
) -> list[bool]:
    """Greedy exact match decided by one forward pass (see the module docstring).

    ``stop_start``: EOS ids and the ids whose text starts with a newline.
    """
    seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
    hits = [False] * len(seqs)
    for idx in _batches(seqs, batch_size):
        logits, _ = _scored_logits(model, [seqs[i] for i in idx], pad_id)
        greedy = logits.argmax(-1).tolist()  # (B, T): the greedy next token after each position
        for row, i in enumerate(idx):
            p, a = len(prompts[i]), len(answers[i])
            if a <= max_new and greedy[row][p - 1 : p + a - 1] == answers[i]:
                hits[i] = a == max_new or greedy[row][p + a - 1] in stop_start
    return hits


# --------------------------------------------------------------------------- the evaluator
@dataclass
class TaskScores:
    """Scores of one model on one split.

    Attributes:
        per_task: task name -> score in [0, 1], higher is better (see the module docstring).
        aggregate: the weighted mean of ``per_task`` (the plain mean when every weight is 0).
        raw: task name -> details: ``n`` (examples), ``correct``; for perplexity ``tokens``,
            ``nll`` (mean per token) and ``perplexity``.
        split: the split that was scored.
    """

    per_task: dict[str, float]
    aggregate: float
    raw: dict[str, dict[str, float]] = field(default_factory=dict)
    split: str = ""


class TaskEvaluator:
    """Scores live models on a fixed list of tasks; caches the rows and their token ids.

    Args:
        tasks: the tasks (distinct names).
        batch_size: sequences per forward pass.
        fitness_sample_size: if set, the ``fitness`` split of each task is cut to this many
            rows, drawn once from ``seed``: every candidate sees the same subset.
        seed: seeds that subset.
        teacher_forced_splits: the splits on which exact match is decided by one forward pass
            instead of decoding (see the module docstring); the test split is decoded.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        *,
        batch_size: int = 128,
        fitness_sample_size: int | None = None,
        seed: int = 0,
        teacher_forced_splits: Sequence[str] = ("fitness",),
    ) -> None:
        if not tasks:
            raise EvaluationError("no tasks to evaluate; give at least one task file")
        _check_distinct([t.name for t in tasks])
        if batch_size < 1 or (fitness_sample_size is not None and fitness_sample_size < 1):
            raise EvaluationError("batch_size and fitness_sample_size must be >= 1")
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.fitness_sample_size = fitness_sample_size
        self.seed = seed
        self.teacher_forced_splits = tuple(teacher_forced_splits)
        self._rows: dict[tuple[str, str], list[dict]] = {}
        # keyed by id(tokenizer); the tokenizer is kept in the value so that the id stays unique
        self._ids: dict[tuple[int, str, str, int | None], tuple[Any, Any]] = {}
        self._texts: dict[int, tuple[Any, list[str]]] = {}

    def examples(self, task: Task, split: str, limit: int | None = None) -> list[dict]:
        """The rows scored for ``task`` on ``split``: the fixed fitness subset, then ``limit``."""
        if (task.name, split) not in self._rows:
            rows, k = task.examples(split), self.fitness_sample_size
            if split == "fitness" and k is not None and k < len(rows):
                keep = random.Random(f"{self.seed}-{task.name}").sample(range(len(rows)), k)
                rows = [rows[i] for i in sorted(keep)]
            self._rows[(task.name, split)] = rows
        rows = self._rows[(task.name, split)]
        return rows if limit is None else rows[:limit]

    def evaluate(
        self, model: Any, tokenizer: Any, split: str, limit: int | None = None
    ) -> TaskScores:
        """Score ``model`` (in memory, on any device) on ``split`` of every task.

        Args:
            limit: score only the first ``limit`` rows of each task (after the fitness subset).
        Raises:
            EvaluationError: unknown split, bad rows, or a prompt that encodes to no tokens.
        """
        if limit is not None and limit < 1:
            raise EvaluationError(f"limit must be >= 1, got {limit}")
        was_training = model.training
        model.eval()
        try:
            results = {t.name: self._score(model, tokenizer, t, split, limit) for t in self.tasks}
        finally:
            model.train(was_training)
        per_task = {name: score for name, (score, _) in results.items()}
        raw = {name: details for name, (_, details) in results.items()}
        return TaskScores(per_task, self._aggregate(per_task), raw, split)

    def _aggregate(self, per_task: dict[str, float]) -> float:
        total = sum(t.weight for t in self.tasks)
        if total == 0:
            return sum(per_task.values()) / len(per_task)
        return sum(t.weight * per_task[t.name] for t in self.tasks) / total

    def _score(
        self, model: Any, tokenizer: Any, task: Task, split: str, limit: int | None
    ) -> tuple[float, dict[str, float]]:
        key = (id(tokenizer), task.name, split, limit)
        if key not in self._ids:
            rows = self.examples(task, split, limit)
            self._ids[key] = (tokenizer, _encode_rows(tokenizer, task, rows))
        first, second = self._ids[key][1]
        if task.type == "exact_match":
            return self._exact_match(model, tokenizer, task, split, first, second)
        if task.type == "multiple_choice":
            return self._multiple_choice(model, tokenizer, task, first, second)
        return self._perplexity(model, tokenizer, first)

    def _token_texts(self, tokenizer: Any) -> list[str]:
        if id(tokenizer) not in self._texts:
            self._texts[id(tokenizer)] = (tokenizer, _token_texts(tokenizer))
        return self._texts[id(tokenizer)][1]

    def _exact_match(
        self,
        model: Any,
        tokenizer: Any,
        task: Task,
        split: str,
        prompts: list[list[int]],
        answers: list[tuple[str, list[int]]],
    ) -> tuple[float, dict[str, float]]:
        eos, texts, pad = (
            _eos_ids(model, tokenizer),
            self._token_texts(tokenizer),
            _pad_id(tokenizer),
        )
        if split in self.teacher_forced_splits:
            stop_start = eos | {i for i, t in enumerate(texts) if t.startswith("\n")}
            hits = _teacher_forced_hits(
                model,
                prompts,
                [ids for _, ids in answers],
                task.max_new_tokens,
                stop_start,
                pad,
                self.batch_size,
            )
        else:
            stop = eos | {i for i, t in enumerate(texts) if "\n" in t}
            hits = [False] * len(prompts)
            for idx in _batches(prompts, self.batch_size):
                rows = _decode(model, [prompts[i] for i in idx], task.max_new_tokens, stop, pad)
                for i, row in zip(idx, rows, strict=True):
                    hits[i] = _completion(tokenizer, row, eos).strip() == answers[i][0]
        return sum(hits) / len(hits), {"n": len(hits), "correct": sum(hits)}

    def _multiple_choice(
        self,
        model: Any,
        tokenizer: Any,
        task: Task,
        prompts: list[list[int]],
        rows: list[tuple[list[str], list[list[int]], int]],
    ) -> tuple[float, dict[str, float]]:
        seqs = [p + c for p, (_, choices, _) in zip(prompts, rows, strict=True) for c in choices]
        starts = [len(p) for p, (_, choices, _) in zip(prompts, rows, strict=True) for _ in choices]
        logps = iter(_sequence_logprobs(model, seqs, starts, _pad_id(tokenizer), self.batch_size))
        correct = 0
        for texts, _, label in rows:
            scores = [next(logps) for _ in texts]
            if task.metric == "accuracy_norm":
                scores = [s / len(t) for s, t in zip(scores, texts, strict=True)]
            correct += max(range(len(scores)), key=scores.__getitem__) == label
        return correct / len(rows), {"n": len(rows), "correct": correct}

    def _perplexity(
        self, model: Any, tokenizer: Any, seqs: list[list[int]]
    ) -> tuple[float, dict[str, float]]:
        longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if longest and any(len(s) > longest for s in seqs):
            logger.warning("perplexity texts longer than %d tokens are truncated", longest)
            seqs = [s[:longest] for s in seqs]
        seqs = [s for s in seqs if len(s) > 1]  # the first token has no context to score it
        logps = _sequence_logprobs(
            model, seqs, [1] * len(seqs), _pad_id(tokenizer), self.batch_size
        )
        tokens = sum(len(s) - 1 for s in seqs)
        if tokens == 0:
            raise EvaluationError("perplexity texts encode to fewer than two tokens each")
        nll = -sum(logps) / tokens
        details = {"n": len(seqs), "tokens": tokens, "nll": nll, "perplexity": math.exp(nll)}
        return math.exp(-nll), details


def _encode_rows(tokenizer: Any, task: Task, rows: list[dict]) -> tuple[Any, Any]:
    """Token ids of a split's rows.

    Prompts and texts get the tokenizer's special tokens (e.g. BOS); answers and choices are
    encoded on their own without them and appended. Returns (texts, None) for perplexity,
    (prompts, [(answer, answer ids)]) for exact match and (prompts, [(choices, choice ids,
    label)]) for multiple choice.
    """
    if task.type == "perplexity":
        return [list(t) for t in tokenizer([r["text"] for r in rows])["input_ids"]], None
    prompts = [list(p) for p in tokenizer([r["prompt"] for r in rows])["input_ids"]]
    if not all(prompts):
        raise EvaluationError(f"task {task.name!r}: a prompt encodes to no tokens")
    if task.type == "exact_match":
        ids = tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
        return prompts, [(r["answer"].strip(), list(a)) for r, a in zip(rows, ids, strict=True)]
    choices = []
    for r in rows:
        ids = tokenizer(r["choices"], add_special_tokens=False)["input_ids"]
        choices.append((r["choices"], [list(c) for c in ids], r["label"]))
    return prompts, choices


def _completion(tokenizer: Any, tokens: list[int], eos: set[int]) -> str:
    """The text of decoded tokens without EOS, cut at the first newline."""
    text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
    return text.split("\n", 1)[0]


# --------------------------------------------------------------------------- generation
def generate_text(
    model: Any, tokenizer: Any, prompt: str, max_length: int = 100, **kwargs: Any
) -> str:
    """Continue ``prompt`` and return only the new text (greedy unless ``temperature`` > 0).

    Args:
        max_length: the most new tokens to generate (the prompt does not count).
        **kwargs: ``temperature`` (0: greedy), ``top_k`` (0: no cut), ``seed`` (for sampling),
            ``stop_at_newline`` (default False: stop at EOS or ``max_length`` only).
    """
    options: dict[str, Any] = {"temperature": 0.0, "top_k": 0, "seed": 0, "stop_at_newline": False}
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise TypeError(
            f"generate_text() got unknown option(s) {unknown}; known: {sorted(options)}"
        )
    options |= kwargs
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise EvaluationError("the prompt encodes to no tokens; give a non-empty prompt")
    eos = _eos_ids(model, tokenizer)
    stop = set(eos)
    if options["stop_at_newline"]:
        stop |= {i for i, t in enumerate(_token_texts(tokenizer)) if "\n" in t}
    pick = _sampler(
        float(options["temperature"]), int(options["top_k"]), int(options["seed"]), _device(model)
    )
    was_training = model.training
    model.eval()
    try:
        row = _decode(model, [ids], max_length, stop or {-1}, _pad_id(tokenizer), pick)[0]
    finally:
        model.train(was_training)
    if options["stop_at_newline"]:
        return _completion(tokenizer, row, eos)
    return tokenizer.decode([t for t in row if t not in eos], skip_special_tokens=True)


def _sampler(temperature: float, top_k: int, seed: int, device: torch.device) -> Picker | None:
    """None (greedy) or a function sampling from softmax(logits / temperature), seeded."""
    if temperature <= 0:
        return None
    generator = torch.Generator(device=device).manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
        logits = logits / temperature
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    return pick
