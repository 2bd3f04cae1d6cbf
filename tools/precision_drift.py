"""How far the latent state drifts in each training precision, on a trained checkpoint, and how the
loss curves of a short training run compare: the measurement behind `train.precision`'s default.

    python tools/precision_drift.py state --checkpoint runs/demo/train/checkpoints --data runs/demo/shards
    python tools/precision_drift.py curves --data runs/demo/shards --steps 300 --out /tmp/precision
    python tools/precision_drift.py floor --data runs/demo/shards --steps 300      # adam-atan2's v floor

`state`: for each depth r (default 1, 4, 16, 64, 128) the relative distance of s_r from the float32
run, ||s_r - s_r(fp32)|| / ||s_r(fp32)||, and the validation loss, in three precisions of the same
weights and the same initial-state noise:
  fp32           float32 weights, float32 everything;
  bf16-autocast  float32 weights under bf16 autocast (the paper's: bf16 matrix products, float32
                 residual stream, norms and state);
  bf16           bf16 weights (what DeepSpeed's bf16 mode holds), norms in float32, state in bf16.
`curves`: `rdhpc launch local` of configs/demo.yaml for --steps steps in each precision (ZeRO 1, two
ranks, the same seed and data), then the loss curves' distance from the fp32 run.
`floor`: adam-atan2 with and without the released code's floor of v at atan2_eps^2 (1e-12), the
demo model trained in one process (plain PyTorch, the trainer's depth sampler, schedule and data
order): the fraction of elements whose v the floor raised, at each step, and the loss curves.
All print a table and write JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PRECISIONS = ("fp32", "bf16-autocast", "bf16")


def state_drift(checkpoint: str, data: str, depths: list[int], rows: int, batch: int, seed: int) -> dict:
    import copy

    import numpy as np
    import torch

    from rdhpc.data.loader import ShardDataset, inputs_and_labels
    from rdhpc.export import load_checkpoint

    model = load_checkpoint(checkpoint).model.float()
    models = {"fp32": model, "bf16-autocast": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    dataset = ShardDataset(data, "val")
    batches = [inputs_and_labels(dataset.rows(np.arange(start, min(start + batch, rows, len(dataset)))),
                                 dataset.pad_id) for start in range(0, min(rows, len(dataset)), batch)]
    result = {}
    for depth in depths:
        states, losses = {}, {}
        for mode in PRECISIONS:
            torch.manual_seed(seed)  # the same initial-state noise in every mode
            parts, loss_sum, tokens = [], 0.0, 0
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
                for inputs, labels in batches:
                    out = models[mode](inputs, num_steps=depth, labels=labels)
                    count = int((labels != -100).sum())
                    parts.append(out.latent_state.double())
                    loss_sum, tokens = loss_sum + float(out.loss) * count, tokens + count
            states[mode], losses[mode] = torch.cat(parts), loss_sum / tokens
        reference = states["fp32"]
        result[depth] = {mode: {"state_rel_distance": float((states[mode] - reference).norm() / reference.norm()),
                                "state_dtype": str(models[mode].embedding.weight.dtype if mode == "bf16"
                                                   else torch.float32).replace("torch.", ""),
                                "val_loss": losses[mode]} for mode in PRECISIONS}
    return result


def loss_curves(data: str, steps: int, out: Path, nproc: int) -> dict:
    curves = {}
    for mode in PRECISIONS:
        run_dir = out / mode
        if not (run_dir / "run_state.json").exists():
            command = [sys.executable, "-m", "rdhpc.cli", "launch", "local", "configs/demo.yaml", "--nproc", str(nproc),
                       "--set", f"data.train_dir={data}", "--set", f"logging.run_dir={run_dir}",
                       "--set", f"train.max_steps={steps}", "--set", f"train.precision={mode}",
                       "--set", "zero.stage=1", "--set", f"eval.interval={steps}",
                       "--set", "eval.depths=[1, 4, 16, 64]", "--set", f"checkpoint.interval={steps}"]
            subprocess.run(command, cwd=REPO, check=True)
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[mode] = [m["loss"] for m in lines]
    reference = curves["fp32"]
    summary = {}
    for mode, curve in curves.items():
        diffs = [abs(a - b) for a, b in zip(curve, reference)]
        summary[mode] = {"first10": sum(curve[:10]) / 10, "last10": sum(curve[-10:]) / 10,
                         "mean_abs_diff_vs_fp32": sum(diffs) / len(diffs), "max_abs_diff_vs_fp32": max(diffs),
                         "last10_diff_vs_fp32": sum(curve[-10:]) / 10 - sum(reference[-10:]) / 10}
    return {"steps": steps, "summary": summary, "curves": curves}


def v_floor(data: str, steps: int, eps_values=(1e-6, 0.0)) -> dict:
    import torch

    from rdhpc.config import load_config
    from rdhpc.data.loader import BatchLoader, ShardDataset
    from rdhpc.model import DepthSampler, RecurrentDepthModel
    from rdhpc.train.optim import LRSchedule, build_optimizer

    out = {}
    for eps in eps_values:
        run = load_config(REPO / "configs" / "demo.yaml", [f"data.train_dir={data}", "optim.name=adam-atan2",
                                                          "optim.weight_decay_scaling=schedule",
                                                          "optim.weight_decay=4e-5", f"optim.atan2_eps={eps}",
                                                          f"train.max_steps={steps}"])
        torch.manual_seed(run.train.seed)
        model = RecurrentDepthModel(run.model)
        optimizer = build_optimizer(model, run.optim)
        loader = BatchLoader(ShardDataset(data, "train", seq_len=run.model.max_seq_len), run.train.global_batch_size,
                             run.train.global_batch_size, 0, 1, seed=run.data.shuffle_seed, on_exhausted="new_epoch")
        sampler, schedule = DepthSampler.from_model_config(run.model, seed=run.train.seed), \
            LRSchedule(run.schedule, run.optim.lr, steps)
        losses, floored = [], []
        for step, batches in zip(range(steps), loader):
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            optimizer.zero_grad(set_to_none=True)
            (inputs, labels), = batches
            loss = model(inputs, num_steps=sampler(step), labels=labels, return_logits=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), run.optim.grad_clip)
            # what the floor changes this step: elements whose v (after this step's moving average)
            # is below 1e-12, i.e. sqrt(v) below 1e-6 inside the atan2
            below = total = 0
            for p in model.parameters():
                state = optimizer.state.get(p)
                g = p.grad.float()
                v = g * g if not state else state["exp_avg_sq"] * 0.95 + 0.05 * g * g
                below += int((v < 1e-12).sum())
                total += v.numel()
            optimizer.step()
            losses.append(loss.item())
            floored.append(below / total)
        out[str(eps)] = {"losses": losses, "fraction_below_floor": floored}
    a, b = out[str(eps_values[0])]["losses"], out[str(eps_values[1])]["losses"]
    out["summary"] = {"mean_abs_loss_diff": sum(abs(x - y) for x, y in zip(a, b)) / len(a),
                      "last10": {k: sum(v["losses"][-10:]) / 10 for k, v in out.items() if k != "summary"},
                      "fraction_below_floor_first10": sum(out[str(eps_values[0])]["fraction_below_floor"][:10]) / 10,
                      "fraction_below_floor_last10": sum(out[str(eps_values[0])]["fraction_below_floor"][-10:]) / 10}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("state")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--depths", default="1,4,16,64,128")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p = sub.add_parser("floor")
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--json")
    p = sub.add_parser("curves")
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="/tmp/rdhpc-precision")
    p.add_argument("--json")
    args = parser.parse_args()
    if args.what == "state":
        result = state_drift(args.checkpoint, args.data, [int(d) for d in args.depths.split(",")], args.rows,
                             args.batch, args.seed)
        print(f"{'depth':>5}  " + "  ".join(f"{m + ' dist':>20} {m + ' loss':>19}" for m in PRECISIONS))
        for depth, modes in result.items():
            print(f"{depth:>5}  " + "  ".join(f"{modes[m]['state_rel_distance']:>20.3e} {modes[m]['val_loss']:>19.4f}"
                                              for m in PRECISIONS))
    elif args.what == "floor":
        result = v_floor(args.data, args.steps)
        s = result["summary"]
        print(f"adam-atan2, {args.steps} steps: elements whose v the floor raises: {100 * s['fraction_below_floor_first10']:.2f}% "
              f"(first 10 steps), {100 * s['fraction_below_floor_last10']:.2f}% (last 10); loss with / without the floor: "
              + ", ".join(f"eps {k}: {v:.4f}" for k, v in s["last10"].items())
              + f" (last 10 steps); mean |diff| {s['mean_abs_loss_diff']:.4f}")
    else:
        result = loss_curves(args.data, args.steps, Path(args.out), args.nproc)
        for mode, s in result["summary"].items():
            print(f"{mode:>14}: loss {s['first10']:.4f} -> {s['last10']:.4f}; vs fp32 mean |diff| "
                  f"{s['mean_abs_diff_vs_fp32']:.4f}, max {s['max_abs_diff_vs_fp32']:.4f}, last-10 "
                  f"{s['last10_diff_vs_fp32']:+.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
