"""One table from the JSON files of tools/bench_train.py (and bench_attention.py), against the
measured figures of the paper's released code on one H200 (3.5B, 4096 tokens, micro-batch 1, depth 24+8).

    python tools/bench_summary.py main.json parts.json attention.json
"""

from __future__ import annotations

import json
import sys

# The released training code of the paper, measured on one H200, PyTorch 2.11, CUDA 13.
REFERENCE = "eager 1.699 s/step, 2,411 tokens/s; torch.compile 1.392 s/step, 2,943 tokens/s, 102 GiB peak"
GOAL_TOKENS_PER_S = 3530  # 1.2x the compiled reference
GOAL_PEAK_GIB = 102.0


def main(paths: list[str]) -> int:
    rows = []
    for path in paths:
        try:
            data = json.load(open(path))
        except (OSError, ValueError) as exc:
            print(f"{path}: not read ({exc})")
            continue
        if "backends" in data:
            for name, b in data["backends"].items():
                print(f"attention {name:<9} " + (f"{b['ms']:8.2f} ms fwd+bwd {b['tflops']:7.1f} TFLOP/s"
                                                 if b["available"] else "unavailable"))
            continue
        for name, p in data["paths"].items():
            rows.append((path, name, p, data))
    if not rows:
        return 1
    print("TFLOP/s and MFU count attention's causal half, as the reference does (the JSON also has the full count)")
    print(f"{'file':<14} {'path':<14} {'s/step':>7} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} "
          f"{'first loss':>10}  goal")
    for path, name, p, data in rows:
        mem = p["peak_memory_gib"]
        goal = ""
        issue_shape = (data["model"]["hidden_size"] == 5280 and data["seq_len"] == 4096 and data["micro_batch"] == 1
                       and data["depth"] == [24, 8] and "H200" in data["device"].upper())
        if issue_shape and not name.startswith("plain-"):
            goal = ("MET" if p["tokens_per_s"] >= GOAL_TOKENS_PER_S and mem is not None and mem <= GOAL_PEAK_GIB
                    else "not met") + f" (>= {GOAL_TOKENS_PER_S} tok/s, <= {GOAL_PEAK_GIB:g} GiB)"
        print(f"{path.split('/')[-1]:<14} {name:<14} {p['step_s']:7.3f} {p['tokens_per_s']:9,.0f} {p['tflops_causal']:8.1f} "
              f"{100 * p['mfu_causal']:5.1f}% {mem if mem is None else round(mem, 1)!s:>8} {p['losses'][0]:10.4f}  {goal}")
    print(f"reference (the paper's released code, one H200): {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
