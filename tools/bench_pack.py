"""Benchmark of the pack stage's cost against pieces x shards, and of prep's memory as the corpus grows.

    python tools/bench_pack.py grid --work /tmp/bench-pack                     # ~3 minutes on 2 cores
    python tools/bench_pack.py grid --work /tmp/bench-pack --before /tmp/old   # also an older checkout
    python tools/bench_pack.py scale --work /tmp/bench-pack --mb 300 --times 3 10 20  # memory, 0.3 to 6 GB

grid: one corpus of real text (--mb, default 16 MB of the Python sources on the machine, as
bench_prep.py), `rdhpc prep shards` end to end with --workers 2 at seq_len 63 for each point of a
grid of (pieces, shards), made by cutting the same tokens into tiny pieces (--piece-bytes) and tiny
shards (--rows-per-shard): the shape of a TB-scale corpus on small data. Each point is run twice in
fresh processes: once timed (the stages' times from prep's own log), once under strace counting
every file the run opens (`openat`), and among them the tokenized pieces' files. With --before, an
older checkout (e.g. `git worktree add /tmp/old COMMIT`) runs the same grid in the same rounds.

scale: prep of a corpus and of the same corpus --times over (the files copied under other names, so
every document is another document), peak resident memory of the largest process and time.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tools"))

from bench_prep import build_corpus  # noqa: E402

GRID = [(4, 50), (121, 50), (241, 100), (1000, 50), (4, 1000), (1000, 1000), (2000, 2000)]
BEFORE_MAX_PAIRS = 30_000  # an older checkout's pack stage costs ~0.3 ms per piece-shard pair: beyond, it is not run
# Runs a checkout's `rdhpc` (the editable install of this one would win otherwise).
_RUN = ("import runpy, sys; root = sys.argv.pop(1); "
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        "sys.path.insert(0, root); sys.argv[0] = 'rdhpc'; runpy.run_module('rdhpc.cli', run_name='__main__')")
_MEASURE = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")


def prep_command(root: Path, corpus: Path, tokenizer: Path, out: Path, piece_bytes: int, rows: int,
                 workers: int = 2) -> list[str]:
    return [sys.executable, "-c", _RUN, str(root), "prep", "shards", "--input", str(corpus), "--tokenizer",
            str(tokenizer), "--seq-len", "63", "--out", str(out), "--workers", str(workers), "--piece-bytes",
            str(piece_bytes), "--rows-per-shard", str(rows)]


def run_prep(command: list[str], out: Path, strace: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    trace = out.with_name(out.name + ".strace")
    prefix = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=openat", "-o", str(trace)] if strace else []
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _MEASURE, *prefix, *command], capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"prep failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    stages = re.search(r"set-up ([\d.]+) s, tokenize ([\d.]+) s, pack ([\d.]+) s", done.stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    result = {"seconds": seconds, "setup": float(stages[1]), "tokenize": float(stages[2]), "pack": float(stages[3]),
              "peak_rss_mb": int(re.search(r"PEAK_RSS_KB (\d+)", done.stdout)[1]) // 1024,
              "shards": len(manifest["shards"]), "rows": sum(s["rows"] for s in manifest["shards"])}
    if strace:
        lines = trace.read_text().splitlines()
        opened = [line for line in lines if "openat(" in line and "= -1" not in line]
        result["opens"] = len(opened)
        result["piece_opens"] = sum("/.work/tok/piece-" in line and ".tmp" not in line and "O_RDONLY" in line
                                    for line in opened)
        trace.unlink()
    return result


def corpus_and_tokenizer(work: Path, mb: float) -> tuple[Path, Path, int]:
    corpus = work / f"corpus-{mb:g}mb"
    if not corpus.exists():
        build_corpus(corpus, int(mb * 1e6))
    size = sum(p.stat().st_size for p in corpus.glob("*.jsonl"))
    tokenizer = work / "tokenizer-2048.json"
    if not tokenizer.exists():
        from data_prep.tokenizer_train import train_tokenizer

        train_tokenizer([str(corpus)], 2048, tokenizer, sample_bytes=20_000_000, log=lambda *a: None)
    return corpus, tokenizer, size


def grid(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer, size = corpus_and_tokenizer(work, args.mb)
    checkouts = {"now": REPO_ROOT} | ({"before": Path(args.before)} if args.before else {})
    # the rows of one shard for a target shard count: from the rows of a one-shard run
    probe = run_prep(prep_command(REPO_ROOT, corpus, tokenizer, work / "probe", size, 1 << 30), work / "probe")
    total_rows = probe["rows"]
    print(f"corpus {size / 1e6:.1f} MB, {total_rows:,} rows of 64 tokens (train + val)")
    results = []
    for pieces, shards in GRID:
        piece_bytes, rows = max(1, size // pieces), max(1, total_rows // shards)
        for name, root in checkouts.items():
            if name == "before" and pieces * shards > BEFORE_MAX_PAIRS:
                continue
            command = prep_command(root, corpus, tokenizer, work / f"out-{name}", piece_bytes, rows)
            timed = run_prep(command, work / f"out-{name}")
            counted = run_prep(command, work / f"out-{name}", strace=True)
            row = {"checkout": name, "target": [pieces, shards], "piece_bytes": piece_bytes, "rows_per_shard": rows,
                   **timed, "opens": counted["opens"], "piece_opens": counted["piece_opens"]}
            results.append(row)
            print(f"{name:6s} {pieces:5d} pieces x {shards:5d} shards (made {row['shards']}): pack {row['pack']:6.2f} s, "
                  f"tokenize {row['tokenize']:5.2f} s, all {row['seconds']:6.2f} s, opens {row['opens']:,} "
                  f"(piece files {row['piece_opens']:,}), peak {row['peak_rss_mb']} MB", flush=True)
    (work / "bench_pack.json").write_text(json.dumps(results, indent=1))
    for name in checkouts:
        mine = [r for r in results if r["checkout"] == name]
        for other in mine[1:]:
            print(f"{name}: pack time at {other['target']} / at {mine[0]['target']}: "
                  f"{other['pack'] / max(mine[0]['pack'], 1e-9):.2f}x")


def scale(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer, size = corpus_and_tokenizer(work, args.mb)
    folders = [("1x", corpus)]
    for times in args.times:
        big = work / f"corpus-{args.mb:g}mb-x{times}"
        if not big.exists():
            big.mkdir()
            for copy in range(times):
                for path in sorted(corpus.glob("*.jsonl")):
                    shutil.copyfile(path, big / f"copy{copy:02d}-{path.name}")
        folders.append((f"{times}x", big))
    for name, folder in folders:
        mb = sum(p.stat().st_size for p in folder.glob("*.jsonl")) / 1e6
        result = run_prep(prep_command(REPO_ROOT, folder, tokenizer, work / f"scale-{name}", 64 << 20, 8192),
                          work / f"scale-{name}")
        print(f"{name}: {mb:,.0f} MB, {result['rows']:,} rows in {result['shards']} shards: {result['seconds']:.1f} s "
              f"(tokenize {result['tokenize']:.1f} s, pack {result['pack']:.1f} s), peak resident memory of the "
              f"largest process {result['peak_rss_mb']} MB", flush=True)
        shutil.rmtree(work / f"scale-{name}", ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grid")
    g.add_argument("--work", default="/tmp/rdhpc-bench-pack")
    g.add_argument("--mb", type=float, default=16)
    g.add_argument("--before", help="an older checkout to run the same grid with")
    s = sub.add_parser("scale")
    s.add_argument("--work", default="/tmp/rdhpc-bench-pack")
    s.add_argument("--mb", type=float, default=300)
    s.add_argument("--times", type=int, nargs="+", default=[3, 10])
    args = parser.parse_args()
    {"grid": grid, "scale": scale}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
