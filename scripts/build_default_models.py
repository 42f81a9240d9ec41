"""Build EvoMerge's embedded default: a tiny base Llama, three specialists and their tasks.

The package ships the output of this script under ``agent_forge/evomerge/data``:

- ``default_models/base``: a ``LlamaForCausalLM`` (~0.79M parameters, 4 layers, width 128) with
  a GPT-2 style byte-level BPE tokenizer (512 tokens), trained on simple English plus a
  curriculum of the three skills (copying, 2-3 letter variants, a little of each full skill), so
  that it knows every format and half-knows every skill;
- ``default_models/{reversal,sorting,shift}``: three specialists, each a short fine-tune of the
  base on one full skill only (4-6 capital letters: ``ABCD>`` -> ``DCBA``, ``DBCA|`` -> ``ABCD``,
  ``ABCZ+`` -> ``BCDA``). Each masters its skill and forgets the others, which share its inputs;
  the moves are small, so merges recover all three;
- ``tasks/<skill>/{task.json,fitness.jsonl,test.jsonl}``: exact-match tasks (300 fitness and 500
  test prompts each, disjoint, never trained on) and ``tasks/general_text``: a perplexity set
  (weight 0: reported, not part of the fitness);
- ``default_manifest.json``: what ``create_default_config()`` reads.

Run (about ten minutes on one CPU thread; the shipped weights are its output)::

    python scripts/build_default_models.py            # writes agent_forge/evomerge/data
    python scripts/build_default_models.py --out /tmp/default --threads 2

Everything is seeded: the data come from ``random.Random`` streams with fixed seeds, the weights
from ``torch.manual_seed`` with deterministic algorithms; a rerun gives bit-identical files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import string
import time
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("build_default_models")

SEED = 1234
SKILLS = ("reversal", "sorting", "shift")
LETTERS = string.ascii_uppercase
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "agent_forge" / "evomerge" / "data"
SPLIT_SIZES = {"fitness": 300, "test": 500}
TEXT_SPLIT_SIZES = {"fitness": 100, "test": 200}

Example = tuple[str, str]  # (prompt, answer); general text has an empty prompt


# --------------------------------------------------------------------------- data generators
def _letters(rng: random.Random, lo: int, hi: int, distinct: bool = False) -> str:
    n = rng.randint(lo, hi)
    if distinct:
        return "".join(rng.sample(LETTERS, n))
    return "".join(rng.choice(LETTERS) for _ in range(n))


def reversal(rng: random.Random, lo: int = 4, hi: int = 6) -> Example:
    """Reverse 4-6 capital letters: ``ABCD>`` -> ``DCBA``."""
    s = _letters(rng, lo, hi)
    return f"{s}>", s[::-1]


def sorting(rng: random.Random, lo: int = 4, hi: int = 6) -> Example:
    """Sort 4-6 distinct capital letters: ``DBCA|`` -> ``ABCD``."""
    s = _letters(rng, lo, hi, distinct=True)
    return f"{s}|", "".join(sorted(s))


def shift(rng: random.Random, lo: int = 4, hi: int = 6) -> Example:
    """Shift 4-6 capital letters to the next letter (Z wraps to A): ``ABCZ+`` -> ``BCDA``."""
    s = _letters(rng, lo, hi)
    return f"{s}+", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)


def shift_easy(rng: random.Random) -> Example:
    return shift(rng, 2, 3)


def reversal_easy(rng: random.Random) -> Example:
    return reversal(rng, 2, 3)


def sorting_easy(rng: random.Random) -> Example:
    return sorting(rng, 2, 3)


def copy(rng: random.Random) -> Example:
    """Copy letters or digits: ``ABCD:`` -> ``ABCD`` (teaches emitting the skills' symbols)."""
    s = _letters(rng, 2, 6) if rng.random() < 0.7 else str(rng.randint(0, 9999))
    return f"{s}:", s


# A small grammar of lower-case English without digits or capitals, so that the tokenizer trained
# on it never merges digits or capital letters: the skills' strings stay one token per character.
_WORDS = {
    "det": "the|a|my|her|his|our|that|this".split("|"),
    "adj": (
        "old|young|small|big|red|green|quiet|happy|tired|clever|brave|little"
        "|kind|strange|bright|dark|warm|cold"
    ).split("|"),
    "noun": (
        "man|woman|girl|boy|dog|cat|bird|farmer|teacher|child|king|queen|fox"
        "|horse|sailor|baker|friend|doctor|student"
    ).split("|"),
    "thing": (
        "ball|book|letter|apple|basket|door|window|song|boat|map|key|cake"
        "|lamp|river|garden|house|road|tree|box"
    ).split("|"),
    "tverb": (
        "sees|finds|likes|carries|opens|paints|watches|builds|reads|wants"
        "|takes|gives away|cleans|follows|remembers"
    ).split("|"),
    "iverb": (
        "sleeps|walks|runs|sings|waits|laughs|smiles|rests|dances|works|listens|returns"
    ).split("|"),
    "place": (
        "in the garden|near the river|on the hill|at the market|by the sea"
        "|under the tree|in the kitchen|at school|in the forest|on the road"
    ).split("|"),
    "time": (
        "in the morning|after dinner|every day|at night|in the spring"
        "|before noon|on sunday|all day|in winter|today"
    ).split("|"),
    "conj": "and then|because|but|while|so|and".split("|"),
}
_FACTS = (
    "the sky is blue|grass is green|snow is white|the sun is hot|ice is cold"
    "|fish swim in the water|birds fly in the sky|bread is made from flour|cats like milk"
    "|dogs like to run|the moon shines at night|rain falls from clouds|bees make honey"
    "|trees grow from seeds|the sea is deep|fire is warm"
).split("|")


def _noun_phrase(rng: random.Random, kind: str) -> str:
    words = [rng.choice(_WORDS["det"])]
    if rng.random() < 0.5:
        words.append(rng.choice(_WORDS["adj"]))
    words.append(rng.choice(_WORDS[kind]))
    return " ".join(words)


def _clause(rng: random.Random) -> str:
    subject = _noun_phrase(rng, "noun")
    if rng.random() < 0.5:
        core = f"{subject} {rng.choice(_WORDS['tverb'])} {_noun_phrase(rng, 'thing')}"
    else:
        core = f"{subject} {rng.choice(_WORDS['iverb'])}"
    extra = rng.random()
    if extra < 0.3:
        core += " " + rng.choice(_WORDS["place"])
    elif extra < 0.5:
        core += " " + rng.choice(_WORDS["time"])
    return core


def general_text(rng: random.Random) -> Example:
    """One line of simple English: a clause, two joined clauses, or a fact."""
    r = rng.random()
    if r < 0.15:
        line = rng.choice(_FACTS) + "."
    elif r < 0.7:
        line = _clause(rng) + "."
    else:
        line = f"{_clause(rng)} {rng.choice(_WORDS['conj'])} {_clause(rng)}."
    return "", line


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "reversal": reversal,
    "sorting": sorting,
    "shift": shift,
    "reversal_easy": reversal_easy,
    "sorting_easy": sorting_easy,
    "shift_easy": shift_easy,
    "copy": copy,
    "text": general_text,
}


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Stage:
    """One training run: a mixture of generators (relative weights), a schedule, a seed."""

    name: str
    mixture: dict[str, float]
    steps: int
    lr: float
    warmup: int
    weight_decay: float
    seed: int


