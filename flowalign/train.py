"""``flowalign train --config FILE [--key value ...]``: fine-tune with AC-Flow, ORW-CFM-W2 or Flow-GRPO.

Every key of ``flowalign.ACFlowConfig`` can be set in the YAML file or overridden on the command line
(``--iterations 20 --algorithm orw``). Several processes / GPUs::

    accelerate launch --num_processes 2 -m flowalign.cli train --config samples/configs/acflow_shapes.yaml
"""

from __future__ import annotations

import argparse
import json

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file of ACFlowConfig keys (default: all defaults).")
    parser.epilog = "Any ACFlowConfig key may follow as --key value (e.g. --iterations 20 --algorithm orw)."


def parse_overrides(extra: list[str]) -> dict:
    from flowalign.trainer import parse_override

    overrides, i = {}, 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise SystemExit(f"flowalign train: expected --key value, got {token!r}.")
        key, _, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not value:
            if i + 1 >= len(extra):
                raise SystemExit(f"flowalign train: --{key} needs a value.")
            value, i = extra[i + 1], i + 1
        try:
            overrides[key] = parse_override(key, value)
        except ValueError as err:
            raise SystemExit(f"flowalign train: {err}") from None
        i += 1
    return overrides


def run(args: argparse.Namespace) -> int:
    from flowalign.trainer import ACFlowConfig, ACFlowTrainer

    overrides = parse_overrides(getattr(args, "overrides", []))
    try:
        config = ACFlowConfig.from_yaml(args.config, overrides) if args.config else ACFlowConfig.from_dict(overrides)
    except ValueError as err:
        raise SystemExit(f"flowalign train: {err}") from None
    trainer = ACFlowTrainer(config)
    result = trainer.train()
    if trainer.is_main:
        print(json.dumps(result, indent=1))
    return 0
