"""`rdhpc prep synthetic`: built-in reasoning tasks whose difficulty needs depth.

    rdhpc prep synthetic --task chains --out task/ --train-docs 20000 --eval-examples 200 \
        --train-difficulty 1-4 --eval-difficulty 1-8 --seed 0
    rdhpc prep shards --input task=task/train.jsonl --tokenizer tok.json --seq-len 128 --out shards/task

Writes OUT/train.jsonl (documents {"text": ...}, a source for `rdhpc prep shards`, mixable with
text), one held-out file per difficulty, OUT/eval-<task>-h<k>.jsonl ({"prompt", "target"}: greedy
decoding, exact match, the evaluator stops at a newline) and OUT/eval-<task>-mc-h<k>.jsonl ({"prompt",
"choices", "answer"}: the same instances scored by log-likelihood), and OUT/tasks.json (every eval
file with its kind and difficulty, the exact settings and seed).

The task `chains` (variable chains to resolve; one hop per link). A document states a few chains
of single-letter variables that end in distinct digits, one statement per variable, sorted by the
variable's letter (so a chain's links are scattered and only content, not position, finds the next
one), asks for the value of the head of each chain, in random order, and (unless --no-recall)
repeats every statement as a direct lookup, in random order:

     b q; e7; h b; q3; x e.
    ? h3
    ? x7
    ! q3
    ! h b
    ...

`h` needs 3 hops (h -> b -> q -> 3), `x` 2 (the chains here: h b q, x e). The difficulty k of a
query is its number of hops. Every symbol is one token of the byte-level BPE's split pattern: a
variable is " x" (space and letter); a digit, "?", "!", ";" and the newline stand alone. A value
follows its variable directly, in a statement and in a query alike, so one hop is what an induction
head does (attend to the token after the earlier occurrence of this variable as a left side, copy
it): a core iteration can do one, and r iterations ~ r hops.

Choices for a tiny model (measured in docs/synthetic_task.md; the first versions stayed at chance
in 600 steps): statements sorted by variable (their left sides cost little loss), one query per
chain (its head) so no earlier answer gives a later one away, chain lengths uniform over the
training range (a curriculum of hop counts in every batch), distinct root digits (chance is
1 / chains), the direct lookups after the queries (dense gradient for the one-hop copy every hop
repeats; after the queries, so a document's prefix up to its first answer is exactly a held-out
prompt). Held-out instances are the head of a chain of exactly k links among chains of 1..k links,
k up to beyond the training range (the recurrent-depth literature's extrapolation setting); their
statement sets never occur in training (canonical form hashed).

Seeded and exact: the same settings give the same bytes (Python's `random.Random`, seeded from a
SHA-256 of (seed, task, split), whose sequence Python keeps stable across versions).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from rdhpc.errors import UserError

FORMAT_VERSION = 1
VARIABLES = string.ascii_lowercase
DIGITS = string.digits


class SyntheticError(UserError, ValueError):
    pass


@dataclass
class SyntheticSettings:
    task: str = "chains"
    out: str = "synthetic"
    train_docs: int = 20000
    eval_examples: int = 200
    train_difficulty: tuple[int, int] = (1, 4)
    eval_difficulty: tuple[int, int] = (1, 8)
    min_chains: int = 3
    max_chains: int = 6
    max_variables: int = 24
    recall: bool = True
    """After the queries, every statement once more as a direct lookup (`! h b`, in random order):
    dense gradient for the one-hop lookup that every hop repeats."""
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.task not in TASKS:
            out.append(f"--task: unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        if self.train_docs < 1:
            out.append(f"--train-docs: must be >= 1, got {self.train_docs}")
        if self.eval_examples < 1:
            out.append(f"--eval-examples: must be >= 1, got {self.eval_examples}")
        for option, (lo, hi) in (("--train-difficulty", self.train_difficulty),
                                 ("--eval-difficulty", self.eval_difficulty)):
            if not 1 <= lo <= hi:
                out.append(f"{option}: need 1 <= LO <= HI, got {lo}-{hi}")
            elif hi > self.max_variables:
                out.append(f"{option}: {hi} hops need {hi} variables, more than --max-variables {self.max_variables}")
        if not 2 <= self.min_chains <= self.max_chains:
            out.append(f"--chains: need 2 <= MIN <= MAX, got {self.min_chains}-{self.max_chains}")
        elif self.max_chains > len(DIGITS):
            out.append(f"--chains: at most {len(DIGITS)} (each chain ends in its own digit), got {self.max_chains}")
        if not 2 <= self.max_variables <= len(VARIABLES):
            out.append(f"--max-variables: must be in 2..{len(VARIABLES)}, got {self.max_variables}")
        elif self.max_variables < self.eval_difficulty[1] + 1 or self.max_variables < self.min_chains:
            out.append(f"--max-variables: {self.max_variables} leaves no room for a second chain beside "
                       f"{self.eval_difficulty[1]} hops or for {self.min_chains} chains")
        return out


def parse_range(option: str, text: str) -> tuple[int, int]:
    """'3' -> (3, 3); '1-4' -> (1, 4); anything else names the option."""
    parts = str(text).split("-")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise SyntheticError(f"{option}: expected N or LO-HI (e.g. 1-4), got {text!r}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise SyntheticError(f"{option}: expected N or LO-HI (e.g. 1-4), got {text!r}")


def _rng(seed: int, task: str, split: str) -> random.Random:
    digest = hashlib.sha256(f"rdhpc-synthetic/{seed}/{task}/{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "little"))


# ---- the task: variable chains ----------------------------------------------------------------

@dataclass(frozen=True)
class ChainProblem:
    """Chains of variables; chain j is names[j][0] -> names[j][1] -> ... -> names[j][-1] -> digits[j],
    so names[j][-1 - i] needs i + 1 hops."""

    chains: tuple[tuple[str, ...], ...]
    digits: tuple[str, ...]

    def values(self) -> dict[str, str]:
        """variable -> its right side (a variable or a digit)."""
        out = {}
        for names, digit in zip(self.chains, self.digits):
            for i, name in enumerate(names):
                out[name] = names[i + 1] if i + 1 < len(names) else digit
        return out

    def statements(self) -> str:
        """' b q; e7; h b.' sorted by variable: every symbol one token."""
        parts = [f" {name}{'' if value.isdigit() else ' '}{value}" for name, value in sorted(self.values().items())]
        return ";".join(parts) + "."

    def canonical(self) -> str:
        """The statement set, independent of the order of chains: two problems with the same
        canonical form ask the same questions."""
        return ";".join(f"{name}={value}" for name, value in sorted(self.values().items()))


def query_text(name: str) -> str:
    """The query's text; its answer follows it directly (`? h` -> `3`)."""
    return f"? {name}"


