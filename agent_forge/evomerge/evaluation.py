"""Score a live model on tasks: exact-match generation, multiple-choice log-likelihood, perplexity.

A task is data, not code: a JSON descriptor (``name``, ``type``, ``metric``, ``weight``,
``max_new_tokens``, ``splits``) next to JSONL files, one per split::

    {"name": "addition", "type": "exact_match", "metric": "exact_match", "weight": 1.0,
     "max_new_tokens": 8, "splits": {"fitness": "fitness.jsonl", "test": "test.jsonl"}}

Rows are ``{"prompt", "answer"}`` (exact_match), ``{"prompt", "choices", "label"}``
(multiple_choice) or ``{"text"}`` (perplexity). Every score is "higher is better" in [0, 1]:

- ``exact_match``: the greedy completion, cut at the first newline or EOS and stripped, equals the
  stripped answer. On the splits named in ``teacher_forced_splits`` (the fitness split by default)
  it is decided by one teacher-forced pass instead of decoding: under greedy decoding the
  completion is the answer's tokens followed by a stop token exactly when the argmax at every
  answer position is the next answer token and the argmax after the answer is a stop token. That
  is the same test whenever the model emits the tokenizer's own tokenisation of the answer (the
  tests check it on the shipped models); otherwise it can only under-count.
- ``multiple_choice``: accuracy of the choice with the highest summed log-likelihood given the
  prompt (``accuracy``), or the highest log-likelihood per character of the choice
  (``accuracy_norm``).
- ``perplexity``: ``inverse_perplexity`` = exp(-mean token NLL) = 1 / perplexity, the geometric
  mean probability the model gives each token; ``raw`` keeps the perplexity itself.

The aggregate is the weighted mean of the per-task scores (the plain mean if all weights are 0).
Evaluation is batched (left-padded greedy decoding with the KV cache, one forward pass per batch
of log-likelihoods) and deterministic for a fixed thread count.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
from collections.abc import Sequence
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
ROW_FIELDS = {
    "exact_match": {"prompt": str, "answer": str},
    "multiple_choice": {"prompt": str, "choices": list, "label": int},
    "perplexity": {"text": str},
}
_DESCRIPTOR_KEYS = {"name", "type", "metric", "weight", "max_new_tokens", "splits", "description"}
DEFAULT_MAX_NEW_TOKENS = 32


# --------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One task: what to measure (``type``/``metric``), its weight, and where its splits are."""

    name: str
    type: str
    metric: str
    weight: float
    max_new_tokens: int
    splits: dict[str, Path]
    description: str = ""

    def examples(self, split: str) -> list[dict]:
        """The rows of one split, validated. Raises EvaluationError for a bad or missing file."""
        if split not in self.splits:
            raise EvaluationError(
                f"task {self.name!r} has no split {split!r}; it has: {', '.join(self.splits)}"
            )
        path = self.splits[split]
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    rows.append(self._row(path, number, line))
        if not rows:
            raise EvaluationError(f"{path}: split {split!r} of task {self.name!r} is empty")
        return rows

    def _row(self, path: Path, number: int, line: str) -> dict:
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvaluationError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise EvaluationError(f"{where}: each line must be a JSON object")
        for key, kind in ROW_FIELDS[self.type].items():
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                raise EvaluationError(
                    f"{where}: a {self.type} row needs {key!r} of type {kind.__name__}"
                )
        if self.type == "multiple_choice":
            choices = row["choices"]
            if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise EvaluationError(f"{where}: 'choices' must be two or more non-empty strings")
            if not 0 <= row["label"] < len(choices):
                raise EvaluationError(f"{where}: 'label' {row['label']} is not a choice index")
        return row


