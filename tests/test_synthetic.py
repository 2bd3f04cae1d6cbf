"""`rdhpc prep synthetic` (data_prep/synthetic.py): exact, seeded, held-out apart from training,
correct answers (re-solved here by a solver of its own), the evaluator's file formats, the
command's errors, and the training documents through `rdhpc prep shards`."""

import hashlib
import json
from pathlib import Path

import pytest

from data_prep.synthetic import SyntheticSettings, generate
from rdhpc.cli import main as rdhpc_main

SMALL = dict(task="chains", train_docs=400, eval_examples=30, train_difficulty=(1, 3), eval_difficulty=(1, 6))


def make(tmp: Path, name: str, **changes) -> Path:
    out = tmp / name
    generate(SyntheticSettings(out=str(out), **{**SMALL, **changes}), log=lambda *a: None)
    return out


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def solve(statements: str, name: str) -> tuple[str, int]:
    """This test's own solver: a table of the statements, followed until a digit (counting hops)."""
    table = {}
    assert statements.endswith(".")
    for statement in statements[:-1].split(";"):
        assert statement[0] == " " and statement[1].isalpha()
        left, right = statement[1], statement[2:].strip()
        assert left not in table, f"{left} assigned twice"
        table[left] = right
    seen, value = [], name
    while not value.isdigit():
        assert value not in seen, "cycle"
        seen.append(value)
        value = table[value]
    return value, len(seen)


def parse_document(text: str) -> tuple[str, list[tuple[str, str]]]:
    first, *queries = text.rstrip("\n").split("\n")
    out = []
    for q in queries:
        if q.startswith("! "):  # a direct lookup: checked against the statement itself
            assert q[2:].replace(" ", "") in canonical(first), q
            continue
        assert q.startswith("? ") and len(q) == 4
        out.append((q[2], q[3]))
    return first, out


def canonical(statements: str) -> frozenset:
    return frozenset(s.replace(" ", "") for s in statements.rstrip(".").split(";"))  # {'hb', 'q3', ...}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make(tmp_path_factory.mktemp("synthetic"), "a")


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, task):
    again = make(tmp_path, "again")
    assert digests(again) == digests(task)
    other = digests(make(tmp_path, "other", seed=1))
    mine = digests(task)
    assert all(other[name] != mine[name] for name in mine if name != "tasks.json")


def test_answers_are_right_and_hops_as_labelled(task):
    info = json.loads((task / "tasks.json").read_text())
    hops_seen = set()
    for record in lines(task / "train.jsonl"):
        statements, queries = parse_document(record["text"])
        assert 2 <= len(queries)
        digits = []
        for name, answer in queries:
            value, hops = solve(statements, name)
            assert value == answer and 1 <= hops <= 3
            hops_seen.add(hops)
            digits.append(value)
        assert len(set(digits)) == len(digits), "each chain ends in its own digit"
    assert hops_seen == {1, 2, 3}
    for entry in info["eval"]:
        examples = lines(task / entry["file"])
        assert len(examples) == entry["examples"] == 30
        for ex in examples:
            statements, query = ex["prompt"].split("\n")
            assert query.startswith("? ") and len(query) == 3
            value, hops = solve(statements, query[2])
            assert hops == entry["difficulty"]
            if entry["kind"] == "generate":
                assert set(ex) == {"prompt", "target"} and ex["target"] == value
            else:
                assert set(ex) == {"prompt", "choices", "answer"}
                assert ex["choices"][ex["answer"]] == value and len(set(ex["choices"])) == len(ex["choices"]) >= 2


def test_held_out_never_in_training(task):
    train = set()
    for record in lines(task / "train.jsonl"):
        train.add(canonical(parse_document(record["text"])[0]))
    held = [canonical(ex["prompt"].split("\n")[0])
            for path in sorted(task.glob("eval-chains-h*.jsonl")) for ex in lines(path)]
    assert len(set(held)) == len(held), "held-out examples repeat"
    assert not train & set(held)


def test_a_training_draw_of_a_held_out_problem_is_drawn_again():
    import random

    from data_prep.synthetic import chains_train_document

    settings = SyntheticSettings(**SMALL)
    _, first = chains_train_document(random.Random(7), settings, exclude=set())
    _, again = chains_train_document(random.Random(7), settings, exclude=set())
    _, other = chains_train_document(random.Random(7), settings, exclude={first.canonical()})
    assert again == first and other.canonical() != first.canonical()