def _base_stage() -> Stage:
    """General text, copying, the easy variants (2-3 letters), and a little of each full skill.

    The full skills' 2.5% share is what makes the specialists mergeable: with none (or 1%), the
    base knows the formats but not the skills, the specialists move far and every merge
    collapses; with 5%, the base is already good at them and the plain average is within a point
    or two of the best merge any search found, leaving the search nothing to earn.
    """
    mixture = {"text": 1.0, "copy": 1.0, **{f"{s}_easy": 1.0 for s in SKILLS}}
    mixture |= {s: 0.025 for s in SKILLS}
    return Stage("base", mixture, steps=800, lr=2e-3, warmup=50, weight_decay=0.1, seed=SEED + 1)


@dataclass(frozen=True)
class BuildSettings:
    """Everything that determines the shipped weights (change it and the weights change)."""

    seed: int = SEED
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 64
    vocab_size: int = 512
    batch_size: int = 128
    base: Stage = field(default_factory=_base_stage)
    specialist_steps: int = 300
    specialist_warmup: int = 50
    #: Per-skill peak learning rates. The reversal specialist is fine-tuned ten times harder,
    #: as fine-tunes found on the Hub differ in strength: its task vector is ~5x the others
    #: and dominates any equal-weight merge (the plain average and default TIES lose the other
    #: two skills), while a merge that weighs the inputs apart keeps all three.
    specialist_lrs: tuple[float, ...] = (3e-3, 3e-4, 3e-4)

    def joint(self) -> Stage:
        """The upper limit (not shipped): the base fine-tuned on all three full skills at once,
        for as many examples as the three specialists together."""
        return Stage(
            "joint",
            {skill: 1.0 for skill in SKILLS},
            steps=3 * self.specialist_steps,
            lr=self.specialist_lrs[1],
            warmup=self.specialist_warmup,
            weight_decay=0.0,
            seed=self.seed + 20,
        )

    def specialists(self) -> list[Stage]:
        """One stage per skill: a short fine-tune of the base on that full skill only."""
        return [
            Stage(
                skill,
                {skill: 1.0},
                steps=self.specialist_steps,
                lr=self.specialist_lrs[i],
                warmup=self.specialist_warmup,
                weight_decay=0.0,
                seed=self.seed + 10 + i,
            )
            for i, skill in enumerate(SKILLS)
        ]


