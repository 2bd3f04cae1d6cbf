"""Trainer overhead on CPU: the same model, batches and depths through the DeepSpeed trainer's step
and through a plain PyTorch loop, timed in one process, one after the other.

    python tools/bench_trainer_overhead.py --steps 40          # about a minute on 2 cores

Three paths, each drawing the depth of step s from the same sampler and reading the same rows:
- plain: a PyTorch loop (forward, backward, clip, AdamW step);
- engine: the DeepSpeed engine's forward / backward / step (ZeRO 1, fp32, one rank, gloo);
- trainer: `Trainer.train()` itself, everything `rdhpc train` does per step: the prefetching
  loader, the request all-reduce, the heartbeat, the metrics all-reduce, a line in metrics.jsonl,
  TensorBoard every 10 steps (step times from the wall-clock stamps of metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import engine_step, plain_step, single_rank_environment, time_steps  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    single_rank_environment(cpu=True)
    import torch

    from data_prep.shards import ShardSettings, run_shards
    from data_prep.tokenizer_train import train_tokenizer
    from rdhpc.config import load_config
    from rdhpc.demo import DEMO_CONFIG, write_stdlib_corpus
    from rdhpc.distributed import discover_ranks
    from rdhpc.model import RecurrentDepthModel
    from rdhpc.train.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="rdhpc-bench-trainer-"))
    write_stdlib_corpus(work / "corpus.jsonl", 2_000_000)
    train_tokenizer([str(work / "corpus.jsonl")], 2048, work / "tok.json", sample_bytes=2_000_000, log=lambda *a: None)
    run_shards(ShardSettings(inputs=[str(work / "corpus.jsonl")], tokenizer=str(work / "tok.json"), seq_len=128,
                             out=str(work / "shards"), pack="carry"), log=lambda *a: None)
    run = load_config(DEMO_CONFIG, [f"data.train_dir={work / 'shards'}", f"logging.run_dir={work / 'run'}",
                                    "train.log_interval=10", f"train.max_steps={args.steps}",
                                    "eval.interval=1000000", "checkpoint.interval=1000000"])
    trainer = Trainer(run, discover_ranks(), log=lambda *a: None)
    trainer.setup()
    batches = [b for _, b in zip(range(args.steps), trainer.loader)]
    depths = [trainer.sampler(s) for s in range(args.steps)]

    def timed(step_fn) -> list[float]:
        return time_steps(step_fn, args.steps, "cpu")[0][args.warmup:]

    torch.manual_seed(0)
    model = RecurrentDepthModel(run.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.optim.lr, foreach=False)

    metrics = work / "run" / "metrics.jsonl"

    def full_loop_times() -> list[float]:
        metrics.unlink(missing_ok=True)
        trainer.step, trainer.loader.consumed_steps = 0, 0
        trainer.train()
        stamps = [json.loads(line)["time"] for line in open(metrics)]
        return [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]

    # interleave the paths in rounds so machine noise hits all alike
    engine_times, plain_times, loop_times = [], [], []
    for _ in range(2):
        engine_times += timed(lambda s: engine_step(trainer.engine, batches[s], depths[s]))
        plain_times += timed(lambda s: plain_step(model, optimizer, batches[s], depths[s], run.optim.grad_clip))
        loop_times += full_loop_times()
    e, p, t = (statistics.median(x) for x in (engine_times, plain_times, loop_times))
    print(f"median step: plain PyTorch {1000 * p:.1f} ms; DeepSpeed engine (ZeRO 1, fp32, 1 rank) {1000 * e:.1f} ms "
          f"({100 * (e / p - 1):+.1f}%); the whole trainer loop {1000 * t:.1f} ms ({100 * (t / p - 1):+.1f}%, "
          f"goal <= 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
