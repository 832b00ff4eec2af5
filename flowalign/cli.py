"""The ``flowalign`` command line.

Each subcommand lives in the module that owns its concept and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. The modules are imported only when their
subcommand is used, so ``flowalign --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flowalign import __version__

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("flowalign.demo", "Run the end-to-end demo on the embedded tiny base model."),
    "eval": ("flowalign.shapes_eval", "Per-family verifier accuracies of a model on held-out shapes prompts."),
    "pretrain": ("flowalign.pretrain", "Pretrain the tiny SD3 base model on the shapes world."),
    "sample": ("flowalign.sample", "Sample images with RLG at several alignment scales."),
    "score": ("flowalign.score", "Score a folder of images with one or more reward models."),
    "train": ("flowalign.train", "Fine-tune a flow model with AC-Flow (or ORW-CFM-W2 / Flow-GRPO)."),
    "bench": ("flowalign.bench", "Benchmarks (rlg, rewards, train); not tests."),
    "probe-reward": ("flowalign.probe", "Is a reward learnable at a batch size? The split-half policy-gradient cosine."),
    "plan": ("flowalign.plan", "Peak GPU memory of each training stage, traced on the meta device (no weights)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowalign",
        description="Align text-to-image flow-matching models with reward models.",
    )
    parser.add_argument("--version", action="version", version=f"flowalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Arguments are added lazily (see main) so --help of the top level imports nothing heavy.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        sub = argparse.ArgumentParser(prog=f"flowalign {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
        module.add_arguments(sub)
        args = sub.parse_args(argv[1:])
        return int(module.run(args) or 0)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
