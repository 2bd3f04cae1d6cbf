"""`rdhpc prep synthetic`: built-in reasoning tasks whose difficulty needs depth.

    rdhpc prep synthetic --task chains --out task/ --train-docs 20000 --eval-examples 200 \
        --train-difficulty 1-4 --eval-difficulty 1-8 --seed 0
    rdhpc prep synthetic --task compose --out task/ --train-docs 40000 --operations 3 --traced 0.3
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

The task `compose` (a digit through a word of operations; one step per operation). The operations
a, b, c, ... are fixed permutations of the ten digits without a fixed point, drawn from the seed and
never stated: the model learns their tables from the data. A problem is a start digit and a word of
k operations, applied left to right; a document is `lines` problems, one per line:

    ? 3 a c b=7          the answer only (the problem a held-out prompt asks: `? 3 a c b=`)
    ! 5 c0 b9            traced: every intermediate digit (a share `traced` of the lines)

k is drawn with weight 0.6^(k - LO) over the training range (the one-operation problems, which
teach the tables, most often). Every symbol is one token. Nothing in the prompt gives an
intermediate digit away, and the operations do not commute, so k operations are k dependent table
lookups (position i: the digit at i - 1 through operation i), which a core iteration can apply a
few of; the held-out files go to k beyond the training range. One problem in 8 (by a hash of its
text, the same for every seed) is held out: never in training, traced or not. Measured in
docs/synthetic_task.md: trained on words of 1-4 the demo's model solves them within one iteration
and gains little from depth; trained on 1-8 (the demo's setting) it learns to iterate, and accuracy
on held-out words rises with depth (with 3 operations after ~1,300-1,500 steps; with 2, the demo's,
by step 750 in three runs of five, by 1,250 in a 2,000-step run).

Seeded and exact: the same settings give the same bytes (Python's `random.Random`, seeded from a
SHA-256 of (seed, task, split), whose sequence Python keeps stable across versions).
"""

from __future__ import annotations

import hashlib
import itertools
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
    operations: int = 3
    """compose: how many operations (fixed permutations of the ten digits, drawn from the seed)."""
    traced: float = 0.3
    """compose: share of the training lines that show every intermediate digit (`! 3 a7 c2`)."""
    lines: int = 8
    """compose: problems per training document, one per line."""
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
            elif self.task == "compose" and hi > MAX_WORD:
                out.append(f"{option}: at most {MAX_WORD} operations per problem, got {hi}")
            elif self.task == "chains" and hi > self.max_variables:
                out.append(f"{option}: {hi} hops need {hi} variables, more than --max-variables {self.max_variables}")
        if self.task == "compose":
            if not 2 <= self.operations <= len(OPERATIONS):
                out.append(f"--operations: must be in 2..{len(OPERATIONS)}, got {self.operations}")
            if not 0 <= self.traced <= 1:
                out.append(f"--traced: a share in [0, 1], got {self.traced}")
            if self.lines < 1:
                out.append(f"--lines: must be >= 1, got {self.lines}")
            return out
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


def chains_eval_examples(s: SyntheticSettings, k: int, held_out: set[str]) -> list[tuple[dict, dict]]:
    """(generation record, multiple-choice record) x eval_examples, distinct across difficulties."""
    rng = _rng(s.seed, "chains", f"eval-h{k}")
    examples, attempts = [], 0
    while len(examples) < s.eval_examples:
        attempts += 1
        if attempts > 50 * s.eval_examples + 1000:
            raise SyntheticError(f"--eval-examples {s.eval_examples}: only {len(examples)} distinct "
                                 f"problems of {k} hops found; ask for fewer")
        example, problem = chains_eval_example(rng, s, k)
        if problem.canonical() in held_out:
            continue  # distinct across and within difficulties
        held_out.add(problem.canonical())
        choices = sorted(problem.digits)
        examples.append((example, {"prompt": example["prompt"], "choices": choices,
                                   "answer": choices.index(example["target"])}))
    return examples


# ---- the task: composing digit permutations --------------------------------------------------

OPERATIONS = "abcdefgh"
MAX_WORD = 64


def compose_operations(seed: int, count: int) -> dict[str, tuple[int, ...]]:
    """The task's operations: `count` fixed permutations of the ten digits without a fixed point
    (no operation leaves a digit as it is), drawn from the seed; learnt from the data, never stated."""
    rng = _rng(seed, "compose", "operations")
    out = {}
    for name in OPERATIONS[:count]:
        while True:
            table = list(range(10))
            rng.shuffle(table)
            if all(table[d] != d for d in range(10)):
                break
        out[name] = tuple(table)
    return out


def compose_apply(operations: dict[str, tuple[int, ...]], start: int, word: str) -> list[int]:
    """The digits after each operation of `word`, applied left to right."""
    out, digit = [], start
    for name in word:
        digit = operations[name][digit]
        out.append(digit)
    return out


def compose_held_out(start: int, word: str) -> bool:
    """One problem in 8, by a hash of its text, is held out: never trained on, whatever the seed."""
    return hashlib.sha256(f"{start} {word}".encode()).digest()[0] % 8 == 0


