"""Data preparation: tokenizer, packing rules, exactness, determinism, restarts, bad input, MPI."""

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.packing import pack, unpack_carry
from data_prep.shards import ShardSettings, run_shards
from data_prep.tokenizer_train import train_tokenizer
from rdhpc.data.format import ShardError, ShardReader, open_shard, read_manifest, verify_folder
from rdhpc.data.tokenizer import TextTokenizer

TRICKY = [
    "",
    "plain ascii text",
    "日本語のテキストと中文字符，한국어도 있습니다。",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 and flags 🇯🇵 and skin tones 👍🏽",
    "control \x00\x01\x07\x1b[31m red \x7f and tabs\t\tend",
    "windows\r\nline\r\nendings\r\n",
    "lone \r carriage return and form feed \x0c",
    "special strings stay text: <|begin_text|> <|end_text|> <|pad|> <|end_turn|>",
    "digits 1234567890 and 3.14159",
    "   leading and trailing spaces   ",
    "\n\n\n",
    "combining e\u0301 vs \u00e9, zero width \u200b joiner, RTL \u202e text",
]


def python_sources(num_files):
    """Real text already on the machine: the standard library's modules (under 60 kB each)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in sorted(root.glob("*.py")) if p.stat().st_size < 60_000]
    assert len(paths) >= num_files
    return [p.read_text(encoding="utf-8") for p in paths[:num_files]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text in every supported format, with malformed records in known places."""
    root = tmp_path_factory.mktemp("corpus")
    texts = python_sources(130)
    (root / "txt").mkdir()
    for i, text in enumerate(texts[:20]):
        (root / "txt" / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for text in texts[20:60] + TRICKY:
            f.write(json.dumps({"text": text}) + "\n")
        f.write("{not json\n")  # line 40 + len(TRICKY) + 1
        f.write(json.dumps({"body": "no text field"}) + "\n")
    with gzip.open(root / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in texts[60:80]:
            f.write(json.dumps({"text": text}) + "\n")
    import zstandard

    with open(root / "c.jsonl.zst", "wb") as raw:
        with zstandard.ZstdCompressor().stream_writer(raw) as f:
            for text in texts[80:100]:
                f.write((json.dumps({"text": text}) + "\n").encode())
    pq.write_table(pa.table({"text": texts[100:130]}), root / "d.parquet", row_group_size=7)
    with open(root / "bad.jsonl", "wb") as f:
        f.write(json.dumps({"text": "fine"}).encode() + b"\n")
        f.write(b'{"text": "bad byte \xff here"}\n')
        f.write(json.dumps({"text": 5}).encode() + b"\n")
        f.write(b'{"text": "lone surrogate \\ud800"}\n')
        f.write(b'{"text": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    return root, texts


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory):
    root, _ = corpus
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([str(root)], vocab_size=1024, out=path, sample_bytes=3_000_000, log=lambda *a: None)
    return path


def prep(tmp_path, corpus_root, tokenizer_path, name="out", **kwargs):
    settings = ShardSettings(inputs=kwargs.pop("inputs", [str(corpus_root)]), tokenizer=str(tokenizer_path),
                             seq_len=kwargs.pop("seq_len", 128), out=str(tmp_path / name),
                             rows_per_shard=kwargs.pop("rows_per_shard", 64), **kwargs)
    return run_shards(settings, log=lambda *a: None)


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.arrow"))}


# ---- tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_has_the_papers_special_layout(tokenizer_path):
    tok = TextTokenizer(tokenizer_path)
    assert tok.vocab_size == 1024
    assert (tok.bos_id, tok.eos_id, tok.end_turn_id, tok.pad_id) == (1024 - 32, 1024 - 31, 1024 - 28, 1024 - 27)
    # 65536 - 32 = 65504 is BOS in the released tokenizer: the same offsets
    digits = tok.encode("31415926")
    assert len(digits) == 8 and tok.decode(digits) == "31415926"
    vocab = json.loads(Path(tokenizer_path).read_text())["model"]["vocab"]
    assert max(len(token) for token in vocab) <= 32


def test_every_text_round_trips_through_the_tokenizer(tokenizer_path):
    tok = TextTokenizer(tokenizer_path)
    for text in TRICKY:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not set(ids.tolist()) & set(range(tok.bos_id, tok.vocab_size)), "special token inside a document"


def test_fast_encoder_gives_the_reference_ids(corpus, tokenizer_path):
    """gigatoken is used only because it is exact: the same ids as HF tokenizers on varied text."""
    _, texts = corpus
    fast, reference = TextTokenizer(tokenizer_path), TextTokenizer(tokenizer_path, backend="hf")
    assert fast.backend == "gigatoken", fast.fallback_reason
    rng = random.Random(1)
    mixed = ["".join(rng.choice(TRICKY + texts[:5])[rng.randint(0, 40):][:rng.randint(0, 300)] for _ in range(5))
             for _ in range(300)]
    docs = texts + TRICKY + mixed + [" " * 1000 + "1" * 500, "x" * 100_000, "\r\n" * 500]
    for a, b in zip(fast.encode_batch(docs), reference.encode_batch(docs)):
        assert np.array_equal(a, b)


def test_the_encoder_check_is_cached_and_a_bad_cache_is_ignored(tmp_path, monkeypatch, corpus, tokenizer_path):
    """The first load checks gigatoken against HF and stores the outcome; later loads take it from
    the cache without loading HF (only decoding does), and give the same ids and special ids."""
    _, texts = corpus
    monkeypatch.setenv("RDHPC_CACHE_DIR", str(tmp_path / "cache"))
    first = TextTokenizer(tokenizer_path)
    assert first.backend == "gigatoken" and first._hf_tokenizer is not None
    entries = sorted((tmp_path / "cache" / "encoder-checks").iterdir())
    assert len(entries) == 2  # the outcome and the copy of the JSON without added tokens
    second = TextTokenizer(tokenizer_path)
    assert second.backend == "gigatoken" and second._hf_tokenizer is None
    assert (second.vocab_size, second.bos_id, second.eos_id, second.pad_id, second.end_turn_id) == \
        (first.vocab_size, first.bos_id, first.eos_id, first.pad_id, first.end_turn_id)
    reference = TextTokenizer(tokenizer_path, backend="hf")
    docs = texts[:50] + TRICKY
    for a, b in zip(second.encode_batch(docs), reference.encode_batch(docs)):
        assert np.array_equal(a, b)
    assert second.decode(second.encode(TRICKY[0])) == TRICKY[0] and second._hf_tokenizer is not None
    # A damaged entry is not trusted: the check runs again and rewrites it.
    record = next(p for p in entries if not p.name.endswith(".tokenizer.json"))
    record.write_text("{not json")
    again = TextTokenizer(tokenizer_path)
    assert again.backend == "gigatoken" and again._hf_tokenizer is not None
    assert json.loads(record.read_text())["fast_ok"] is True
    # Another tokenizer file (other bytes) never reuses the entry.
    other = tmp_path / "other.json"
    other.write_text(Path(tokenizer_path).read_text() + "\n")  # the same tokenizer, other bytes
    TextTokenizer(other)
    assert len(list((tmp_path / "cache" / "encoder-checks").iterdir())) == 4


def test_bad_tokenizer_files(tmp_path):
    from rdhpc.data.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="not found"):
        TextTokenizer(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TokenizerError, match="bad.json"):
        TextTokenizer(tmp_path / "bad.json")


# ---- packing rules ------------------------------------------------------------------------------

def test_drop_packing_rule():
    docs = [np.arange(n, dtype=np.uint32) + 10 for n in (3, 9, 1, 0, 20, 2, 2)]
    rows, counts = pack(docs, row_len=8, mode="drop", bos=1, eos=2, pad=0)
    # doc0 (5 tokens) + doc1 (11) -> row cut at 8, rest dropped; doc2 (3) + doc3 (2) + doc4 (22) -> row;
    # doc5 (4) + doc6 (4) -> exactly 8 -> row
    assert rows.shape == (3, 8)
    assert np.all(rows[:, 0] == 1)
    assert rows[0].tolist() == [1, 10, 11, 12, 2, 1, 10, 11]
    assert rows[2].tolist() == [1, 10, 11, 2, 1, 10, 11, 2]
    assert counts["dropped_tokens"] == sum(len(d) + 2 for d in docs) - 24


def test_carry_packing_round_trips_every_document():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 100, size=n).astype(np.uint32) for n in rng.integers(0, 40, size=200)]
    rows, counts = pack(docs, row_len=16, mode="carry", bos=1, eos=2, pad=0)
    back = unpack_carry(rows, bos=1, eos=2, pad=0)
    assert len(back) == len(docs) and all(np.array_equal(a, b) for a, b in zip(back, docs))
    assert counts["pad_tokens"] < 16 and counts["documents"] == len(docs)


