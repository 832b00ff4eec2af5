"""``flowalign demo``: the end-to-end demo on the embedded tiny base model.

For now it evaluates the embedded base model on held-out shapes prompts and prints its
per-family verifier accuracy; the full demo (AC-Flow fine-tuning, RLG sweep, report) builds on it.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-prompts", type=int, default=120, help="Held-out prompts to evaluate (default 120).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="A 30-prompt smoke version.")


def run(args: argparse.Namespace) -> int:
    from flowalign.tiny import evaluate, format_accuracy_table, load_base_pipeline

    pipe = load_base_pipeline()
    result = evaluate(pipe, n_prompts=30 if args.quick else args.n_prompts, seed=args.seed)
    print("Embedded tiny base model, held-out shapes prompts (20 Euler steps, CFG 5):")
    print(format_accuracy_table(result))
    return 0