def compose_prompt(start: int, word: str) -> str:
    """`? 3 a c b=`: every symbol one token; the answer digit follows the `=`."""
    return f"? {start} " + " ".join(word) + "="


def compose_train_document(rng: random.Random, s: SyntheticSettings, operations) -> str:
    """`lines` problems, one per line; the word length k is drawn with weight 0.6^(k - LO) over the
    training range (short words, which teach each operation's table, most often), and a share
    `traced` of the lines shows every intermediate digit (`! 3 a7 c2 b9`)."""
    lo, hi = s.train_difficulty
    names = OPERATIONS[:s.operations]
    weights = [0.6 ** i for i in range(hi - lo + 1)]
    lines = []
    for _ in range(s.lines):
        while True:
            k = rng.choices(range(lo, hi + 1), weights=weights)[0]
            start, word = rng.randrange(10), "".join(rng.choice(names) for _ in range(k))
            if not compose_held_out(start, word):
                break
        digits = compose_apply(operations, start, word)
        if rng.random() < s.traced:
            lines.append(f"! {start}" + "".join(f" {name}{d}" for name, d in zip(word, digits)))
        else:
            lines.append(f"{compose_prompt(start, word)}{digits[-1]}")
    return "\n".join(lines) + "\n"


def compose_eval_examples(s: SyntheticSettings, k: int, operations) -> list[tuple[dict, dict]]:
    """Up to eval_examples distinct held-out problems of k operations (fewer where fewer exist:
    10 x operations^k problems, one in 8 held out)."""
    rng = _rng(s.seed, "compose", f"eval-h{k}")
    names = OPERATIONS[:s.operations]
    if 10 * len(names) ** k <= 50 * s.eval_examples:  # small: every held-out problem, in random order
        pool = [(start, "".join(w)) for start in range(10) for w in itertools.product(names, repeat=k)]
        pool = [p for p in pool if compose_held_out(*p)]
        rng.shuffle(pool)
        chosen = pool[:s.eval_examples]
    else:
        chosen, seen = [], set()
        while len(chosen) < s.eval_examples:
            problem = (rng.randrange(10), "".join(rng.choice(names) for _ in range(k)))
            if compose_held_out(*problem) and problem not in seen:
                seen.add(problem)
                chosen.append(problem)
    out = []
    for start, word in chosen:
        answer = compose_apply(operations, start, word)[-1]
        prompt = compose_prompt(start, word)
        out.append(({"prompt": prompt, "target": str(answer)},
                    {"prompt": prompt, "choices": list(DIGITS), "answer": answer}))
    return out


TASKS = {"chains": "variable chains to resolve, one hop per link (` b q; q3.` / `? b3`)",
         "compose": "a digit through a word of fixed digit permutations, one per operation (`? 3 a c b=` -> `7`)"}
HELD_OUT_RULE = {"chains": "no training document has the statement set of any held-out example",
                 "compose": "a problem is held out when the first byte of SHA-256(f'{start} {word}') is 0 mod 8; "
                            "training lines (traced or not) never have a held-out problem"}
DIFFICULTY = {"chains": "hops: variable lookups from the queried variable to its digit",
              "compose": "operations: permutations to apply in turn to the starting digit"}


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

    # Held-out first: (chains) their canonical forms are what training must never contain.
    held_out: set[str] = set()
    operations = compose_operations(settings.seed, settings.operations) if task == "compose" else None
    evals = []
    lo, hi = settings.eval_difficulty
    for k in range(lo, hi + 1):
        examples = (compose_eval_examples(settings, k, operations) if task == "compose"
                    else chains_eval_examples(settings, k, held_out))
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
            text = (compose_train_document(rng, settings, operations) if task == "compose"
                    else chains_train_document(rng, settings, held_out)[0])
            chars += len(text)
            yield {"text": text}

    num_docs = _write_jsonl(out / "train.jsonl", train_records())
    info = {"format_version": FORMAT_VERSION, "task": task, "description": TASKS[task],
            "difficulty": DIFFICULTY[task],
            "train": {"file": "train.jsonl", "documents": num_docs, "characters": chars},
            "eval": evals,
            "settings": {**asdict(settings), "train_difficulty": list(settings.train_difficulty),
                         "eval_difficulty": list(settings.eval_difficulty)},
            "held_out_rule": HELD_OUT_RULE[task]}
    if operations:
        info["operations"] = {name: "".join(map(str, table)) for name, table in operations.items()}
    info["settings"].pop("out")
    tmp = out / "tasks.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "tasks.json")
    unit = DIFFICULTY[task].split(":")[0]
    counts = sorted({e["examples"] for e in evals})
    log(f"[prep] synthetic {task}: {num_docs} training documents ({chars / 1e6:.2f} M characters, {unit} "
        f"{settings.train_difficulty[0]}-{settings.train_difficulty[1]}) -> {out / 'train.jsonl'}; "
        f"{len(evals) // 2} held-out difficulties x {'-'.join(map(str, counts[::max(1, len(counts) - 1)]))} examples "
        f"({unit} {lo}-{hi}) -> "
        f"{out}/eval-{task}-h*.jsonl (generation) and eval-{task}-mc-h*.jsonl (multiple choice); {out / 'tasks.json'}")
    return info