# --------------------------------------------------------------------------- held-out data
def heldout_splits(seed: int = SEED) -> dict[str, dict[str, list[Example]]]:
    """The fitness and test splits of every skill and of general text, disjoint by prompt/text.

    Generated before any training data, from their own seed; training streams reject them.
    """
    rng = random.Random(f"heldout-{seed}")
    sizes = {skill: SPLIT_SIZES for skill in SKILLS} | {"general_text": TEXT_SPLIT_SIZES}
    out: dict[str, dict[str, list[Example]]] = {}
    for name, split_sizes in sizes.items():
        gen = GENERATORS["text" if name == "general_text" else name]
        seen: set[str] = set()
        out[name] = {}
        for split, size in split_sizes.items():
            rows: list[Example] = []
            while len(rows) < size:
                ex = gen(rng)
                key = ex[0] or ex[1]  # the prompt, or the line of general text
                if key not in seen:
                    seen.add(key)
                    rows.append(ex)
            out[name][split] = rows
    return out


def heldout_keys(splits: dict[str, dict[str, list[Example]]]) -> set[str]:
    """Every held-out prompt (skills) and line (general text): what training must never emit."""
    keys = set()
    for rows_by_split in splits.values():
        for rows in rows_by_split.values():
            keys.update(p if p else a for p, a in rows)
    return keys


def training_batches(stage: Stage, batch_size: int, exclude: set[str]) -> Iterator[list[Example]]:
    """The exact stream of training batches of a stage (deterministic in ``stage.seed``).

    Any example whose prompt (or, for text, whose line) is held out is redrawn, so no fitness or
    test prompt is ever trained on. ``tests/test_default_models.py`` replays this stream.
    """
    rng = random.Random(f"train-{stage.name}-{stage.seed}")
    names = sorted(stage.mixture)
    weights = [stage.mixture[n] for n in names]
    for _ in range(stage.steps):
        batch = []
        for name in rng.choices(names, weights, k=batch_size):
            ex = GENERATORS[name](rng)
            while (ex[0] or ex[1]) in exclude:
                ex = GENERATORS[name](rng)
            batch.append(ex)
        yield batch


