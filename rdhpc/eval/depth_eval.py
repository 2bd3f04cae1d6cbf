"""Validation loss and perplexity against recurrence depth: the test-time scaling curve.

    rdhpc eval runs/x/checkpoints --data shards/ --steps 1,2,4,8,16,32,64
    rdhpc eval model.safetensors --data shards/ --steps 1,4,16 --out eval/ --max-rows 512

One pass per batch serves every depth: the core is iterated up to the largest depth and the coda and
head read the state out at each requested depth, so a sweep costs the deepest depth once, not the sum
of the depths. The initial state is seeded noise keyed by each row's index (the same for every
depth, and the same as the trainer's in-loop validation draws for that row) or zero with
--init-scale 0. Losses are token-weighted means over labels that are not
padding. Writes a table (stdout), `eval.json`, `loss_vs_depth.png` (log-x) and TensorBoard scalars
(`eval/loss` and `eval/perplexity` with the depth as the step; `eval/loss_r{r}` at the checkpoint's
training step, so evaluating several checkpoints into one folder draws the curves over training).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rdhpc.errors import UserError
from rdhpc.model.recurrent_depth import RecurrentDepthModel


class EvalError(UserError, ValueError):
    pass


@dataclass
class DepthCurve:
    depths: list[int]
    loss: dict[int, float]
    tokens: int
    rows: int
    checkpoint: str = ""
    step: int | None = None
    data: str = ""
    split: str = "val"
    init_scale: float = 1.0
    seed: int = 0
    files: dict[str, str] = field(default_factory=dict)

    @property
    def perplexity(self) -> dict[int, float]:
        return {d: math.exp(min(v, 700.0)) for d, v in self.loss.items()}

    def table(self) -> str:
        lines = [f"{'depth':>6}  {'loss':>8}  {'perplexity':>11}"]
        for d in self.depths:
            lines.append(f"{d:>6}  {self.loss[d]:>8.4f}  {self.perplexity[d]:>11.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "step": self.step, "data": self.data, "split": self.split,
                "rows": self.rows, "tokens": self.tokens, "init_scale": self.init_scale, "seed": self.seed,
                "depths": self.depths,
                "loss": {str(d): self.loss[d] for d in self.depths},
                "perplexity": {str(d): self.perplexity[d] for d in self.depths}}


def parse_depths(text: str) -> list[int]:
    try:
        depths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EvalError(f"--steps: expected comma-separated integers such as 1,2,4,8, got {text!r}") from None
    if not depths or any(d < 1 for d in depths):
        raise EvalError(f"--steps: depths must be >= 1, got {text!r}")
    return sorted(set(depths))


@torch.no_grad()
def loss_by_depth(model, inputs: torch.Tensor, labels: torch.Tensor, depths: list[int],
                  init_scale: float = 1.0, state_seeds=None) -> dict[int, tuple[float, int]]:
    """{depth: (summed token loss, counted tokens)} of one batch, all depths from one trajectory
    (the model's forward with `readout_depths`). `model` may be the DeepSpeed engine: its forward
    gathers ZeRO-3's partitioned weights. `state_seeds`: per-row noise seeds (validation_seeds)."""
    out = model(inputs, labels=labels, init_scale=init_scale, readout_depths=depths, state_seeds=state_seeds)
    count = int(out.num_label_tokens)
    return {d: (float(out.depth_losses[d]), count) for d in depths}


def validation_seeds(seed: int, rows) -> list[int]:
    """The initial-state noise seeds of validation rows, keyed by their index in the split: the
    trainer's in-loop validation and `rdhpc eval` draw the same noise for the same row."""
    from rdhpc.model.sampling import VALIDATION_NOISE, row_noise_seeds

    return row_noise_seeds(seed, 0, rows, VALIDATION_NOISE)


def validation_indices(num_rows: int, rows: int) -> np.ndarray:
    """The rows of a split that evaluation reads: `rows` of them evenly spread over the whole split
    (all of them when it has fewer). The first rows would be a handful of documents: packing
    writes a shard's documents one after another, so on a small corpus (the demo's) 64 rows of 128
    tokens came from 2-3 long files, and the validation loss said more about them than about the
    data (2.05 against a training loss of 3.48)."""
    count = min(rows, num_rows)
    return (np.arange(count, dtype=np.int64) * num_rows) // max(count, 1)


def evaluate_depths(model, rows: np.ndarray, depths: list[int], pad_id: int, batch_size: int = 8,
                    init_scale: float = 1.0, seed: int = 0, device: str | torch.device = "cpu",
                    row_indices=None, real_rows: int | None = None) -> tuple[dict[int, float], int]:
    """({depth: summed token loss}, counted tokens) of `rows`, the rows `row_indices` of the split
    (default 0, 1, ...), in batches of `batch_size`, each row's noise keyed by its index. Rows from
    `real_rows` on are fillers: they run (every rank must run as many forwards under ZeRO 3) but
    count nothing."""
    from rdhpc.data.loader import inputs_and_labels
    from rdhpc.model.recurrent_depth import IGNORE_INDEX

    totals = {d: 0.0 for d in depths}
    tokens = 0
    real_rows = len(rows) if real_rows is None else real_rows
    row_indices = np.arange(len(rows)) if row_indices is None else np.asarray(row_indices)
    for start in range(0, len(rows), batch_size):
        inputs, labels = inputs_and_labels(rows[start:start + batch_size], pad_id)
        labels[max(0, real_rows - start):] = IGNORE_INDEX
        seeds = validation_seeds(seed, row_indices[start:start + len(inputs)].tolist())
        batch = loss_by_depth(model, inputs.to(device), labels.to(device), depths, init_scale, seeds)
        for d, (loss, count) in batch.items():
            totals[d] += loss
        tokens += batch[depths[0]][1]
    return totals, tokens


def depth_curve(model, rows: np.ndarray, depths: list[int], pad_id: int, batch_size: int = 8,
                init_scale: float = 1.0, seed: int = 0, device: str | torch.device = "cpu",
                row_indices=None) -> DepthCurve:
    totals, tokens = evaluate_depths(model, rows, depths, pad_id, batch_size, init_scale, seed, device,
                                     row_indices=row_indices)
    if tokens == 0:
        raise EvalError("the evaluation rows hold no tokens to predict (all padding)")
    return DepthCurve(depths, {d: totals[d] / tokens for d in depths}, tokens, len(rows),
                      init_scale=init_scale, seed=seed)


def write_outputs(curve: DepthCurve, out_dir: str | Path) -> DepthCurve:
    """eval.json, loss_vs_depth.png and TensorBoard scalars under out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve.files = {"json": str(out_dir / "eval.json"), "png": str(out_dir / "loss_vs_depth.png"),
                   "tensorboard": str(out_dir / "tensorboard")}

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    losses = [curve.loss[d] for d in curve.depths]
    ax.plot(curve.depths, losses, marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(curve.depths, [str(d) for d in curve.depths])
    ax.set_xlabel("recurrence depth r (log scale)")
    ax.set_ylabel("validation loss (nats per token)")
    title = Path(curve.checkpoint).name or "checkpoint"
    ax.set_title(f"{title}" + (f", step {curve.step}" if curve.step is not None else "")
                 + f": {curve.tokens:,} tokens")
    ax.grid(True, which="both", alpha=0.3)
    for d, v in zip(curve.depths, losses):
        ax.annotate(f"ppl {math.exp(min(v, 700.0)):.1f}", (d, v), textcoords="offset points", xytext=(4, 6),
                    fontsize=7)
    fig.tight_layout()
    fig.savefig(curve.files["png"])
    plt.close(fig)

    writer = SummaryWriter(curve.files["tensorboard"])
    for d in curve.depths:
        writer.add_scalar("eval/loss", curve.loss[d], d)
        writer.add_scalar("eval/perplexity", curve.perplexity[d], d)
        writer.add_scalar(f"eval/loss_r{d}", curve.loss[d], curve.step or 0)
    writer.close()
    Path(curve.files["json"]).write_text(json.dumps(curve.to_dict() | {"files": curve.files}, indent=2) + "\n")
    return curve


def run_eval(checkpoint: str, data: str | None, depths: list[int], out: str | None = None, split: str = "val",
             max_rows: int = 256, batch_size: int = 8, init_scale: float = 1.0, seed: int = 0,
             device: str = "cpu", log=print) -> DepthCurve:
    """`rdhpc eval`: load any checkpoint kind, evaluate the shards' rows at every depth, write outputs."""
    from rdhpc.data.loader import ShardDataset
    from rdhpc.export import load_checkpoint

    if max_rows < 1 or batch_size < 1:
        raise EvalError("--max-rows and --batch-size must be >= 1")
    loaded = load_checkpoint(checkpoint, device=device)
    model = loaded.model
    if data is None:
        run = loaded.run_config
        data = run and (run.data.val_dir or run.data.first_dir())  # a mixture's: its first source
        if not data:
            raise EvalError(f"{loaded.path}: the checkpoint records no data folder; pass --data SHARDS")
        if not Path(data).is_dir():
            raise EvalError(f"{loaded.path}: the data folder it records, {data}, is not found from {Path.cwd()}; "
                            f"pass --data SHARDS")
        log(f"[eval] data: {data} (the checkpoint's run)")
    dataset = ShardDataset(data, split)
    if dataset.seq_len > model.config.max_seq_len:
        raise EvalError(f"{data}: rows of {dataset.seq_len} tokens, the model's max_seq_len is "
                        f"{model.config.max_seq_len}")
    if dataset.manifest.tokenizer.vocab_size > model.config.padded_vocab_size:
        raise EvalError(f"{data}: the shards' tokenizer has {dataset.manifest.tokenizer.vocab_size} tokens, the model "
                        f"embeds {model.config.padded_vocab_size}")
    if loaded.tokenizer:
        from rdhpc.data.tokenizer import tokenizer_sha256

        if tokenizer_sha256(loaded.tokenizer) != dataset.manifest.tokenizer.sha256:
            log(f"[eval] warning: {data} was made with another tokenizer than the checkpoint's ({loaded.tokenizer})")
    indices = validation_indices(len(dataset), max_rows)
    rows = dataset.rows(indices)
    curve = depth_curve(model, rows, depths, dataset.pad_id, batch_size, init_scale, seed, device, row_indices=indices)
    curve.checkpoint, curve.step, curve.data, curve.split = str(loaded.path), loaded.step, str(data), split
    if out is None:
        if loaded.kind == "deepspeed":  # RUN/checkpoints/stepN -> RUN/eval/stepN
            out = loaded.path.parent.parent / "eval" / loaded.path.name
        else:
            out = loaded.path.parent / f"{loaded.path.stem}-eval"
    write_outputs(curve, out)
    log(f"[eval] {loaded.kind} checkpoint {loaded.path}" + (f" (step {loaded.step})" if loaded.step is not None else "")
        + f", {len(rows)} {split} rows, {curve.tokens:,} tokens, initial-state scale {init_scale}")
    log(curve.table())
    log(f"[eval] wrote {curve.files['json']}, {curve.files['png']}, {curve.files['tensorboard']}")
    return curve