def _require(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise EvaluationError(f"task file {path}: {message}")


def load_task(path: str | Path) -> Task:
    """Read and validate a task descriptor (JSON); split paths are relative to it.

    Raises:
        EvaluationError: the file is missing or malformed, a field is missing or invalid, or a
            split file does not exist. The message names the file and the field.
    """
    path = Path(path)
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvaluationError(f"task file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationError(f"task file {path} could not be read as JSON: {e}") from None
    _require(isinstance(desc, dict), path, "must hold a JSON object")
    unknown = set(desc) - _DESCRIPTOR_KEYS
    _require(not unknown, path, f"unknown field(s) {sorted(unknown)}; allowed: "
             f"{sorted(_DESCRIPTOR_KEYS)}")
    name, kind = desc.get("name"), desc.get("type")
    _require(isinstance(name, str) and bool(name), path, "'name' must be a non-empty string")
    _require(kind in TASK_METRICS, path, f"'type' {kind!r} must be one of {list(TASK_METRICS)}")
    metric = desc.get("metric", TASK_METRICS[kind][0])
    _require(metric in TASK_METRICS[kind], path,
             f"'metric' {metric!r} is not valid for {kind}; use one of {TASK_METRICS[kind]}")
    weight = desc.get("weight", 1.0)
    _require(isinstance(weight, int | float) and not isinstance(weight, bool)
             and math.isfinite(weight) and weight >= 0, path,
             f"'weight' {weight!r} must be a finite number >= 0")
    max_new = desc.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    _require(isinstance(max_new, int) and not isinstance(max_new, bool) and max_new >= 1, path,
             f"'max_new_tokens' {max_new!r} must be an integer >= 1")
    splits = desc.get("splits")
    _require(isinstance(splits, dict) and bool(splits)
             and all(isinstance(v, str) for v in splits.values()), path,
             "'splits' must map split names (e.g. 'fitness', 'test') to JSONL file paths")
    resolved = {split: (path.parent / rel).resolve() for split, rel in splits.items()}
    for split, file in resolved.items():
        _require(file.is_file(), path, f"split {split!r}: file {file} does not exist")
    return Task(name=name, type=kind, metric=metric, weight=float(weight),
                max_new_tokens=max_new, splits=resolved,
                description=str(desc.get("description", "")))


def load_tasks(paths: Sequence[str | Path]) -> list[Task]:
    """Load several task descriptors; their names must be distinct."""
    tasks = [load_task(p) for p in paths]
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvaluationError(f"task names must be distinct; repeated: {', '.join(duplicates)}")
    return tasks


# --------------------------------------------------------------------------- threads
def configure_torch_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads and return the number set.

    ``n=None`` reads ``EVOMERGE_THREADS`` if set; otherwise it picks 1 thread on machines with up
    to 4 usable cores (there, one single-thread worker per core beats one multi-thread worker,
    and oversubscription costs 4x or more), else half the cores, at most 8.
    """
    if n is None:
        env = os.environ.get("EVOMERGE_THREADS")
        if env:
            n = int(env)
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
            n = 1 if cores <= 4 else min(8, cores // 2)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------- model plumbing
_CACHE_KWARG: dict[type, str] = {}


def _cache_kwarg(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.x; use what the model takes."""
    cls = type(model)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(model.forward).parameters
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[cls]


def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             cache: Any = None, use_cache: bool = False) -> tuple[torch.Tensor, Any]:
    """One forward pass; returns (logits (B, T, V) as float32, the KV cache or None)."""
    key = _cache_kwarg(model)
    extra = {key: cache} if cache is not None else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache,
                **extra)
    return out.logits.float(), (getattr(out, key, None) if use_cache else None)