def test_carry_shards_give_back_every_document_exactly(tmp_path, corpus, tokenizer_path):
    root, texts = corpus
    # a document of tens of MB: real text, repeated, with a random multilingual tail
    rng = np.random.default_rng(0)
    tail = "".join(rng.choice(list("abcdefgh ij\n\r\t日本語🙂👍🏽\x00"), size=100_000))
    long_doc = "".join(texts) * 10 + tail
    assert len(long_doc.encode()) > 20_000_000
    with open(tmp_path / "tricky.jsonl", "w", encoding="utf-8") as f:
        for text in TRICKY + [long_doc]:
            f.write(json.dumps({"text": text}) + "\n")
    out = prep(tmp_path, root, tokenizer_path, inputs=[str(tmp_path / "tricky.jsonl"), str(root / "txt")],
               pack="carry", val_fraction=0.0)
    manifest = read_manifest(out)
    tok = TextTokenizer(tokenizer_path)
    decoded = []
    for entry in manifest.shards:
        rows = open_shard(out, entry, manifest).all_rows()
        decoded += [tok.decode(d) for d in unpack_carry(rows, tok.bos_id, tok.eos_id, tok.pad_id)]
    originals = TRICKY + [long_doc] + [p.read_text(encoding="utf-8") for p in sorted((root / "txt").iterdir())]
    assert sorted(decoded) == sorted(originals)
    assert manifest.totals("train")["documents"] == len(originals)