def all_training_stages(settings: BuildSettings) -> list[Stage]:
    return [settings.base, *settings.specialists(), settings.joint()]


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(settings: BuildSettings):  # -> PreTrainedTokenizerFast
    """A GPT-2 style byte-level BPE trained on general text only (no digit or capital merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(f"tokenizer-{settings.seed}")
    corpus = [general_text(rng)[1] for _ in range(20000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=settings.max_positions,
    )


# --------------------------------------------------------------------------- training
def encode_batch(tokenizer, batch: list[Example]):
    """Right-padded ``(input_ids, attention_mask, labels)``; loss only on the answer and EOS."""
    import torch

    prompts = tokenizer([p for p, _ in batch], add_special_tokens=True)["input_ids"]
    answers = tokenizer([a for _, a in batch], add_special_tokens=False)["input_ids"]
    seqs, labels = [], []
    for p, a in zip(prompts, answers, strict=True):
        seqs.append(p + a + [tokenizer.eos_token_id])
        labels.append([-100] * len(p) + a + [tokenizer.eos_token_id])
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    lab = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(s)] = torch.tensor(lb)
        mask[i, : len(s)] = 1
    return ids, mask, lab


def lr_at(step: int, stage: Stage) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, tokenizer, stage: Stage, settings: BuildSettings, exclude: set[str]) -> None:
    """Train ``model`` in place on one stage (AdamW, clipped gradients)."""
    import torch

    torch.manual_seed(stage.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=stage.lr, betas=(0.9, 0.95), weight_decay=stage.weight_decay
    )
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(training_batches(stage, settings.batch_size, exclude)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, stage)
        ids, mask, labels = encode_batch(tokenizer, batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == stage.steps - 1:
            logger.info(
                "%s step %d/%d loss %.4f (%.0fs)",
                stage.name,
                step + 1,
                stage.steps,
                loss.item(),
                time.perf_counter() - start,
            )
    model.eval()


def new_base_model(settings: BuildSettings, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=settings.max_positions,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# --------------------------------------------------------------------------- writing
def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_tasks(out: Path, splits: dict[str, dict[str, list[Example]]]) -> list[str]:
    """Write every task's descriptor and JSONL splits; return the descriptors' relative paths."""
    descriptors = []
    for name, by_split in splits.items():
        folder = out / "tasks" / name
        if name == "general_text":
            desc = {
                "name": name,
                "type": "perplexity",
                "metric": "inverse_perplexity",
                "weight": 0.0,
                "description": "Simple English sentences; score = 1/perplexity, "
                "reported but weight 0 in the default fitness.",
            }
            for split, rows in by_split.items():
                write_jsonl(folder / f"{split}.jsonl", [{"text": a} for _, a in rows])
        else:
            desc = {
                "name": name,
                "type": "exact_match",
                "metric": "exact_match",
                "weight": 1.0,
                "max_new_tokens": 8,
                "description": GENERATORS[name].__doc__.strip(),
            }
            for split, rows in by_split.items():
                write_jsonl(
                    folder / f"{split}.jsonl", [{"prompt": p, "answer": a} for p, a in rows]
                )
        desc["splits"] = {split: f"{split}.jsonl" for split in by_split}
        (folder / "task.json").write_text(json.dumps(desc, indent=2) + "\n", encoding="utf-8")
        descriptors.append(f"tasks/{name}/task.json")
    return descriptors


def write_manifest(out: Path, descriptors: list[str]) -> None:
    manifest = {
        "base": {"name": "base", "path": "default_models/base"},
        "models": [{"name": s, "path": f"default_models/{s}"} for s in SKILLS],
        "tasks": descriptors,
    }
    (out / "default_manifest.json").write_text(
        json.dumps(manifest, indent=2) + "\n", encoding="utf-8"
    )


def save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# --------------------------------------------------------------------------- main
def build(out: Path, settings: BuildSettings, threads: int) -> None:
    """Train everything and write it under ``out`` (replacing earlier models, tasks, manifest)."""
    import copy as _copy

    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    splits = heldout_splits(settings.seed)
    exclude = heldout_keys(splits)
    tokenizer = train_tokenizer(settings)
    base = new_base_model(settings, tokenizer)
    logger.info("base model: %d parameters", sum(p.numel() for p in base.parameters()))
    train(base, tokenizer, settings.base, settings, exclude)
    models = {"base": base}
    for stage in [*settings.specialists(), settings.joint()]:
        models[stage.name] = _copy.deepcopy(base)
        train(models[stage.name], tokenizer, stage, settings, exclude)
    joint = models.pop("joint")
    staging = out / ".build"
    if staging.exists():
        shutil.rmtree(staging)
    for name, model in models.items():
        save(model, tokenizer, staging / "default_models" / name)
    write_manifest(staging, write_tasks(staging, splits))
    for entry in ("default_models", "tasks", "default_manifest.json"):  # swap in when complete
        old = out / entry
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        (staging / entry).rename(old)
    staging.rmdir()
    print_quality_table(quality_table({**models, "joint": joint}, tokenizer, out))


# --------------------------------------------------------------------------- quality table
def quality_table(models: dict, tokenizer, out: Path, split: str = "test") -> list[tuple]:
    """Rows ``(name, {skill: score}, mean)`` on ``split``: each specialist, the base, the plain
    average, default TIES (density 0.5, λ 1) and the jointly trained reference.

    The merges use the package's own techniques on the state dicts, tensor by tensor.
    """
    import torch

    from agent_forge.evomerge.evaluation import TaskEvaluator, load_tasks
    from agent_forge.evomerge.techniques import MERGE_TECHNIQUES, apply_technique, canonical_params

    manifest = json.loads((out / "default_manifest.json").read_text())
    tasks = load_tasks([out / t for t in manifest["tasks"]])
    evaluator = TaskEvaluator(tasks)
    skills = [t.name for t in tasks if t.weight > 0]
    base = {k: v.clone() for k, v in models["base"].state_dict().items()}
    parents = [models[s].state_dict() for s in SKILLS]

    def merged(name: str) -> dict:
        tech = MERGE_TECHNIQUES[name]
        params = canonical_params(tech, {}, len(parents))
        state = {}
        for key, b in base.items():
            if tech.needs_base:
                stack = torch.stack([m[key] - b for m in parents])
                state[key] = b + apply_technique(tech, stack, params)
            else:
                state[key] = apply_technique(tech, torch.stack([m[key] for m in parents]), params)
        return state

    states = {s: models[s].state_dict() for s in SKILLS}
    states |= {"base": base, "average": merged("linear"), "ties": merged("ties")}
    if "joint" in models:
        states["joint (reference)"] = models["joint"].state_dict()
    probe = deepcopy(models["base"]).eval()
    rows = []
    for name, state in states.items():
        probe.load_state_dict(state)
        scores = evaluator.evaluate(probe, tokenizer, split)
        rows.append((name, {s: scores.per_task[s] for s in skills}, scores.aggregate))
    return rows


def print_quality_table(rows: list[tuple]) -> None:
    skills = list(rows[0][1])
    print("| model (test split, %) | " + " | ".join(skills) + " | mean |")
    print("|---" * (len(skills) + 2) + "|")
    for name, scores, mean in rows:
        cells = " | ".join(f"{100 * scores[s]:.1f}" for s in skills)
        print(f"| {name} | {cells} | {100 * mean:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the shipped weights: 1)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    build(args.out, BuildSettings(), args.threads)
    logger.info("built the default in %.0fs into %s", time.perf_counter() - start, args.out)


if __name__ == "__main__":
    main()
