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
    "train": ("flowalign.train", "Fine-tune a flow model on a reward: AC-Flow, ORW-CFM-W2, Flow-GRPO, DiffusionNFT or AWM."),
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
    for name, (_, help_text) in SUBCOMMANDS.items():
        # Only listed here: a subcommand's arguments are added by main, from its module, so the top level's
        # --help imports nothing heavy.
        sub.add_parser(name, help=help_text, description=help_text)
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
    parser.parse_args(argv)  # --help, --version, or an unknown command (an error naming the choices)
    parser.print_help()  # no command given
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