def test_drop_shards_start_every_row_with_bos(tmp_path, corpus, tokenizer_path):
    root, _ = corpus
    out = prep(tmp_path, root, tokenizer_path, pack="drop")
    manifest = read_manifest(out)
    for entry in manifest.shards:
        rows = open_shard(out, entry, manifest).all_rows()
        assert np.all(rows[:, 0] == manifest.tokenizer.bos_id)
        assert entry.pad_tokens == 0
    assert manifest.report["dropped_tokens"] > 0


def test_keep_all_packing_rule():
    """A keep-all document that fills the buffer has every full row cut, the remainder carried on
    (the next row may start inside it); an ordinary one keeps one row and drops the rest."""
    docs = [np.arange(n, dtype=np.uint32) + 10 for n in (14, 3, 9, 2)]  # streams of 16, 5, 11, 4 tokens
    rows, counts = pack(docs, row_len=8, mode="drop", bos=1, eos=2, pad=0,
                        keep_all=np.array([True, False, False, False]))
    # doc0 keep-all: rows [0, 8) and [8, 16) of its stream, nothing left; doc1 + doc2 (16): one row, rest dropped
    assert rows.tolist() == [[1, 10, 11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22, 23, 2],
                             [1, 10, 11, 12, 2, 1, 10, 11]]
    assert counts["documents"] == 3 and counts["dropped_tokens"] == 36 - 24
    rows, counts = pack(docs, row_len=8, mode="drop", bos=1, eos=2, pad=0, keep_all=np.array([False, True, True, False]))
    # doc0 alone fills a row: cut, the rest dropped; doc1 + doc2 (16) keep-all: two rows, the 2nd inside doc2
    assert rows.tolist()[1:] == [[1, 10, 11, 12, 2, 1, 10, 11], [12, 13, 14, 15, 16, 17, 18, 2]]
    assert rows[2, 0] != 1 and counts["documents"] == 3


