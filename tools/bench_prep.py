"""Benchmark of data preparation: the raw encoders against `rdhpc prep shards`, in one run, on one
corpus, on the same cores.

    python tools/bench_prep.py --mb 300 --work /tmp/bench-prep          # about 3 minutes on 2 cores

The corpus is real text already on the machine: the Python sources (and docs) of the standard
library and of the installed packages, one document per file, as .jsonl files, never downloaded
(about 440 MB exist in this project's environment; --mb above that takes them all).
Encoder rows time `encode` on the documents already in memory. Then, in --rounds interleaved
rounds, each in a fresh process: gigatoken reading the same .jsonl files itself (the goal's
baseline), and the whole `rdhpc prep shards` with 1 and 2 workers (reading, tokenizing, packing,
writing, checksums, manifest, interpreter start). Tokens/s counts the tokens of the documents
(without BOS/EOS), the same number for every row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def build_corpus(folder: Path, target_bytes: int, docs_per_file: int = 4000) -> tuple[list[Path], int]:
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    files = sorted({p for root in roots for suffix in ("*.py", "*.pyi", "*.md", "*.rst", "*.txt")
                    for p in root.rglob(suffix) if p.is_file()})
    folder.mkdir(parents=True, exist_ok=True)
    outputs, total, docs, handle = [], 0, 0, None
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if handle is None or docs % docs_per_file == 0:
            if handle:
                handle.close()
            outputs.append(folder / f"part-{len(outputs):03d}.jsonl")
            handle = open(outputs[-1], "w", encoding="utf-8")
        handle.write(json.dumps({"text": text}) + "\n")
        total += len(text.encode("utf-8"))
        docs += 1
        if total >= target_bytes:
            break
    handle.close()
    return outputs, total


def read_docs(files: list[Path]) -> list[str]:
    return [json.loads(line)["text"] for f in files for line in open(f, encoding="utf-8")]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=120, help="corpus size in MB (the goal asks for >= 100)")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--hf-mb", type=float, default=20, help="text the (slow) HF encoders are timed on")
    parser.add_argument("--work", default="/tmp/rdhpc-bench-prep")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of baseline, 1 and 2 workers")
    parser.add_argument("--out-json", default=None, help="write the figures here")
    args = parser.parse_args()
    work = Path(args.work)
    corpus_dir = work / "corpus"
    if not corpus_dir.exists():
        files, total = build_corpus(corpus_dir, int(args.mb * 1e6))
    else:
        files = sorted(corpus_dir.glob("*.jsonl"))
        total = sum(len(json.loads(line)["text"].encode()) for f in files for line in open(f))
    tokenizer_path = work / f"tokenizer-{args.vocab_size}.json"
    if not tokenizer_path.exists():
        from data_prep.tokenizer_train import train_tokenizer

        train_tokenizer([str(corpus_dir)], args.vocab_size, tokenizer_path, sample_bytes=40_000_000)
    docs = read_docs(files)
    print(f"corpus: {len(files)} .jsonl files, {len(docs):,} documents, {total / 1e6:.1f} MB of text; "
          f"{os.cpu_count()} cores")

    from tokenizers import Tokenizer

    from rdhpc.data.tokenizer import TextTokenizer

    rows = []
    num_tokens = None

    def record(name, seconds, tokens):
        rows.append({"what": name, "seconds": round(seconds, 3), "tokens_per_s": tokens / seconds})
        print(f"  {name:48s} {seconds:7.2f} s  {tokens / seconds / 1e6:7.2f} M tokens/s", flush=True)

    # Raw encoders on the documents in memory. A fresh encoder for each row (gigatoken caches words).
    fast = TextTokenizer(tokenizer_path, backend="gigatoken")
    seconds, (values, _) = timed(lambda: fast.encode_batch_flat(docs))
    num_tokens = len(values)
    print(f"tokens: {num_tokens:,}")
    record("encoder gigatoken encode_batch (all cores)", seconds, num_tokens)
    import gigatoken

    config = json.loads(tokenizer_path.read_text())
    config["added_tokens"] = []
    single = gigatoken.Tokenizer.from_json(json.dumps(config))
    seconds, _ = timed(lambda: single.encode_batch(docs, parallel=False))
    record("encoder gigatoken encode_batch (1 thread)", seconds, num_tokens)
    read_seconds, _ = timed(lambda: read_docs(files))
    print(f"  (reading the .jsonl with Python's json: {read_seconds:.2f} s)")
    # HF runs at under 1 M tokens/s here: timed on the first documents, up to --hf-mb of text.
    hf_docs, hf_bytes = [], 0
    for doc in docs:
        if hf_bytes >= args.hf_mb * 1e6:
            break
        hf_docs.append(doc)
        hf_bytes += len(doc.encode())
    hf_tokens = int(fast.encode_batch_flat(hf_docs)[1][-1])
    hf = Tokenizer.from_file(str(tokenizer_path))
    hf.encode_special_tokens = True
    seconds, _ = timed(lambda: hf.encode_batch_fast(hf_docs, add_special_tokens=False))
    record(f"encoder HF tokenizers encode_batch_fast (all cores, {hf_bytes / 1e6:.0f} MB)", seconds, hf_tokens)
    seconds, _ = timed(lambda: hf.encode_batch(hf_docs, add_special_tokens=False))
    record(f"encoder HF tokenizers encode_batch (all cores, {hf_bytes / 1e6:.0f} MB)", seconds, hf_tokens)
    fastest_in_memory = max(r["tokens_per_s"] for r in rows)

    # The goal's comparison, in rounds that interleave its three commands, each in a fresh process
    # so that none inherits another's warm caches: the fastest encoder READING THE SAME .jsonl FILES
    # ITSELF (gigatoken's Rust JSON reader, all cores: the baseline of the goal), then the whole
    # `rdhpc prep shards` with 1 and 2 workers. The machine is shared and noisy: each round's ratio
    # compares runs seconds apart, and the median over rounds is what the README reports.
    rounds = []
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", flush=True)
        baseline = reading_encoder_seconds(files, tokenizer_path, num_tokens)
        record("encoder gigatoken reading the .jsonl itself (all cores)", baseline, num_tokens)
        this_round = {"baseline_seconds": baseline}
        for workers in (1, 2):
            result = run_prep(corpus_dir, tokenizer_path, work / f"shards-w{workers}", workers, args.seq_len)
            assert result["tokens"] == num_tokens, (result["tokens"], num_tokens)
            record(f"rdhpc prep shards --workers {workers} (end to end)", result["seconds"], num_tokens)
            rows[-1].update(peak_rss_mb=result["peak_rss_mb"], stages=result["stages"])
            print(f"    (peak resident memory {result['peak_rss_mb']} MB; {result['stages']})")
            this_round[f"w{workers}_seconds"] = result["seconds"]
        this_round["ratio_w2"] = this_round["baseline_seconds"] / this_round["w2_seconds"]
        rounds.append(this_round)
    ratios = sorted(r["ratio_w2"] for r in rounds)
    median_ratio = ratios[len(ratios) // 2]
    best_w2 = min(r["w2_seconds"] for r in rounds)
    print(f"prep shards --workers 2 / gigatoken reading the same files itself, per round: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; median {median_ratio:.2f} (goal >= 0.6)")
    print(f"best --workers 2: {num_tokens / best_w2 / 1e6:.1f} M tokens/s = {num_tokens / best_w2 / fastest_in_memory:.2f}x "
          f"the fastest encoder on documents already in memory")
    same = [p.read_bytes() for p in sorted((work / "shards-w1").glob("*.arrow"))] == \
        [p.read_bytes() for p in sorted((work / "shards-w2").glob("*.arrow"))]
    print(f"1 and 2 workers wrote identical shards: {same}")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"corpus_mb": total / 1e6, "documents": len(docs),
                                                   "tokens": num_tokens, "rows": rows, "rounds": rounds,
                                                   "median_ratio_to_reading_encoder": median_ratio,
                                                   "identical": same}, indent=2))
    return 0


_READING_ENCODER = """
import json, sys, time, gigatoken
config = json.loads(open(sys.argv[1]).read())
config["added_tokens"] = []  # as rdhpc uses it: special-token text stays text
tokenizer = gigatoken.Tokenizer.from_json(json.dumps(config))
tokenizer.encode_batch(["import the array library before timing"])
start = time.perf_counter()
out = tokenizer.encode_files(gigatoken.JsonlFileSource(sys.argv[2:]))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": int(out.layout.offsets[-1]) - int(out.layout.offsets[0])}))
"""


def reading_encoder_seconds(files: list[Path], tokenizer_path: Path, num_tokens: int) -> float:
    """gigatoken reading the .jsonl files itself, in a fresh process (its word caches start empty,
    as in every prep worker); the time of the encode call alone, after its imports."""
    done = subprocess.run([sys.executable, "-c", _READING_ENCODER, str(tokenizer_path), *map(str, files)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokens"] == num_tokens, (result["tokens"], num_tokens)
    return result["seconds"]


def run_prep(corpus_dir: Path, tokenizer_path: Path, out: Path, workers: int, seq_len: int) -> dict:
    """The whole command, as users run it, in a fresh process: wall time (interpreter start and
    imports included), peak memory, the stage times it logs, and the tokens its manifest counts."""
    shutil.rmtree(out, ignore_errors=True)
    # GNU time reports the peak resident memory of the command (the largest of it and its workers);
    # a getrusage from this process would count the pages its children had before exec.
    timer = ["/usr/bin/time", "-f", "PEAK_RSS_KB %M"] if Path("/usr/bin/time").exists() else []
    command = [*timer, sys.executable, "-m", "rdhpc.cli", "prep", "shards", "--input", str(corpus_dir),
               "--tokenizer", str(tokenizer_path), "--seq-len", str(seq_len), "--out", str(out),
               "--workers", str(workers), "--piece-bytes", "16e6"]
    seconds, done = timed(lambda: subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT))
    if done.returncode:
        raise SystemExit(f"prep failed:\n{done.stdout}\n{done.stderr}")
    report = json.loads((out / "manifest.json").read_text())["report"]
    peak = [int(line.split()[1]) // 1024 for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    stages = [line for line in done.stdout.splitlines() if "wrote" in line][0].split("(")[1].split(")")[0]
    return {"seconds": seconds, "tokens": sum(s["tokens"] for s in report["sources"].values()),
            "peak_rss_mb": peak[0] if peak else None, "stages": stages}


if __name__ == "__main__":
    sys.exit(main())
