"""``flowalign bench ...``: benchmarks, kept apart from the tests.

Each benchmark is a module of this package (``rlg``, ``rewards``, ``train``) exposing
``add_arguments(parser)`` and ``run(args) -> int``. Benchmarks measure speed as ratios against a
baseline run in the same process (machines are noisy), and print JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "rlg": "RLG sampling: stock CFG vs RLG exact / approximate modes vs a reference-style loop.",
    "rewards": "Reward plug-ins: images/s and wrapper overhead.",
    "train": "The fine-tuning frontier: held-out reward gain vs measured KL (nats per image) and diversity, per method and kl_coef.",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, help_text in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(f"flowalign.bench.{name}")
        except ModuleNotFoundError as err:  # benchmark not written yet
            if err.name != f"flowalign.bench.{name}":
                raise
            p.set_defaults(_bench_missing=name)
            continue
        module.add_arguments(p)
        p.set_defaults(_bench_module=module)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_bench_missing", None):
        raise SystemExit(f"flowalign bench {args._bench_missing}: this benchmark is not available yet.")
    return int(args._bench_module.run(args) or 0)