def test_keep_all_sources_in_prep_shards(tmp_path, corpus, tokenizer_path):
    """--keep-all NAME: that source's tokens are all kept under drop packing, deterministically
    (byte-identical for any number of workers and pieces), named in the manifest's settings;
    verify accepts rows that start inside a document; an unknown name is refused."""
    root, _ = corpus
    inputs = [f"book={root / 'txt'}", f"web={root / 'a.jsonl'}"]
    plain = prep(tmp_path, None, tokenizer_path, name="plain", inputs=inputs, val_fraction=0.0)
    one = prep(tmp_path, None, tokenizer_path, name="keep1", inputs=inputs, val_fraction=0.0, keep_all=["book"],
               workers=1, rows_per_shard=16)
    three = prep(tmp_path, None, tokenizer_path, name="keep3", inputs=inputs, val_fraction=0.0, keep_all=["book"],
                 workers=3, piece_bytes=50_000, rows_per_shard=16)
    assert shard_bytes(one) == shard_bytes(three)
    manifest, problems = verify_folder(one)
    assert problems == [] and manifest.settings["keep_all"] == ["book"]
    assert "keep_all" not in read_manifest(plain).settings  # folders made without it keep their fingerprint
    kept, dropped = manifest.totals("train")["real_tokens"], manifest.report["dropped_tokens"]
    assert kept > read_manifest(plain).totals("train")["real_tokens"]
    assert dropped < read_manifest(plain).report["dropped_tokens"]
    # every token of the book source: at most a row's worth per shard is left in its last buffer
    book = manifest.report["sources"]["book"]["train_tokens_with_copies"]
    web_rows_kept = read_manifest(plain).totals("train")["real_tokens"]
    assert kept >= book - len(manifest.split_shards("train")) * 129 and kept <= book + web_rows_kept
    with pytest.raises(Exception, match="--keep-all nosuch: no input source of that name"):
        prep(tmp_path, None, tokenizer_path, name="bad", inputs=inputs, keep_all=["nosuch"])
    with pytest.raises(Exception, match="--keep-all: applies to --pack drop"):
        prep(tmp_path, None, tokenizer_path, name="bad2", inputs=inputs, keep_all=["book"], pack="carry")


# ---- determinism and restarts -------------------------------------------------------------------

def test_output_is_identical_for_any_number_of_workers_and_pieces(tmp_path, corpus, tokenizer_path):
    root, _ = corpus
    one = prep(tmp_path, root, tokenizer_path, name="w1", workers=1, piece_bytes=64 << 20, rows_per_shard=16)
    # many pieces, one shard per pack task, and a node-local folder for the intermediate files
    local = tmp_path / "node-local"
    three = prep(tmp_path, root, tokenizer_path, name="w3", workers=3, piece_bytes=50_000, rows_per_shard=16,
                 pack_task_bytes=1, local_tmp=str(local))
    assert shard_bytes(one) == shard_bytes(three)
    assert len(shard_bytes(one)) > 2
    assert read_manifest(one).shards == read_manifest(three).shards
    hosts = read_manifest(three).report["hosts"]
    assert [h["local_tmp"] for h in hosts.values()] == [str(local / "rdhpc-prep")]
    assert sum(h["pieces"] for h in hosts.values()) > 3 and local.is_dir() and not any(local.rglob("*.*"))
    other_seed = prep(tmp_path, root, tokenizer_path, name="seed1", seed=1, rows_per_shard=16)
    assert shard_bytes(other_seed) != shard_bytes(one)