def test_tasks_json_lists_files_with_kind_difficulty_and_settings(task):
    info = json.loads((task / "tasks.json").read_text())
    files = {(e["file"], e["kind"], e["difficulty"]) for e in info["eval"]}
    assert files == {(f"eval-chains-h{k}.jsonl", "generate", k) for k in range(1, 7)} | \
                    {(f"eval-chains-mc-h{k}.jsonl", "multiple_choice", k) for k in range(1, 7)}
    assert all((task / f).exists() for f, _, _ in files)
    assert info["settings"]["seed"] == 0 and info["settings"]["train_difficulty"] == [1, 3]
    assert info["train"] == {"file": "train.jsonl", "documents": 400,
                             "characters": sum(len(r["text"]) for r in lines(task / "train.jsonl"))}
    assert [e["in_training_range"] for e in info["eval"] if e["kind"] == "generate"] == [True] * 3 + [False] * 3


def test_every_symbol_is_one_pre_token(task):
    """Under the tokenizer's split pattern a variable (' x'), a digit and each punctuation mark stand
    alone, so no BPE merge can join two symbols; a prompt ends where its target's tokens begin."""
    from tokenizers import Regex, pre_tokenizers

    from rdhpc.data.tokenizer import SPLIT_PATTERN

    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    allowed = {f" {c}" for c in "abcdefghijklmnopqrstuvwxyz"} | set("0123456789") | {";", ".\n", "?", "!", "\n"}
    for record in lines(task / "train.jsonl")[:50]:
        pieces = [p for p, _ in split.pre_tokenize_str(record["text"])]
        assert set(pieces) <= allowed, set(pieces) - allowed
    for ex in lines(task / "eval-chains-h6.jsonl")[:10]:
        whole = [p for p, _ in split.pre_tokenize_str(ex["prompt"] + ex["target"] + "\n")]
        parts = [p for p, _ in split.pre_tokenize_str(ex["prompt"])] + [ex["target"], "\n"]
        assert whole == parts


