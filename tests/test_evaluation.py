"""Tests of the evaluator: task files, hand-computed scores on a bigram Llama, batching.

The hand-computed cases use a real ``LlamaForCausalLM`` whose weights make it a bigram model:
one-hot embeddings, zero attention and MLP outputs, so the residual stream is the embedding, the
final RMSNorm turns it into an exact one-hot, and the logits after token ``i`` are column ``i`` of
``lm_head`` — a table we choose. With ``T[i, succ(i)] = 4`` and 0 elsewhere, every probability is
``e^4 / Z`` or ``1 / Z`` with ``Z = e^4 + V - 1``, so each score has a closed form.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from agent_forge.evomerge.evaluation import (
    Task,
    TaskEvaluator,
    configure_torch_threads,
    generate_text,
    load_task,
    load_tasks,
)
from agent_forge.evomerge.exceptions import EvaluationError

DATA = Path(__file__).resolve().parents[1] / "agent_forge" / "evomerge" / "data"
BOOST = 4.0
# the bigram table's successors: A->B->C->D->EOS, 1->2->newline, 7->8->9->9->9...
CHAINS = ["ABCD", "12", "789"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DATA / "default_models" / "base")


def _tid(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


@pytest.fixture(scope="module")
def bigram(tokenizer):
    """A Llama whose next-token logits depend only on the current token (see module doc)."""
    v = len(tokenizer)
    config = LlamaConfig(
        vocab_size=v,
        hidden_size=v,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    table = torch.zeros(v, v)  # table[i] = logits after token i
    eos, newline = tokenizer.eos_token_id, _tid(tokenizer, "\n")
    table[tokenizer.bos_token_id, _tid(tokenizer, "A")] = BOOST
    for chain, end in zip(CHAINS, [eos, newline, "9"], strict=True):
        end = _tid(tokenizer, end) if isinstance(end, str) else end
        ids = [_tid(tokenizer, c) for c in chain]
        for a, b in zip(ids, ids[1:] + [end], strict=True):
            table[a, b] = BOOST
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(100.0 * torch.eye(v))
        model.model.norm.weight.fill_(1.0 / math.sqrt(v))
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.lm_head.weight.copy_(table.T)
    return model


def _z(tokenizer) -> float:
    return math.exp(BOOST) + len(tokenizer) - 1


def _write_task(folder: Path, desc: dict, rows: list[dict], split: str = "test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    desc = {"splits": {split: f"{split}.jsonl"}} | desc
    (folder / "task.json").write_text(json.dumps(desc))
    return folder / "task.json"


def test_bigram_model_logits_are_the_table(bigram, tokenizer):
    ids = tokenizer("AB")["input_ids"]
    logp = bigram(torch.tensor([ids])).logits[0].log_softmax(-1)
    z = _z(tokenizer)
    assert logp[1, _tid(tokenizer, "B")].item() == pytest.approx(BOOST - math.log(z), abs=1e-4)
    assert logp[1, _tid(tokenizer, "Q")].item() == pytest.approx(-math.log(z), abs=1e-4)


@pytest.mark.parametrize("teacher_forced", [False, True])
def test_exact_match_hand_computed(bigram, tokenizer, tmp_path, teacher_forced):
    # greedy: "A" -> "BCD" then EOS; "1" -> "2" then newline; "7" -> "8999..." never stops
    rows = [
        {"prompt": "A", "answer": "BCD"},  # right: stops at EOS
        {"prompt": "B", "answer": " CD "},  # right: answers are compared stripped
        {"prompt": "1", "answer": "2"},  # right: stops at the newline
        {"prompt": "A", "answer": "BC"},  # wrong: the model goes on to D
        {"prompt": "C", "answer": "X"},  # wrong
        {"prompt": "7", "answer": "89"},  # wrong: the model goes on with 9s
    ]
    path = _write_task(
        tmp_path / "em", {"name": "em", "type": "exact_match", "max_new_tokens": 6}, rows, "fitness"
    )
    splits = ("fitness",) if teacher_forced else ()
    scores = TaskEvaluator([load_task(path)], teacher_forced_splits=splits).evaluate(
        bigram, tokenizer, "fitness"
    )
    if teacher_forced:  # " CD " is not the canonical tokenisation of what greedy emits
        assert scores.raw["em"] == {"n": 6, "correct": 2}
    else:
        assert scores.raw["em"] == {"n": 6, "correct": 3}
    # max_new_tokens caps the completion: "A" -> "BC" counts as "BC", in both paths
    path2 = _write_task(
        tmp_path / "em2",
        {"name": "em2", "type": "exact_match", "max_new_tokens": 2},
        rows[3:4] + rows[:1],
        "fitness",
    )
    scores = TaskEvaluator([load_task(path2)], teacher_forced_splits=splits).evaluate(
        bigram, tokenizer, "fitness"
    )
    assert scores.per_task["em2"] == 0.5


def test_multiple_choice_hand_computed(bigram, tokenizer, tmp_path):
    z = math.log(_z(tokenizer))
    good, bad = BOOST - z, -z  # log p of a successor / of any other token
    # after "A": "B" = good, "C" = bad, "BCD" = 3 good (sum lower than "C", mean higher)
    assert 3 * good < bad < good
    rows = [
        {"prompt": "A", "choices": ["C", "B"], "label": 1},  # both metrics right
        {"prompt": "A", "choices": ["C", "BCD"], "label": 1},  # sum picks "C"; per char "BCD"
        {"prompt": "1", "choices": ["2", "3", "4"], "label": 2},  # both wrong
    ]
    for metric, expected in [("accuracy", 1 / 3), ("accuracy_norm", 2 / 3)]:
        path = _write_task(
            tmp_path / metric, {"name": metric, "type": "multiple_choice", "metric": metric}, rows
        )
        scores = TaskEvaluator([load_task(path)]).evaluate(bigram, tokenizer, "test")
        assert scores.per_task[metric] == pytest.approx(expected)


def test_perplexity_hand_computed(bigram, tokenizer, tmp_path):
    z = _z(tokenizer)
    # "ABCD": BOS->A, A->B, B->C, C->D all successors; "AC": BOS->A successor, A->C not.
    nlls = [math.log(z) - BOOST] * 4 + [math.log(z) - BOOST, math.log(z)]
    expected_ppl = math.exp(sum(nlls) / len(nlls))
    path = _write_task(
        tmp_path / "ppl",
        {"name": "ppl", "type": "perplexity", "weight": 0},
        [{"text": "ABCD"}, {"text": "AC"}],
    )
    scores = TaskEvaluator([load_task(path)]).evaluate(bigram, tokenizer, "test")
    assert scores.raw["ppl"]["tokens"] == 6
    assert scores.raw["ppl"]["perplexity"] == pytest.approx(expected_ppl, rel=1e-5)
    assert scores.per_task["ppl"] == pytest.approx(1 / expected_ppl, rel=1e-5)
    assert scores.aggregate == scores.per_task["ppl"]  # all weights 0: the plain mean


def test_aggregate_is_weighted_mean(bigram, tokenizer, tmp_path):
    a = _write_task(
        tmp_path / "a",
        {"name": "a", "type": "exact_match", "weight": 3},
        [{"prompt": "A", "answer": "BCD"}],
    )
    b = _write_task(
        tmp_path / "b",
        {"name": "b", "type": "exact_match", "weight": 1},
        [{"prompt": "A", "answer": "no"}],
    )
    scores = TaskEvaluator(load_tasks([a, b])).evaluate(bigram, tokenizer, "test")
    assert scores.per_task == {"a": 1.0, "b": 0.0}
    assert scores.aggregate == pytest.approx(0.75)


def test_generate_text_on_bigram(bigram, tokenizer):
    assert generate_text(bigram, tokenizer, "A", max_length=10) == "BCD"
    assert generate_text(bigram, tokenizer, "A", max_length=2) == "BC"
    assert generate_text(bigram, tokenizer, "1", max_length=5, stop_at_newline=True) == "2"
    a = generate_text(bigram, tokenizer, "Q", max_length=8, temperature=1.0, seed=3)
    assert a == generate_text(bigram, tokenizer, "Q", max_length=8, temperature=1.0, seed=3)
    with pytest.raises(TypeError, match="unknown option"):
        generate_text(bigram, tokenizer, "A", beams=2)


def test_fitness_subset_is_fixed_and_limit_cuts(tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(50)]
    path = _write_task(tmp_path / "t", {"name": "t", "type": "exact_match"}, rows, "fitness")
    task = load_task(path)
    a = TaskEvaluator([task], fitness_sample_size=10, seed=1).examples(task, "fitness")
    b = TaskEvaluator([task], fitness_sample_size=10, seed=1).examples(task, "fitness")
    c = TaskEvaluator([task], fitness_sample_size=10, seed=2).examples(task, "fitness")
    assert a == b and a != c and len(a) == 10
    assert all(r in rows for r in a)
    assert (
        TaskEvaluator([task], fitness_sample_size=10, seed=1).examples(task, "fitness", limit=3)
        == a[:3]
    )


@pytest.mark.parametrize(
    ("desc", "message"),
    [
        ({"name": "x", "type": "essay"}, "'type'"),
        ({"name": "x", "type": "exact_match", "metric": "accuracy"}, "'metric'"),
        ({"name": "x", "type": "exact_match", "weight": -1}, "'weight'"),
        ({"name": "x", "type": "exact_match", "max_new_tokens": 0}, "'max_new_tokens'"),
        ({"name": "x", "type": "exact_match", "colour": "red"}, "unknown field"),
        ({"name": "", "type": "exact_match"}, "'name'"),
        ({"name": "x", "type": "exact_match", "splits": {"test": "missing.jsonl"}}, "missing"),
    ],
)
def test_bad_task_files_raise_clear_errors(tmp_path, desc, message):
    path = _write_task(tmp_path, desc, [{"prompt": "a", "answer": "b"}])
    with pytest.raises(EvaluationError, match=message):
        load_task(path)


def test_bad_rows_and_files_raise(tmp_path):
    with pytest.raises(EvaluationError, match="does not exist"):
        load_task(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EvaluationError, match="JSON"):
        load_task(tmp_path / "bad.json")
    path = _write_task(
        tmp_path / "r",
        {"name": "r", "type": "multiple_choice"},
        [{"prompt": "a", "choices": ["x", "y"], "label": 5}],
    )
    with pytest.raises(EvaluationError, match=r"test.jsonl:1: 'label' 5"):
        load_task(path).examples("test")
    with pytest.raises(EvaluationError, match="no split 'fitness'"):
        load_task(path).examples("fitness")
    one = _write_task(tmp_path / "d", {"name": "d", "type": "perplexity"}, [{"text": "a"}])
    with pytest.raises(EvaluationError, match="distinct"):
        load_tasks([one, one])


def test_task_is_data(tmp_path):
    path = _write_task(
        tmp_path, {"name": "n", "type": "perplexity", "weight": 0.5}, [{"text": "hello"}]
    )
    task = load_task(path)
    assert isinstance(task, Task)
    assert (task.name, task.type, task.metric, task.weight) == (
        "n",
        "perplexity",
        "inverse_perplexity",
        0.5,
    )
    assert task.splits["test"] == (tmp_path / "test.jsonl").resolve()
    assert task.examples("test") == [{"text": "hello"}]


def test_configure_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_torch_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("EVOMERGE_THREADS", "2")
        assert configure_torch_threads() == 2
        with pytest.raises(ValueError):
            configure_torch_threads(0)
    finally:
        torch.set_num_threads(before)