def chain_value(statements: str, name: str) -> tuple[str, int]:
    """(the digit, the hops) of `name`, by reading the statements text: the reference solver."""
    table = {}
    for part in statements.rstrip(".").split(";"):
        part = part.strip()
        table[part[0]] = part[1:].strip()
    hops, value = 0, name
    while not value.isdigit():
        value, hops = table[value], hops + 1
        if hops > len(table):
            raise ValueError(f"a cycle through {name!r}")
    return value, hops


def _problem(rng: random.Random, lengths: list[int]) -> ChainProblem:
    names = rng.sample(VARIABLES, sum(lengths))
    digits = rng.sample(DIGITS, len(lengths))
    chains, start = [], 0
    for length in lengths:
        chains.append(tuple(names[start:start + length]))
        start += length
    return ChainProblem(tuple(chains), tuple(digits))


def _fit(rng: random.Random, lengths: list[int], keep: int, max_variables: int) -> list[int]:
    """Drop chains other than the first `keep` (at random) until the variables fit; never below 2 chains."""
    while sum(lengths) > max_variables and len(lengths) > max(keep, 2):
        lengths.pop(rng.randrange(keep, len(lengths)))
    while sum(lengths) > max_variables:  # the kept chains alone are too long: shorten the others
        j = max(range(keep, len(lengths)), key=lambda i: lengths[i])
        lengths[j] -= 1
    return lengths


def chains_train_document(rng: random.Random, s: SyntheticSettings, exclude: set[str]) -> tuple[str, ChainProblem]:
    lo, hi = s.train_difficulty
    while True:
        num_chains = rng.randint(s.min_chains, s.max_chains)
        # each chain's head is asked: its length is its query's hops, uniform over the range
        lengths = _fit(rng, [rng.randint(lo, hi) for _ in range(num_chains)], 0, s.max_variables)
        problem = _problem(rng, lengths)
        if problem.canonical() in exclude:
            continue  # a held-out problem: never trained on
        order = list(range(len(lengths)))
        rng.shuffle(order)
        lines = [problem.statements()]
        for j in order:
            name = problem.chains[j][0]
            lines.append(f"{query_text(name)}{problem.digits[j]}")
        if s.recall:
            values = problem.values()
            names = sorted(values)
            rng.shuffle(names)
            lines += [f"! {name}{'' if values[name].isdigit() else ' '}{values[name]}" for name in names]
        return "\n".join(lines) + "\n", problem


