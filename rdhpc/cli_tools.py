"""The `rdhpc` subcommands that work on checkpoints and runs after training: eval, generate, export,
plan, tensorboard. Each is a thin entry point into its library module; imports happen on use.

    rdhpc eval runs/x/checkpoints --data shards/ --steps 1,2,4,8,16,32,64
    rdhpc generate runs/x/checkpoints --prompt "def main(" --steps 32 --exit-threshold 5e-4
    rdhpc export runs/x/checkpoints --format huginn --out huginn/
    rdhpc plan configs/huginn-3.5b-frontier.yaml --gpus 4096 --gpu-type mi250x --tokens 800e9
    rdhpc tensorboard runs/x
"""

from __future__ import annotations

import argparse
import json


def _number(text: str) -> float:
    """800e9, 8e11, 800B, 1.2T, 4096."""
    suffixes = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    text = text.strip().replace("_", "").replace(",", "")
    scale = suffixes.get(text[-1:].lower(), None)
    try:
        return float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 800e9 or 800B)") from None


def cmd_eval(args) -> int:
    from rdhpc.eval.depth_eval import parse_depths, run_eval

    if args.tasks:
        from rdhpc.eval.tasks import run_task_eval

        run_task_eval(args.checkpoint, args.tasks, parse_depths(args.steps), args.exit_threshold or [], out=args.out,
                      examples=args.examples, max_new_tokens=args.max_new_tokens, batch_examples=args.batch_size,
                      tokenizer=args.tokenizer, seed=args.seed, device=args.device)
        return 0

    run_eval(args.checkpoint, args.data, parse_depths(args.steps), out=args.out, split=args.split,
             max_rows=args.max_rows, batch_size=args.batch_size, init_scale=args.init_scale, seed=args.seed or 0,
             device=args.device)
    return 0


def cmd_generate(args) -> int:
    from rdhpc.generate import GenerationConfig, generate_text

    config = GenerationConfig(num_steps=args.steps, max_new_tokens=args.max_new_tokens,
                              exit_threshold=args.exit_threshold, cache_slots=args.cache_slots,
                              warm_start=args.warm_start, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, init_scale=args.init_scale, seed=args.seed)
    results = generate_text(args.checkpoint, args.prompt, config, tokenizer=args.tokenizer,
                            add_bos=not args.no_bos, device=args.device, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_export(args) -> int:
    from rdhpc.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.out, args.format, dtype=args.dtype, tokenizer=args.tokenizer,
                      force=args.force)
    return 0


def cmd_plan(args) -> int:
    from rdhpc.plan import plan_from_config

    plan = plan_from_config(args.config, args.overrides, gpus=args.gpus, gpu_type=args.gpu_type, tokens=args.tokens,
                            mfu=args.mfu, micro_batch=args.micro_batch)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.report())
    return 0


def cmd_tensorboard(args) -> int:
    from rdhpc.monitor.tensorboard import serve

    return serve(args.run_dir, port=args.port, login_host=args.login_host)


def add_tool_parsers(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity against recurrence depth (table, JSON, PNG, "
                                    "TensorBoard)")
    p.add_argument("checkpoint", help="DeepSpeed checkpoint (folder with 'latest', a stepN folder or the run "
                                      "folder), an exported .safetensors file or a released-layout folder")
    p.add_argument("--data", help="shard folder made by `rdhpc prep shards` (default: the data the checkpoint's "
                                  "run validated on, data.val_dir or data.train_dir)")
    p.add_argument("--steps", default="1,2,4,8,16,32,64", help="comma-separated recurrence depths")
    p.add_argument("--split", choices=["val", "train"], default="val")
    p.add_argument("--max-rows", type=int, default=256, help="evaluate N rows spread evenly over the split")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--init-scale", type=float, default=1.0, help="initial-state scale (0: the zero state)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the initial-state noise (default: 0; with --tasks, the run's train.seed)")
    p.add_argument("--out", default=None, help="output folder (default RUN/eval/TAG or NAME-eval beside the file)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", nargs="+", metavar="[NAME=]FILE",
                   help="task accuracy against depth instead of the loss: task files of JSON lines (generation "
                        "{prompt, target} or multiple choice {prompt, choices, answer}; `rdhpc prep synthetic`)")
    p.add_argument("--exit-threshold", type=float, action="append", metavar="T",
                   help="with --tasks: also early exit at this KL threshold (repeatable; the paper's 5e-4)")
    p.add_argument("--examples", type=int, default=256, help="with --tasks: the first N examples of each task")
    p.add_argument("--max-new-tokens", type=int, default=16, help="with --tasks: a longer target counts as wrong")
    p.add_argument("--tokenizer", default=None, help="with --tasks: default the checkpoint's")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generation with a KV cache, per-token early exit, shared cache, warm start")
    p.add_argument("checkpoint", help="any checkpoint kind `rdhpc eval` reads")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--steps", type=int, default=32, help="recurrence depth (maximum with --exit-threshold)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--exit-threshold", type=float, default=None,
                   help="per-token early exit when KL(p_i || p_{i-1}) falls below this (paper: 5e-4)")
    p.add_argument("--cache-slots", type=int, default=None, help="k: iteration i uses KV-cache slot i mod k")
    p.add_argument("--warm-start", action="store_true", help="a token's initial state is the previous final state")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--init-scale", type=float, default=0.0, help="initial-state scale (0: the zero state)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one recorded with the checkpoint)")
    p.add_argument("--no-bos", action="store_true", help="do not start the prompt with the BOS token")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (any lengths: left-padded)")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="ZeRO checkpoint (any stage) -> one safetensors file or the released Huginn "
                                      "layout, and back")
    p.add_argument("checkpoint", help="any checkpoint kind `rdhpc eval` reads")
    p.add_argument("--out", required=True, help="FILE.safetensors, or a folder for --format huginn")
    p.add_argument("--format", choices=["safetensors", "huginn"], default="safetensors")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: as stored (fp32 masters)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to record / copy (default: the run's)")
    p.add_argument("--force", action="store_true", help="replace an existing export at --out (never the source)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="parameters, FLOPs, memory per GPU by ZeRO stage, step time and days of a run")
    p.add_argument("config", help="YAML run configuration")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (MI250X: dies) in the run")
    p.add_argument("--gpu-type", choices=["mi250x", "h100", "h200", "a100"], required=True)
    p.add_argument("--tokens", type=_number, required=True, help="training tokens, e.g. 800e9 or 800B")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation to assume (default per GPU type)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per pass (default: the config's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("tensorboard", help="serve a run's TensorBoard on 127.0.0.1 and a free port (until Ctrl-C)")
    p.add_argument("run_dir", help="run folder (or any folder with event files below it)")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--login-host", default=None,
                   help="the cluster's login host, for the ssh tunnel command (default: $RDHPC_LOGIN_HOST)")
    p.set_defaults(func=cmd_tensorboard)