def test_a_shard_holds_one_range_of_keys_and_a_resume_keeps_only_whole_files(tmp_path):
    """Shard g of G holds the keys in [g 2^64 / G, (g + 1) 2^64 / G): every range is contiguous in a
    key-sorted piece. Pieces and shards are not fsynced one by one, so a resume after a crash keeps
    only the files of the recorded size (a short one is made again)."""
    from data_prep.shards import PieceFile, _finished_shards, _piece_complete, _write_piece, shard_bounds

    for num_shards in (1, 3, 7, 1000):
        bounds = shard_bounds(num_shards)
        assert bounds[0] == 0 and bounds[-1] == 1 << 64 and len(bounds) == num_shards + 1
        assert all(b > a for a, b in zip(bounds, bounds[1:]))
    values = np.arange(100, dtype=np.uint16)
    lengths, starts = np.array([10, 20, 70]), np.array([0, 10, 30])
    path = tmp_path / "piece-000000.bin"
    _write_piece(path, values, lengths, starts, {"train": (np.array([5, 9, 9], dtype=np.uint64), np.array([2, 0, 0])),
                                                 "val": (np.array([7], dtype=np.uint64), np.array([1]))})
    keys, offsets, tokens = PieceFile(path, "uint16").split("train")
    assert keys.tolist() == [5, 9, 9] and offsets.tolist() == [0, 70, 80, 90]  # a copied document twice
    assert tokens[:70].tolist() == list(range(30, 100)) and tokens[70:].tolist() == list(range(10)) * 2
    assert PieceFile(path, "uint16").split("val")[2].tolist() == list(range(10, 30))
    assert _piece_complete(path, "uint16") and not _piece_complete(path, "uint32")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 2)
    assert not _piece_complete(path, "uint16") and not _piece_complete(tmp_path / "nothing.bin", "uint16")
    (tmp_path / ".work" / "shards").mkdir(parents=True)
    (tmp_path / "train-00000.arrow").write_bytes(b"x" * 10)
    (tmp_path / "train-00001.arrow").write_bytes(b"x" * 4)  # short: a crash before its pages reached the disk
    (tmp_path / ".work" / "shards" / "train-00000-00002.json").write_text(json.dumps(
        [{"file": "train-00000.arrow", "bytes": 10}, {"file": "train-00001.arrow", "bytes": 10}]))
    assert list(_finished_shards(tmp_path)) == ["train-00000.arrow"]


def test_pieces_know_their_size_for_largest_first_scheduling(tmp_path):
    from data_prep.sources import parse_sources, piece_size, plan_pieces

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": "x" * 40}) + "\n" for _ in range(5)))  # 265 bytes
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"text": "y"}) + "\n")
    pieces = plan_pieces(parse_sources([str(tmp_path)], []), piece_bytes=100)
    sizes = {(Path(p.file).name, p.start): piece_size(p) for p in pieces}
    assert sizes == {("a.jsonl", 0): 100, ("a.jsonl", 100): 100, ("a.jsonl", 200): 65,
                     ("b.jsonl.gz", 0): (tmp_path / "b.jsonl.gz").stat().st_size}