def chains_eval_example(rng: random.Random, s: SyntheticSettings, k: int) -> tuple[dict, ChainProblem]:
    """The head of a chain of exactly k links, among chains of 1..k links."""
    num_chains = rng.randint(s.min_chains, s.max_chains)
    lengths = [k] + [rng.randint(1, k) for _ in range(num_chains - 1)]
    lengths = _fit(rng, lengths, 1, s.max_variables)
    problem = _problem(rng, lengths)
    prompt = problem.statements() + "\n" + query_text(problem.chains[0][0])
    return {"prompt": prompt, "target": problem.digits[0]}, problem


TASKS = {"chains": "variable chains to resolve, one hop per link (` b q; q3.` / `? b3`)"}


# ---- writing the files --------------------------------------------------------------------------

def _write_jsonl(path: Path, records) -> int:
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=True, sort_keys=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def generate(settings: SyntheticSettings, log=print) -> dict:
    """Write the task's files under settings.out; returns the contents of tasks.json."""
    problems = settings.problems()
    if problems:
        raise SyntheticError("; ".join(problems))
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise SyntheticError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    task = settings.task

    # Held-out first: their canonical forms are what training must never contain.
    held_out: set[str] = set()
    evals = []
    lo, hi = settings.eval_difficulty
    for k in range(lo, hi + 1):
        rng = _rng(settings.seed, task, f"eval-h{k}")
        examples, attempts = [], 0
        while len(examples) < settings.eval_examples:
            attempts += 1
            if attempts > 50 * settings.eval_examples + 1000:
                raise SyntheticError(f"--eval-examples {settings.eval_examples}: only {len(examples)} distinct "
                                     f"problems of {k} hops found; ask for fewer")
            example, problem = chains_eval_example(rng, settings, k)
            if problem.canonical() in held_out:
                continue  # distinct across and within difficulties
            held_out.add(problem.canonical())
            choices = sorted(problem.digits)
            examples.append((example, {"prompt": example["prompt"], "choices": choices,
                                       "answer": choices.index(example["target"])}))
        gen_name, mc_name = f"eval-{task}-h{k}.jsonl", f"eval-{task}-mc-h{k}.jsonl"
        _write_jsonl(out / gen_name, (g for g, _ in examples))
        _write_jsonl(out / mc_name, (m for _, m in examples))
        trained = settings.train_difficulty[0] <= k <= settings.train_difficulty[1]
        evals += [{"file": name, "kind": kind, "difficulty": k, "examples": len(examples), "in_training_range": trained}
                  for name, kind in ((gen_name, "generate"), (mc_name, "multiple_choice"))]

    rng = _rng(settings.seed, task, "train")
    chars = 0

    def train_records():
        nonlocal chars
        for _ in range(settings.train_docs):
            text, _ = chains_train_document(rng, settings, held_out)
            chars += len(text)
            yield {"text": text}

    num_docs = _write_jsonl(out / "train.jsonl", train_records())
    info = {"format_version": FORMAT_VERSION, "task": task, "description": TASKS[task],
            "difficulty": "hops: variable lookups from the queried variable to its digit",
            "train": {"file": "train.jsonl", "documents": num_docs, "characters": chars},
            "eval": evals,
            "settings": {**asdict(settings), "train_difficulty": list(settings.train_difficulty),
                         "eval_difficulty": list(settings.eval_difficulty)},
            "held_out_rule": "no training document has the statement set of any held-out example"}
    info["settings"].pop("out")
    tmp = out / "tasks.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "tasks.json")
    log(f"[prep] synthetic {task}: {num_docs} training documents ({chars / 1e6:.2f} M characters, hops "
        f"{settings.train_difficulty[0]}-{settings.train_difficulty[1]}) -> {out / 'train.jsonl'}; "
        f"{len(evals) // 2} held-out difficulties x {settings.eval_examples} examples (hops {lo}-{hi}) -> "
        f"{out}/eval-{task}-h*.jsonl (generation) and eval-{task}-mc-h*.jsonl (multiple choice); {out / 'tasks.json'}")
    return info