def _pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids, mask)``, both (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokenizer's EOS and the model's generation-config EOS id(s)."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = {tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])}
    eos.discard(None)
    return {int(i) for i in eos}


def _token_texts(tokenizer: Any) -> list[str]:
    """The text of every token id on its own (to find the ones that hold a newline)."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


@torch.inference_mode()
def _decode(model: Any, prompts: Sequence[Sequence[int]], max_new: int, stop: set[int],
            pad_id: int, pick: Any = None) -> list[list[int]]:
    """Left-padded batched decoding with the KV cache (greedy unless ``pick`` is given).

    Returns each row's new tokens up to and including its first stop token.
    """
    device = next(model.parameters()).device
    ids, mask = _pad_left(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count from 0
    stop_t = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    logits, cache = _forward(model, ids, mask, positions, use_cache=True)
    new: list[torch.Tensor] = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new):
        last = logits[:, -1]  # (B, V)
        nxt = last.argmax(-1) if pick is None else pick(last)  # (B,)
        new.append(nxt)
        done |= torch.isin(nxt, stop_t)
        if bool(done.all()) or step == max_new - 1:
            break
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        positions = positions[:, -1:] + 1
        logits, cache = _forward(model, nxt[:, None], mask, positions, cache, use_cache=True)
    rows = []
    for row in torch.stack(new, dim=1).tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:cut])
    return rows


def _completion_text(tokenizer: Any, tokens: list[int], eos: set[int]) -> str:
    """The text of a decoded row, without EOS and cut at the first newline."""
    kept = [t for t in tokens if t not in eos]
    return tokenizer.decode(kept, skip_special_tokens=True).split("\n", 1)[0]


def _length_order(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (longest first; stable, so deterministic)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def _batch_logits(model: Any, seqs: Sequence[Sequence[int]], pad_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded forward pass of a batch: (logits (B, T, V), ids (B, T))."""
    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = torch.arange(width, device=device).expand(len(seqs), width)
    logits, _ = _forward(model, ids, mask, positions)
    return logits, ids


def _sequence_logprobs(model: Any, seqs: Sequence[Sequence[int]], starts: Sequence[int],
                       pad_id: int, batch_size: int) -> list[float]:
    """Sum of log p(seq[j] | seq[:j]) over j >= starts[i], for each sequence i."""
    out = [0.0] * len(seqs)
    for idx in _length_order(seqs, batch_size):
        logits, ids = _batch_logits(model, [seqs[i] for i in idx], pad_id)
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        for row, i in enumerate(idx):
            out[i] = float(logp[row, starts[i] - 1 : len(seqs[i]) - 1].double().sum())
    return out


def _teacher_forced_matches(model: Any, prompts: list[list[int]], answers: list[list[int]],
                            max_new: int, stop_start: torch.Tensor, pad_id: int,
                            batch_size: int) -> list[bool]:
    """Greedy exact match decided by one teacher-forced pass (see the module docstring).

    ``stop_start`` is a (V,) bool tensor: EOS, or a token whose text starts with a newline.
    """
    seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
    out = [False] * len(seqs)
    for idx in _length_order(seqs, batch_size):
        logits, _ = _batch_logits(model, [seqs[i] for i in idx], pad_id)
        preds = logits.argmax(-1).cpu()  # (B, T): the greedy next token after each position
        for row, i in enumerate(idx):
            p, a = len(prompts[i]), len(answers[i])
            if a > max_new or not torch.equal(preds[row, p - 1 : p + a - 1],
                                              torch.tensor(answers[i], dtype=torch.long)):
                continue
            out[i] = a == max_new or bool(stop_start[preds[row, p + a - 1]])
    return out


# --------------------------------------------------------------------------- the evaluator
@dataclass
class TaskScores:
    """Scores of one model on one split; every score is "higher is better".

    Attributes:
        per_task: task name -> score in [0, 1] (see the module docstring for each metric).
        aggregate: the weighted mean of ``per_task`` (plain mean when every weight is 0).
        raw: task name -> details: ``n`` examples, ``correct`` counts, ``perplexity``, ``nll``,
            ``tokens``.
        split: the split that was scored.
    """

    per_task: dict[str, float]
    aggregate: float
    raw: dict[str, dict[str, float]] = field(default_factory=dict)
    split: str = ""


class TaskEvaluator:
    """Scores live models on a fixed set of tasks; caches the examples and their encodings.

    Args:
        tasks: the tasks (names distinct).
        batch_size: sequences per forward pass.
        fitness_sample_size: if set, the ``fitness`` split of each task is cut to this many
            examples, drawn once from ``seed`` (the same subset for every candidate).
        seed: seeds that subset.
        teacher_forced_splits: splits on which exact match uses the one-pass teacher-forced
            check instead of decoding (the test split is decoded by default).
    """

    def __init__(self, tasks: Sequence[Task], *, batch_size: int = 128,
                 fitness_sample_size: int | None = None, seed: int = 0,
                 teacher_forced_splits: Sequence[str] = ("fitness",)) -> None:
        if not tasks:
            raise EvaluationError("no tasks to evaluate; give at least one task file")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise EvaluationError(f"task names must be distinct, got {names}")
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
        if fitness_sample_size is not None and fitness_sample_size < 1:
            raise EvaluationError(f"fitness_sample_size must be >= 1, got {fitness_sample_size}")
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.fitness_sample_size = fitness_sample_size
        self.seed = seed
        self.teacher_forced_splits = tuple(teacher_forced_splits)
        self._rows: dict[tuple[str, str], list[dict]] = {}
        self._encoded: dict[tuple[int, str, str, int | None], tuple[Any, Any]] = {}
        self._texts: dict[int, tuple[Any, list[str]]] = {}  # tokenizer kept alive: ids stay unique

    def examples(self, task: Task, split: str, limit: int | None = None) -> list[dict]:
        """The rows scored for ``task`` on ``split``: the fixed fitness subset, then ``limit``."""
        key = (task.name, split)
        if key not in self._rows:
            rows = task.examples(split)
            k = self.fitness_sample_size
            if split == "fitness" and k is not None and k < len(rows):
                keep = sorted(random.Random(f"{self.seed}-{task.name}").sample(range(len(rows)), k))
                rows = [rows[i] for i in keep]
            self._rows[key] = rows
        rows = self._rows[key]
        return rows if limit is None else rows[:limit]

    def evaluate(self, model: Any, tokenizer: Any, split: str,
                 limit: int | None = None) -> TaskScores:
        """Score ``model`` (in memory, any device) on ``split`` of every task.

        Args:
            limit: score only the first ``limit`` examples of each task (after the subset).
        Raises:
            EvaluationError: unknown split, bad task rows, or a prompt that encodes to nothing.
        """
        if limit is not None and limit < 1:
            raise EvaluationError(f"limit must be >= 1, got {limit}")
        was_training = model.training
        model.eval()
        try:
            per_task, raw = {}, {}
            for task in self.tasks:
                per_task[task.name], raw[task.name] = self._score(model, tokenizer, task, split,
                                                                  limit)
        finally:
            model.train(was_training)
        return TaskScores(per_task=per_task, aggregate=self._aggregate(per_task), raw=raw,
                          split=split)

    def _aggregate(self, per_task: dict[str, float]) -> float:
        weights = {t.name: t.weight for t in self.tasks}
        total = sum(weights.values())
        if total == 0:
            return sum(per_task.values()) / len(per_task)
        return sum(weights[n] * s for n, s in per_task.items()) / total

    def _score(self, model: Any, tokenizer: Any, task: Task, split: str,
               limit: int | None) -> tuple[float, dict[str, float]]:
        first, second = self._encode(tokenizer, task, split, limit)
        pad = _pad_id(tokenizer)
        if task.type == "exact_match":
            return self._exact_match(model, tokenizer, task, split, first, second, pad)
        if task.type == "multiple_choice":
            return self._multiple_choice(model, task, first, second, pad)
        return self._perplexity(model, first, pad)

    def _encode(self, tokenizer: Any, task: Task, split: str, limit: int | None
                ) -> tuple[Any, Any]:
        """Token ids of a split, cached per tokenizer (the same tokenizer serves every candidate)."""
        key = (id(tokenizer), task.name, split, limit)
        if key not in self._encoded:
            self._encoded[key] = (tokenizer, _encode_rows(tokenizer, task,
                                                          self.examples(task, split, limit)))
        return self._encoded[key][1]

    def _token_texts(self, tokenizer: Any) -> list[str]:
        if id(tokenizer) not in self._texts:
            self._texts[id(tokenizer)] = (tokenizer, _token_texts(tokenizer))
        return self._texts[id(tokenizer)][1]

    def _exact_match(self, model: Any, tokenizer: Any, task: Task, split: str,
                     prompts: list[list[int]], answers: list[Any], pad: int
                     ) -> tuple[float, dict[str, float]]:
        eos, texts = _eos_ids(model, tokenizer), self._token_texts(tokenizer)
        if split in self.teacher_forced_splits:
            stop_start = torch.tensor([i in eos or t.startswith("\n") for i, t in
                                       enumerate(texts)], dtype=torch.bool)
            hits = _teacher_forced_matches(model, prompts, [a[1] for a in answers],
                                           task.max_new_tokens, stop_start, pad, self.batch_size)
        else:
            hits = [False] * len(prompts)
            newline = {i for i, t in enumerate(texts) if "\n" in t}
            for idx in _length_order(prompts, self.batch_size):
                rows = _decode(model, [prompts[i] for i in idx], task.max_new_tokens,
                               eos | newline, pad)
                for i, row in zip(idx, rows, strict=True):
                    hits[i] = _completion_text(tokenizer, row, eos).strip() == answers[i][0]
        correct = sum(hits)
        return correct / len(hits), {"n": len(hits), "correct": correct}

    def _multiple_choice(self, model: Any, task: Task, prompts: list[list[int]],
                         choices: list[Any], pad: int) -> tuple[float, dict[str, float]]:
        seqs, starts, owner = [], [], []
        for i, (p, (_, chs, _)) in enumerate(zip(prompts, choices, strict=True)):
            for c in chs:
                seqs.append(p + c)
                starts.append(len(p))
                owner.append(i)
        logps = _sequence_logprobs(model, seqs, starts, pad, self.batch_size)
        correct, k = 0, 0
        for p, (texts, chs, label) in zip(prompts, choices, strict=True):
            scores = logps[k : k + len(chs)]
            if task.metric == "accuracy_norm":
                scores = [s / max(1, len(t)) for s, t in zip(scores, texts, strict=True)]
            correct += int(max(range(len(scores)), key=scores.__getitem__) == label)
            k += len(chs)
        return correct / len(prompts), {"n": len(prompts), "correct": correct}

    def _perplexity(self, model: Any, seqs: list[list[int]], pad: int
                    ) -> tuple[float, dict[str, float]]:
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit and any(len(s) > limit for s in seqs):
            logger.warning("perplexity texts longer than %d tokens are truncated", limit)
            seqs = [s[:limit] for s in seqs]
        scored = [s for s in seqs if len(s) > 1]
        logps = _sequence_logprobs(model, scored, [1] * len(scored), pad, self.batch_size)
        tokens = sum(len(s) - 1 for s in scored)
        nll = -sum(logps) / tokens
        return math.exp(-nll), {"n": len(seqs), "tokens": tokens, "nll": nll,
                                "perplexity": math.exp(nll)}


def _encode_rows(tokenizer: Any, task: Task, rows: list[dict]) -> tuple[Any, Any]:
    """Token ids: (prompts, (answer, answer ids)) / (prompts, (choices, choice ids, label)) /
    (texts, None). Prompts and texts get the tokenizer's special tokens (e.g. BOS); answers and
    choices are encoded on their own, without special tokens, and appended."""
    if task.type == "perplexity":
        texts = tokenizer([r["text"] for r in rows])["input_ids"]
        return [list(t) for t in texts], None
    prompts = [list(p) for p in tokenizer([r["prompt"] for r in rows])["input_ids"]]
    if any(not p for p in prompts):
        raise EvaluationError(f"task {task.name!r}: a prompt encodes to no tokens (empty prompt "
                              "with a tokenizer that adds no BOS)")
    if task.type == "exact_match":
        answers = tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
        return prompts, [(r["answer"].strip(), list(a)) for r, a in zip(rows, answers,
                                                                        strict=True)]
    out = []
    for r in rows:
        ids = tokenizer(r["choices"], add_special_tokens=False)["input_ids"]
        out.append((r["choices"], [list(c) for c in ids], r["label"]))
    return prompts, out


# --------------------------------------------------------------------------- generation
def generate_text(model: Any, tokenizer: Any, prompt: str, max_length: int = 100,
                  **kwargs: Any) -> str:
    """Continue ``prompt`` and return the new text only (greedy unless ``temperature`` > 0).

    Args:
        max_length: the most new tokens to generate (the prompt does not count).
        **kwargs: ``temperature`` (0: greedy), ``top_k`` (0: all tokens), ``seed`` (for
            sampling), ``stop_at_newline`` (False: stop only at EOS).
    """
    options = {"temperature": 0.0, "top_k": 0, "seed": 0, "stop_at_newline": False}
    unknown = set(kwargs) - set(options)
    if unknown:
        raise TypeError(f"generate_text() got unknown option(s) {sorted(unknown)}; "
                        f"known: {sorted(options)}")
    options.update(kwargs)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise EvaluationError("the prompt encodes to no tokens; give a non-empty prompt")
    eos = _eos_ids(model, tokenizer)
    stop = set(eos)
    if options["stop_at_newline"]:
        stop |= {i for i, t in enumerate(_token_texts(tokenizer)) if "\n" in t}
    pick = _sampler(options["temperature"], options["top_k"], options["seed"], model)
    was_training = model.training
    model.eval()
    try:
        row = _decode(model, [ids], max_length, stop or {-1}, _pad_id(tokenizer), pick)[0]
    finally:
        model.train(was_training)
    text = tokenizer.decode([t for t in row if t not in eos], skip_special_tokens=True)
    return text.split("\n", 1)[0] if options["stop_at_newline"] else text


def _sampler(temperature: float, top_k: int, seed: int, model: Any) -> Any:
    """None (greedy) or a function (B, V) logits -> (B,) sampled ids from a seeded generator."""
    if temperature <= 0:
        return None
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits / temperature
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]

    return pick
