"""`rdhpc prep` subcommands: tokenizer, shards, verify, inspect, synthetic."""

from __future__ import annotations


def _size(text: str) -> int:
    return int(float(text))


def add_prep_parser(sub) -> None:
    prep = sub.add_parser("prep", help="data preparation: tokenizer, shards, verify, inspect, synthetic")
    stages = prep.add_subparsers(dest="stage", metavar="STAGE", required=True)

    p = stages.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--sample-bytes", type=_size, default=1 << 30, help="train on at most this much text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default="text")
    p.set_defaults(func=_tokenizer)

    p = stages.add_parser("shards", help="tokenize and pack inputs into Arrow shards")
    p.add_argument("--input", nargs="+", required=True, action="extend",
                   help="inputs: PATH or NAME=PATH (file, directory or glob); NAME groups a mixture source")
    p.add_argument("--weight", nargs="+", default=[], action="extend", metavar="NAME=W",
                   help="up-sample a source: floor(W) copies plus a seeded fraction")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--seq-len", type=int, required=True, help="L: rows hold L + 1 tokens")
    p.add_argument("--out", required=True)
    p.add_argument("--pack", choices=["drop", "carry"], default="drop")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes on this machine (per rank)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--rows-per-shard", type=int, default=8192)
    p.add_argument("--piece-bytes", type=_size, default=64 << 20, help="input bytes per task (parallelism only)")
    p.add_argument("--strict", action="store_true", help="fail on the first malformed record instead of skipping")
    p.add_argument("--keep-all", nargs="+", default=[], action="extend", metavar="NAME",
                   help="drop packing keeps every token of these sources (chunked whole, the released code's "
                        "precious sources)")
    p.add_argument("--local-tmp", default=None, metavar="DIR",
                   help="node-local folder for intermediate files no other node reads (default $RDHPC_LOCAL_TMP; "
                        "e.g. /mnt/bb/$USER on Frontier, /tmp or $SLURM_TMPDIR elsewhere)")
    p.add_argument("--pack-task-bytes", type=_size, default=512 << 20,
                   help="token bytes one pack task holds in memory (bounds memory; larger: fewer piece reads)")
    p.set_defaults(func=_shards)

    p = stages.add_parser("verify", help="check shards against their manifest (schema, counts, checksums)")
    p.add_argument("dir")
    p.add_argument("--no-checksums", action="store_true")
    p.set_defaults(func=lambda a: __import__("data_prep.inspect", fromlist=["verify"]).verify(
        a.dir, checksums=not a.no_checksums))

    p = stages.add_parser("inspect", help="decoded rows and a token histogram")
    p.add_argument("dir")
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--split", choices=["train", "val"], default="train")
    p.set_defaults(func=lambda a: __import__("data_prep.inspect", fromlist=["inspect"]).inspect(
        a.dir, rows=a.rows, split=a.split))

    p = stages.add_parser("synthetic", help="a built-in reasoning task: training documents and held-out evaluation "
                                            "files of increasing difficulty")
    p.add_argument("--task", default="chains", help="chains: variable chains to resolve, one hop per link (` b q; q3.` "
                                                    "/ `? b3`); compose: a digit through a word of fixed digit "
                                                    "permutations (`? 3 a c b=7`), one per operation")
    p.add_argument("--out", required=True, help="folder for train.jsonl, eval-<task>-h<k>.jsonl, tasks.json")
    p.add_argument("--train-docs", type=int, default=20000, help="training documents (one problem each)")
    p.add_argument("--eval-examples", type=int, default=200, help="held-out examples per difficulty")
    p.add_argument("--train-difficulty", default="1-4", metavar="LO-HI",
                   help="hops (chains) or operations (compose) asked in training")
    p.add_argument("--eval-difficulty", default="1-8", metavar="LO-HI",
                   help="difficulty of the held-out files, one file per value (beyond the training range: "
                        "extrapolation)")
    p.add_argument("--chains", default="3-6", metavar="LO-HI", help="chains per problem (the answer is one of "
                                                                     "their distinct digits)")
    p.add_argument("--max-variables", type=int, default=24, help="variables per problem, at most 26")
    p.add_argument("--no-recall", dest="recall", action="store_false",
                   help="leave out the direct lookups (`! h b`, every statement again) after a document's queries")
    p.add_argument("--operations", type=int, default=3, help="compose: how many permutations (named a, b, ...)")
    p.add_argument("--traced", type=float, default=0.3,
                   help="compose: share of the training lines that show every intermediate digit (`! 3 a7 c2 b9`)")
    p.add_argument("--lines", type=int, default=8, help="compose: problems per training document")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synthetic)


def _tokenizer(args) -> int:
    from data_prep.tokenizer_train import train_tokenizer

    train_tokenizer(args.input, args.vocab_size, args.out, args.sample_bytes, args.seed, args.text_field)
    return 0


def _shards(args) -> int:
    import sys

    from data_prep.shards import ShardSettings, run_shards

    settings = ShardSettings(inputs=args.input, weights=args.weight, tokenizer=args.tokenizer, seq_len=args.seq_len,
                             out=args.out, pack=args.pack, val_fraction=args.val_fraction, seed=args.seed,
                             workers=args.workers, text_field=args.text_field, rows_per_shard=args.rows_per_shard,
                             piece_bytes=args.piece_bytes, strict=args.strict, keep_all=args.keep_all,
                             local_tmp=args.local_tmp, pack_task_bytes=args.pack_task_bytes)
    run_shards(settings, command=["rdhpc", *sys.argv[1:]])
    return 0


def _synthetic(args) -> int:
    from data_prep.synthetic import SyntheticSettings, generate, parse_range

    chains = parse_range("--chains", args.chains)
    settings = SyntheticSettings(task=args.task, out=args.out, train_docs=args.train_docs,
                                 eval_examples=args.eval_examples,
                                 train_difficulty=parse_range("--train-difficulty", args.train_difficulty),
                                 eval_difficulty=parse_range("--eval-difficulty", args.eval_difficulty),
                                 min_chains=chains[0], max_chains=chains[1], max_variables=args.max_variables,
                                 recall=args.recall, operations=args.operations, traced=args.traced,
                                 lines=args.lines, seed=args.seed)
    generate(settings)
    return 0