def test_rerun_does_nothing_and_other_settings_are_refused(tmp_path, corpus, tokenizer_path):
    root, _ = corpus
    out = prep(tmp_path, root, tokenizer_path)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    messages = []
    run_shards(ShardSettings(inputs=[str(root)], tokenizer=str(tokenizer_path), seq_len=128, out=str(out),
                             rows_per_shard=64), log=messages.append)
    assert "nothing to do" in messages[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    from data_prep.shards import PrepError

    with pytest.raises(PrepError, match="seq_len"):
        prep(tmp_path, root, tokenizer_path, seq_len=64)


def run_cli_prep(args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "rdhpc.cli", "prep", "shards", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_kill_and_rerun_gives_identical_output(tmp_path, corpus, tokenizer_path):
    root, _ = corpus
    reference = prep(tmp_path, root, tokenizer_path, name="reference", piece_bytes=20_000)
    out = tmp_path / "killed"
    # one shard per pack task (each reads every piece): a pack stage long enough to be killed in it,
    # and the same bytes as the reference's few tasks
    args = ["--input", str(root), "--tokenizer", str(tokenizer_path), "--seq-len", "128", "--out", str(out),
            "--rows-per-shard", "64", "--piece-bytes", "20000", "--pack-task-bytes", "1"]
    # kill -9 once during tokenization and once during packing, then finish
    for stage, pattern, at_least in (("tokenize", ".work/tok/*.bin", 3), ("pack", "*.arrow", 1)):
        process = run_cli_prep(args)
        deadline = time.monotonic() + 120
        while len(list(out.glob(pattern))) < at_least and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.poll() is None, f"finished before it could be killed during {stage}"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert not (out / "manifest.json").exists()
    finished = run_cli_prep(args)
    stdout, stderr = finished.communicate(timeout=300)
    assert finished.returncode == 0, stderr
    assert "resuming" in stdout
    assert shard_bytes(out) == shard_bytes(reference)
    assert verify_folder(out)[1] == []
    assert not (out / ".work").exists()


# ---- mixture weights ----------------------------------------------------------------------------

def test_mixture_weights_set_the_token_share(tmp_path, tokenizer_path):
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    for name in ("a", "b"):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for _ in range(3000):
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))}) + "\n")
    out = prep(tmp_path, None, tokenizer_path, inputs=[f"a={tmp_path / 'a.jsonl'}", f"b={tmp_path / 'b.jsonl'}"],
               weights=["a=2.5"], pack="carry", val_fraction=0.0)
    sources = read_manifest(out).report["sources"]
    raw_a, raw_b = sources["a"]["tokens"], sources["b"]["tokens"]
    share_a = sources["a"]["train_tokens_with_copies"] / (sources["a"]["train_tokens_with_copies"]
                                                          + sources["b"]["train_tokens_with_copies"])
    requested = 2.5 * raw_a / (2.5 * raw_a + raw_b)
    assert abs(share_a - requested) < 0.02
    # and the shards hold exactly those tokens (carry keeps everything)
    total = sum(s["train_tokens_with_copies"] for s in sources.values())
    assert read_manifest(out).totals("train")["real_tokens"] == total


# ---- bad input ----------------------------------------------------------------------------------

def test_malformed_records_are_counted_with_file_and_line(tmp_path, corpus, tokenizer_path):
    root, _ = corpus
    out = prep(tmp_path, root, tokenizer_path)
    report = read_manifest(out).report
    bad_line = 40 + len(TRICKY) + 1
    expected = [f"{root / 'a.jsonl'}:{bad_line}: malformed JSON",
                f"{root / 'a.jsonl'}:{bad_line + 1}: field 'text' missing",
                f"{root / 'bad.jsonl'}:2: undecodable bytes at column 20",
                f"{root / 'bad.jsonl'}:3: field 'text' is int, not text",
                f"{root / 'bad.jsonl'}:4: invalid unicode in text",
                f"{root / 'bad.jsonl'}:5: JSON nested too deeply to parse"]
    for fragment in expected:
        assert any(p.startswith(fragment) for p in report["problems"]), (fragment, report["problems"])
    assert report["records_skipped"] == 6
    # the counts: every well-formed record became a document
    assert report["documents_read"] == 20 + 40 + len(TRICKY) + 20 + 20 + 30 + 1


def test_problem_lines_are_exact_in_a_file_cut_into_many_pieces(tmp_path, tokenizer_path):
    """Records are named by byte offset (a piece deep in a file reads nothing before it); the lines
    of reported problems are recovered exactly, across pieces and across the 16 MB read chunks."""
    bad_lines = {1, 2, 777, 40_000, 40_001, 79_999}
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for line in range(1, 80_001):
            f.write("{oops\n" if line in bad_lines else json.dumps({"text": f"document {line} " + "x" * 200}) + "\n")
    assert path.stat().st_size > (16 << 20)
    one = prep(tmp_path, None, tokenizer_path, name="one", inputs=[str(path)], seq_len=64, rows_per_shard=4096)
    many = prep(tmp_path, None, tokenizer_path, name="many", inputs=[str(path)], seq_len=64, rows_per_shard=4096,
                piece_bytes=1 << 20, workers=2)
    for out in (one, many):
        report = read_manifest(out).report
        assert report["problems"] == [f"{path}:{line}: malformed JSON (Expecting property name enclosed in double quotes)"
                                      for line in sorted(bad_lines)]
        assert report["documents_read"] == 80_000 - len(bad_lines)
    assert shard_bytes(one) == shard_bytes(many)


