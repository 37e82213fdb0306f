"""`phi3 train pretrain|sft|dpo|plot` and `phi3 data tokenize`: argument parsing only."""

from __future__ import annotations

import argparse


def cmd_train(args) -> int:
    from .config import load_config
    from .loop import train

    cfg = load_config(args.config)  # validated before any work starts
    if args.task == "pretrain":
        from .pretrain import PretrainTask as task
    elif args.task == "sft":
        from .sft import SFTTask as task
    else:
        from .dpo import DPOTask as task
    run = train(cfg, task, resume=args.resume, progress=not args.no_progress)
    print(f"trained {run}: metrics in {run / 'metrics.jsonl'}, checkpoints in {run / 'checkpoints'}")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run

    out = plot_run(args.run, args.output)
    print(f"wrote {out}")
    return 0


def cmd_tokenize(args) -> int:
    from ..data.tokenize import tokenize

    index = tokenize(args.sources, args.out, tokenizer=args.tokenizer, text_field=args.text_field,
                     workers=args.workers, progress=not args.no_progress)
    print(f"wrote {len(index['shards'])} shards, {index['tokens']} tokens ({index['dtype']}) to {args.out}")
    return 0


def add_train(sub) -> None:
    train = sub.add_parser("train", help="pretrain, SFT, DPO (one process or torchrun); plot a run")
    tsub = train.add_subparsers(dest="task", required=True)
    for task, help_ in (("pretrain", "phases of token budgets over data mixtures"),
                        ("sft", "supervised fine-tuning on chat JSONL (loss on assistant tokens)"),
                        ("dpo", "direct preference optimisation on prompt/chosen/rejected JSONL")):
        p = tsub.add_parser(task, help=help_)
        p.add_argument("config", help="YAML training config")
        p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=cmd_train)
    p = tsub.add_parser("plot", help="loss curves of a run as PNG")
    p.add_argument("run", help="run directory (with metrics.jsonl)")
    p.add_argument("-o", "--output", default=None, help="PNG path (default: RUN/loss.png)")
    p.set_defaults(func=cmd_plot)


def add_data_tokenize(data_sub) -> None:
    p = data_sub.add_parser("tokenize", help="JSONL / Parquet / text files -> packed token shards")
    p.add_argument("sources", nargs="+", help="files or directories (JSONL and Parquet: field `text`)")
    p.add_argument("--out", "-o", required=True, help="output directory (index.json + NNNNN.bin)")
    p.add_argument("--tokenizer", default=None, help="HF directory or .gguf (default: the default model's)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--workers", "-j", type=int, default=1, help="parallel processes over files")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_tokenize)


def add_parsers(sub: argparse._SubParsersAction, data_verbs: argparse._SubParsersAction | None = None) -> None:
    """`train …`, and `data tokenize` (under an existing `data` parser's verbs when given)."""
    add_train(sub)
    if data_verbs is None:
        data = sub.add_parser("data", help="data preparation")
        data_verbs = data.add_subparsers(dest="data_command", required=True)
    add_data_tokenize(data_verbs)