@pytest.mark.parametrize("argv, option", [
    (["--train-difficulty", "4-1"], "--train-difficulty"),
    (["--eval-difficulty", "one"], "--eval-difficulty"),
    (["--eval-difficulty", "1-30"], "--eval-difficulty"),
    (["--task", "sudoku"], "--task"),
    (["--train-docs", "0"], "--train-docs"),
    (["--eval-examples", "-1"], "--eval-examples"),
    (["--chains", "1-3"], "--chains"),
    (["--task", "compose", "--operations", "1"], "--operations"),
    (["--task", "compose", "--traced", "1.5"], "--traced"),
    (["--task", "compose", "--lines", "0"], "--lines"),
    (["--task", "compose", "--eval-difficulty", "1-65"], "--eval-difficulty"),
])
def test_bad_options_exit_2_naming_the_option(tmp_path, capsys, argv, option):
    status = rdhpc_main(["prep", "synthetic", "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err
    assert status == 2 and option in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_command_writes_what_the_function_writes(tmp_path, task):
    args = ["prep", "synthetic", "--out", str(tmp_path / "cli"), "--train-docs", "400", "--eval-examples", "30",
            "--train-difficulty", "1-3", "--eval-difficulty", "1-6", "--seed", "0"]
    assert rdhpc_main(args) == 0
    assert digests(tmp_path / "cli") == digests(task)


def test_training_documents_go_through_prep_shards(tmp_path, task):
    from data_prep.shards import ShardSettings, run_shards
    from data_prep.tokenizer_train import train_tokenizer
    from rdhpc.data.format import verify_folder

    tokenizer = tmp_path / "tok.json"
    train_tokenizer([str(task / "train.jsonl")], 300, tokenizer, log=lambda *a: None)
    run_shards(ShardSettings(inputs=[f"task={task / 'train.jsonl'}"], tokenizer=str(tokenizer), seq_len=64,
                             out=str(tmp_path / "shards"), pack="drop", val_fraction=0.05, seed=0),
               log=lambda *a: None)
    manifest, problems = verify_folder(tmp_path / "shards")
    assert not problems
    assert manifest.totals("train")["rows"] > 0 and manifest.totals("val")["rows"] > 0


def test_no_recall_leaves_out_the_direct_lookups_and_nothing_else(tmp_path, task):
    plain = make(tmp_path, "plain", recall=False)
    with_recall = [r["text"] for r in lines(task / "train.jsonl")]
    without = [r["text"] for r in lines(plain / "train.jsonl")]
    assert not any("!" in t for t in without) and all("\n! " in t for t in with_recall)
    # the recall lines are drawn after the rest of a document, so held-out files are unchanged
    assert all((plain / f).read_bytes() == (task / f).read_bytes() for f in ["eval-chains-h4.jsonl"])
    assert [t.split("\n!")[0] for t in with_recall][0] == without[0].rstrip("\n")


# ---- compose: a digit through a word of fixed digit permutations ----------------------------------

COMPOSE = dict(task="compose", train_docs=300, eval_examples=40, train_difficulty=(1, 4), eval_difficulty=(1, 7))


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    return make(tmp_path_factory.mktemp("compose"), "c", **COMPOSE)


def compose_solver(folder: Path):
    """This test's own solver, from the operations tasks.json states (digit -> digit tables)."""
    tables = {name: [int(c) for c in table] for name, table in json.loads((folder / "tasks.json").read_text())
              ["operations"].items()}
    assert all(sorted(t) == list(range(10)) and all(t[d] != d for d in range(10)) for t in tables.values())

    def run(start: int, word: str) -> list[int]:
        out = [start]
        for name in word:
            out.append(tables[name][out[-1]])
        return out[1:]
    return run


def is_held_out(start: int, word: str) -> bool:
    return hashlib.sha256(f"{start} {word}".encode()).digest()[0] % 8 == 0


def test_compose_same_seed_same_bytes_other_seed_other_operations(tmp_path, compose):
    assert digests(make(tmp_path, "again", **COMPOSE)) == digests(compose)
    other = make(tmp_path, "other", **{**COMPOSE, "seed": 1})
    assert json.loads((other / "tasks.json").read_text())["operations"] != \
        json.loads((compose / "tasks.json").read_text())["operations"]


def test_compose_answers_traces_and_held_out_problems(compose):
    solve = compose_solver(compose)
    info = json.loads((compose / "tasks.json").read_text())
    held, lengths, traced = set(), [], 0
    for entry in info["eval"]:
        k = entry["difficulty"]
        for ex in lines(compose / entry["file"]):
            assert ex["prompt"].startswith("? ") and ex["prompt"].endswith("=")
            start, *word = ex["prompt"][2:-1].split(" ")
            word = "".join(word)
            assert len(word) == k and is_held_out(int(start), word)
            answer = solve(int(start), word)[-1]
            if entry["kind"] == "generate":
                assert ex["target"] == str(answer)
                held.add((int(start), word))
            else:
                assert ex["choices"][ex["answer"]] == str(answer)
        # every held-out problem exists only 10 x 3^k / 8 times or so: fewer examples where fewer exist
        assert entry["examples"] == min(40, sum(is_held_out(s, w) for s in range(10) for w in words(k)))
    for record in lines(compose / "train.jsonl"):
        problems = record["text"].rstrip("\n").split("\n")
        assert len(problems) == 8
        for problem in problems:
            if problem.startswith("! "):  # a traced line: every intermediate digit
                start, *steps = problem[2:].split(" ")
                word, digits = "".join(s[0] for s in steps), [int(s[1:]) for s in steps]
                assert digits == solve(int(start), word)
                traced += 1
            else:
                prompt, answer = problem.split("=")
                start, *word = prompt[2:].split(" ")
                word = "".join(word)
                assert int(answer) == solve(int(start), word)[-1]
            assert not is_held_out(int(start), word) and (int(start), word) not in held
            lengths.append(len(word))
    assert set(lengths) == {1, 2, 3, 4} and lengths.count(1) > lengths.count(4)  # short words most often
    assert 0.2 < traced / len(lengths) < 0.4  # --traced 0.3


def words(k: int) -> list[str]:
    import itertools

    return ["".join(w) for w in itertools.product("abc", repeat=k)]


def test_compose_every_symbol_is_one_pre_token(compose):
    from tokenizers import Regex, pre_tokenizers

    from rdhpc.data.tokenizer import SPLIT_PATTERN

    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    allowed = {" a", " b", " c", " ", "=", "?", "!", "\n"} | set("0123456789")
    for record in lines(compose / "train.jsonl")[:50]:
        pieces = [p for p, _ in split.pre_tokenize_str(record["text"])]
        assert set(pieces) <= allowed, set(pieces) - allowed
    for ex in lines(compose / "eval-compose-h7.jsonl")[:10]:
        whole = [p for p, _ in split.pre_tokenize_str(ex["prompt"] + ex["target"] + "\n")]
        assert whole == [p for p, _ in split.pre_tokenize_str(ex["prompt"])] + [ex["target"], "\n"]
