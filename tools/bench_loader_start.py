"""What a rank pays before its first batch, against the number of shards (issue 17, part 2).

    .venv/bin/python tools/bench_loader_start.py                       # 10 and 10,000 shards, before/after
    .venv/bin/python tools/bench_loader_start.py --shards 10 1000 --before HEAD~3 --root /tmp/b

Writes shard folders of tiny shards (16 rows of 17 tokens each, with rdhpc.data.format.write_shard
and a manifest; no tokenizer, no prep), then, each in a fresh process, opens the training data as a
rank of a W-rank job does and takes its first batch:

- `before`: the loader of git revision --before (its rdhpc/data/loader.py, run from a temporary
  folder against today's rdhpc.data.format), which opened and checked every shard in ShardDataset();
- `after`: today's loader (the manifest only; a shard is opened when one of its rows is first read).

Both are timed for a start whose shards were verified before (data.verify_checksums 'once' on a
requeued segment, or 'never'), and for the first start of a run folder with 'once', where this
rank verifies its share (every W-th shard) before step 1. Shard files opened are counted with
`strace -f -e trace=openat` in a second run of the same process (strace slows it, so times come
from the run without it); without strace, the count is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, ROWS_PER_SHARD, VOCAB = 16, 16, 512
TOKENIZER_SHA = "b" * 64


def make_folder(folder: Path, num_shards: int) -> Path:
    """num_shards training shards + 1 validation shard, a manifest listing them; reused when complete."""
    import numpy as np

    from rdhpc.data.format import Manifest, ShardEntry, TokenizerInfo, shard_name, write_shard

    if (folder / "manifest.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(num_shards)
    entries = []
    for split, count in (("train", num_shards), ("val", 1)):
        for i in range(count):
            rows = rng.integers(0, VOCAB - 1, size=(ROWS_PER_SHARD, SEQ_LEN + 1), dtype=np.uint16)
            info = write_shard(folder / shard_name(split, i), rows, seq_len=SEQ_LEN, dtype="uint16",
                               tokenizer_sha256=TOKENIZER_SHA, split=split)
            entries.append(ShardEntry(info["file"], split, info["rows"], rows.size, 0, 1, info["sha256"],
                                      info["bytes"]))
    Manifest(seq_len=SEQ_LEN, dtype="uint16", pack="carry",
             tokenizer=TokenizerInfo("none", TOKENIZER_SHA, VOCAB, VOCAB - 4, VOCAB - 3, VOCAB - 1),
             shards=entries, settings={"bench": True}).write(folder)
    return folder


# One rank's start, as the trainer does it: the datasets, verify_shards, the loader, the first batch.
CHILD = r"""
import json, sys, time
started = time.perf_counter()
sys.path.insert(0, sys.argv[1])                      # the loader under test (before: a temporary copy)
from loader_under_test import BatchLoader, ShardDataset, verify_shards
imported = time.perf_counter()
folder, mode, world, record = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
from pathlib import Path
import pyarrow, pyarrow.ipc                           # imports are not the loader's cost: out of the timing
t0 = time.perf_counter()
train = ShardDataset(folder, "train", seq_len=16)
val = ShardDataset(folder, "val", seq_len=16, tokenizer_sha256=train.manifest.tokenizer.sha256)
t1 = time.perf_counter()
verify_shards({"train": train, "val": val}, mode, Path(record), 0, world, lambda problems: problems, log=lambda *a: None)
t2 = time.perf_counter()
loader = BatchLoader(train, global_batch_size=2 * world, micro_batch_size=2, rank=0, world_size=world, seed=0)
batches = next(iter(loader))
t3 = time.perf_counter()
print(json.dumps({"open_s": t1 - t0, "verify_s": t2 - t1, "first_batch_s": t3 - t2, "to_first_batch_s": t3 - t0,
                  "import_s": imported - started}))
"""


def loader_copy(revision: str | None, where: Path) -> Path:
    """A folder holding loader_under_test.py: rdhpc/data/loader.py of `revision` (None: today's)."""
    where.mkdir(parents=True, exist_ok=True)
    source = (subprocess.run(["git", "show", f"{revision}:rdhpc/data/loader.py"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout if revision else
              (REPO / "rdhpc/data/loader.py").read_text())
    (where / "loader_under_test.py").write_text(source)
    return where


def run_child(code_dir: Path, folder: Path, mode: str, world: int, record: Path, strace: bool) -> dict:
    command = [sys.executable, "-c", CHILD, str(code_dir), str(folder), mode, str(world), str(record)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not strace:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])
    with tempfile.NamedTemporaryFile(suffix=".strace") as trace:
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", trace.name, *command], env=env, cwd=REPO,
                       check=True, capture_output=True, text=True)
        lines = Path(trace.name).read_text().splitlines()
    shard_opens = [line for line in lines if ".arrow" in line and str(folder) in line and "= -1" not in line]
    return {"shard_opens": len(shard_opens), "all_opens": len(lines)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[10, 10_000])
    parser.add_argument("--world", type=int, default=64, help="ranks of the simulated job (this is rank 0)")
    parser.add_argument("--before", default="e1ca821~1", help="git revision of the loader that opened every shard")
    parser.add_argument("--root", default=None, help="where the shard folders are kept (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (the median is reported)")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-loader-"))
    strace = shutil.which("strace") is not None
    codes = {"before": loader_copy(args.before, root / "before"), "after": loader_copy(None, root / "after")}
    results = []
    for num_shards in args.shards:
        started = time.perf_counter()
        folder = make_folder(root / f"shards-{num_shards}", num_shards)
        print(f"[bench] {num_shards} shards in {folder} ({time.perf_counter() - started:.1f} s to write or find)")
        for version, code in codes.items():
            for case, mode, world, keep_record in (("verified before", "once", args.world, True),
                                                   (f"first start, 'once' on {args.world} ranks", "once", args.world,
                                                    False)):
                record = root / f"verified-{num_shards}-{version}.json"
                if keep_record:  # what a first start leaves in the run folder
                    record.unlink(missing_ok=True)
                    run_child(code, folder, mode, 1, record, strace=False)
                times = []
                for _ in range(args.repeats):
                    if not keep_record:
                        record.unlink(missing_ok=True)
                    times.append(run_child(code, folder, mode, world, record, strace=False))
                if not keep_record:
                    record.unlink(missing_ok=True)
                opens = run_child(code, folder, mode, world, record, strace=True) if strace else {}
                median = sorted(times, key=lambda t: t["to_first_batch_s"])[len(times) // 2]
                row = {"shards": num_shards, "loader": version, "case": case, **median, **opens}
                results.append(row)
                print(f"[bench] {num_shards:>6} shards  {version:6}  {case:34}  to first batch "
                      f"{median['to_first_batch_s']:7.3f} s (open {median['open_s']:.3f}, verify "
                      f"{median['verify_s']:.3f}, batch {median['first_batch_s']:.3f})  shard files opened: "
                      f"{opens.get('shard_opens', 'n/a')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