def test_strict_mode_fails_naming_the_record(tmp_path, corpus, tokenizer_path):
    root, _ = corpus
    done = subprocess.run([sys.executable, "-m", "rdhpc.cli", "prep", "shards", "--input", str(root / "bad.jsonl"),
                           "--tokenizer", str(tokenizer_path), "--seq-len", "64", "--out", str(tmp_path / "s"),
                           "--strict"], capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{root / 'bad.jsonl'}:2: undecodable bytes" in done.stderr and "Traceback" not in done.stderr


def test_missing_inputs_and_bad_options(tmp_path, tokenizer_path):
    done = subprocess.run([sys.executable, "-m", "rdhpc.cli", "prep", "shards", "--input", str(tmp_path / "nope"),
                           "--tokenizer", str(tokenizer_path), "--seq-len", "64", "--out", str(tmp_path / "s")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "nope: no such file or directory" in done.stderr
    (tmp_path / "x.csv").write_text("a,b\n")
    from data_prep.sources import InputError, parse_sources

    with pytest.raises(InputError, match="unsupported input format"):
        parse_sources([str(tmp_path / "x.csv")])
    (tmp_path / "x.txt").write_text("text")
    with pytest.raises(InputError, match="no input source named 'c'"):
        parse_sources([f"a={tmp_path / 'x.txt'}"], ["c=2"])
    with pytest.raises(InputError, match="the weight must be a finite number > 0"):
        parse_sources([f"a={tmp_path / 'x.txt'}"], ["a=0"])
    with pytest.raises(InputError, match="listed in two sources"):
        parse_sources([f"a={tmp_path / 'x.txt'}", f"b={tmp_path / 'x.txt'}"])


# ---- the shard format ---------------------------------------------------------------------------

def test_corrupted_truncated_and_mismatched_shards_are_named(tmp_path, corpus, tokenizer_path):
    root, _ = corpus
    out = prep(tmp_path, root, tokenizer_path)
    manifest = read_manifest(out)
    first = out / manifest.shards[0].file
    assert verify_folder(out)[1] == []
    with pytest.raises(ShardError, match="tokenizer sha256 is"):
        ShardReader(first, tokenizer_sha256="0" * 64)
    with pytest.raises(ShardError, match="seq_len is 128, expected 256"):
        ShardReader(first, seq_len=256)
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit inside the tokens
    first.write_bytes(bytes(data))
    problems = verify_folder(out)[1]
    assert any(str(first) in p and "sha256 does not match" in p for p in problems)
    first.write_bytes(bytes(data[:len(data) // 3]))  # truncated
    with pytest.raises(ShardError, match=f"{first}: not a readable Arrow shard"):
        ShardReader(first)
    problems = verify_folder(out, checksums=False)[1]
    assert any(str(first) in p and "truncated" in p for p in problems)
    done = subprocess.run([sys.executable, "-m", "rdhpc.cli", "prep", "verify", str(out)], capture_output=True,
                          text=True)
    assert done.returncode == 1 and str(first) in done.stdout


# ---- across processes: MPI ----------------------------------------------------------------------

def test_two_rank_mpi_run_matches_a_local_run(tmp_path, corpus, tokenizer_path):
    root, _ = corpus
    local = prep(tmp_path, root, tokenizer_path, name="local", piece_bytes=100_000)
    mpirun = Path(sys.executable).parent / "mpirun"
    assert mpirun.exists(), "the PyPI mpich package provides the venv's mpirun"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([str(mpirun), "-n", "2", sys.executable, "-c",
                           "import sys; from rdhpc.distributed import discover_ranks; r = discover_ranks(); "
                           f"open(f'{tmp_path}/rank{{r.rank}}.txt', 'w').write(f'{{r.rank}} {{r.world_size}} {{r.launcher}}'); "
                           "from rdhpc.cli import main; sys.exit(main(sys.argv[1:]))",
                           "prep", "shards", "--input", str(root), "--tokenizer", str(tokenizer_path), "--seq-len", "128",
                           "--out", str(tmp_path / "mpi"), "--rows-per-shard", "64", "--piece-bytes", "100000"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["0 2 mpi", "1 2 mpi"]
    assert shard_bytes(tmp_path / "mpi") == shard_bytes(local)


def test_globs_and_inspect(tmp_path, corpus, tokenizer_path):
    root, _ = corpus
    out = prep(tmp_path, root, tokenizer_path, inputs=[str(root / "txt" / "doc00*.txt"), f"extra={root / 'b.jsonl.gz'}"])
    sources = read_manifest(out).report["sources"]
    assert sources["main"]["documents"] == 10 and sources["extra"]["documents"] == 20
    done = subprocess.run([sys.executable, "-m", "rdhpc.cli", "prep", "inspect", str(out), "--rows", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "<|begin_text|>" in done.stdout and "token histogram" in done.stdout


def test_rank_discovery_from_each_launcher():
    from rdhpc.distributed.ranks import discover_ranks

    assert discover_ranks({}).launcher == "single"
    torchrun = discover_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.launcher) == (3, 8, 1, "torchrun")
    step = discover_ranks({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NTASKS": "16"})
    assert (step.rank, step.world_size, step.local_rank, step.local_world_size, step.launcher) == (5, 16, 1, 8, "slurm")
    # a batch script is one process even in a 16-task job: no ranks from SLURM_NTASKS alone
    assert discover_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "7"}).world_size == 1
    with pytest.raises(RuntimeError, match="RANK='x'"):
        discover_ranks({"RANK": "x", "WORLD_SIZE": "2"})
    # tasks per node differ: this node's count at SLURM_NODEID
    uneven = {"SLURM_PROCID": "8", "SLURM_STEP_NUM_TASKS": "9", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
              "SLURM_STEP_TASKS_PER_NODE": "4(x2),1"}
    assert discover_ranks(uneven).local_world_size == 1


def test_a_rank_bound_to_its_own_gpu_takes_the_one_it_sees():
    from rdhpc.distributed.ranks import local_device_index

    assert [local_device_index(r, 8) for r in range(8)] == list(range(8))  # unbound: the node's 8 GPUs
    assert [local_device_index(r, 1) for r in range(8)] == [0] * 8  # srun --gpu-bind=closest: one each
    with pytest.raises(RuntimeError, match="no GPU is visible to this rank"):
        local_device_index(3, 0)


def test_inside_a_slurm_step_slurms_ranks_win_over_pmi(monkeypatch):
    """srun --mpi=pmi2 (or pmix) puts PMI_RANK/PMI_SIZE into every task: the same ranks, so Slurm's
    variables are used and mpi4py is not even imported (it may not be installed); an MPI launcher
    whose ranks differ from the step's (mpirun over srun-started proxies) is asked through MPI."""
    import sys

    from rdhpc.distributed.ranks import discover_ranks

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # importing it raises ImportError
    step = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    for mpi in ({"PMI_RANK": "3", "PMI_SIZE": "4", "PMI_FD": "7"}, {"PMIX_RANK": "3"}, {}):
        info = discover_ranks({**step, **mpi})
        assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.launcher) == (3, 4, 1, 2, "slurm")
    # mpirun inside the step: its ranks are not the step's, so MPI is asked, and its absence is an error
    with pytest.raises(RuntimeError, match="mpi4py is not installed"):
        discover_ranks({**step, "PMI_RANK": "5", "PMI_SIZE": "8"})
    with pytest.raises(RuntimeError, match=r"an MPI launcher started this process \(PMI_RANK=1\)"):
        discover_ranks({"PMI_RANK": "1"})


def test_output_does_not_depend_on_where_the_corpus_lies(tmp_path, corpus, tokenizer_path):
    root, _ = corpus
    here = prep(tmp_path, root, tokenizer_path, name="here")
    moved = tmp_path / "elsewhere" / "deeper" / "corpus"
    shutil.copytree(root, moved)
    there = prep(tmp_path, moved, tokenizer_path, inputs=[str(moved)], name="there")
    assert shard_bytes(here) == shard_bytes(there)
    assert read_manifest(here).settings == read_manifest(there).settings
