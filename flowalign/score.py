"""``flowalign score``: score a folder of images with one or more rewards.

The folder is what ``flowalign sample`` writes: images plus a ``metadata.jsonl`` with one JSON
object per image, at least ``{"file": <path relative to the folder>, "prompt": ...}`` and often
``"scale"`` and ``"seed"``. A plain folder of images works too, with ``--prompts FILE`` (one prompt
per line, in the sorted order of the file names) or with prompt-free rewards only.

Per-image scores go to CSV or JSONL (every metadata field kept, one column per reward, plus
``total`` when several rewards are mixed), and a summary table prints the mean and standard
deviation overall, per prompt and per scale.

Example::

    flowalign score --reward pickscore=0.7 --reward aesthetic=0.3 --normalize zscore \\
        --images samples/run1 --out samples/run1/scores.csv
    flowalign score --reward "hpsv2.1(checkpoint=/ckpt/HPS_v2.1_compressed.pt)" --images samples/run1/metadata.jsonl
    flowalign score --reward jpeg_compressibility --images my_pngs/
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from flowalign.rewards import available, combine, load, parse_reward_spec  # the reward models load only when used

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[(K=V,...)][=WEIGHT]",
        help="A reward to compute; repeat for several. Weights (default 1) combine them into 'total'. "
        f"Options go to the loader, e.g. 'hpsv2.1(checkpoint=/ckpt/hps)=0.5'. Names: {', '.join(available())}.",
    )
    parser.add_argument(
        "--images", required=True, help=f"Folder of images (with or without {METADATA_FILE}) or a metadata .jsonl file."
    )
    parser.add_argument(
        "--prompts",
        default=None,
        help="Text file, one prompt per line (sorted image order); replaces metadata prompts.",
    )
    parser.add_argument("--out", default=None, help="Output .csv or .jsonl (default: <folder>/scores.csv).")
    parser.add_argument(
        "--normalize",
        choices=["none", "zscore"],
        default="none",
        help="Combine rewards into 'total' raw (none) or z-scored over all images (zscore).",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="Images read and scored at once (default 32).")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
    parser.add_argument("--max-groups", type=int, default=40, help="At most this many prompt rows in the table.")


# -- reading the folder ----------------------------------------------------------------------------
def read_entries(images: str | Path, prompts_file: str | Path | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """The images to score as ``(folder, entries)``, each entry a dict with ``"file"`` (relative to the
    folder), ``"prompt"`` (or None) and any other metadata fields."""
    source = Path(images).expanduser()
    if source.is_file():
        folder, metadata = source.parent, source
    elif source.is_dir():
        folder, metadata = source, source / METADATA_FILE
        if not metadata.is_file():
            metadata = None
    else:
        raise FileNotFoundError(f"--images {source}: no such folder or file.")

    if metadata is not None:
        entries = _read_metadata(metadata)
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(
                f"--images {folder}: no {METADATA_FILE} and no images ({', '.join(IMAGE_SUFFIXES)})."
            )
        entries = [{"file": p.name, "prompt": None} for p in files]

    if prompts_file is not None:
        prompts = [line.rstrip("\n") for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        if len(prompts) != len(entries):
            raise ValueError(f"--prompts {prompts_file} has {len(prompts)} prompts for {len(entries)} images.")
        for entry, prompt in zip(entries, prompts):
            entry["prompt"] = prompt

    missing = [e["file"] for e in entries if not (folder / e["file"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images listed in the metadata are missing from {folder}: {missing[:5]}."
        )
    return folder, entries


def _read_metadata(path: Path) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not valid JSON ({err.msg}).") from None
        if not isinstance(entry, dict) or "file" not in entry:
            raise ValueError(f'{path}:{number} needs a JSON object with a "file" field; got {line[:80]!r}.')
        entry.setdefault("prompt", None)
        entries.append(entry)
    if not entries:
        raise ValueError(f"{path} lists no images.")
    return entries


def _batches(entries: Sequence[dict[str, Any]], size: int) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(entries), size):
        yield entries[start : start + size]


# -- scoring ---------------------------------------------------------------------------------------
def score_entries(
    folder: Path, entries: list[dict[str, Any]], rewards: Sequence, batch_size: int = 32, progress: bool = True
) -> dict[str, list[float]]:
    """Raw scores ``{reward name: [score per entry]}`` (images read ``batch_size`` at a time)."""
    names = [reward.name for reward in rewards]
    scores: dict[str, list[float]] = {name: [] for name in names}
    for batch in tqdm(list(_batches(entries, batch_size)), desc="scoring", unit="batch", disable=not progress):
        images = []
        for entry in batch:
            with Image.open(folder / entry["file"]) as image:
                images.append(image.convert("RGB"))
        prompts = [entry["prompt"] for entry in batch]
        for name, reward in zip(names, rewards):
            needs = reward.requires_prompts
            if needs and any(p is None for p in prompts):
                raise ValueError(
                    f"{name} scores images against prompts, but some images have none: "
                    f"pass --prompts FILE or a folder with {METADATA_FILE}."
                )
            scores[name].extend(reward(images, prompts if needs else None).float().cpu().tolist())
    return scores


def write_scores(path: Path, entries: list[dict[str, Any]], columns: dict[str, list[float]]) -> None:
    """Write one row per image: its metadata fields, then one column per score."""
    rows = [{**entry, **{name: values[i] for name, values in columns.items()}} for i, entry in enumerate(entries)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    elif path.suffix.lower() == ".csv":
        fields = list(dict.fromkeys(key for row in rows for key in row))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"--out {path}: use a .csv or .jsonl file name.")


def summarize(
    entries: list[dict[str, Any]], columns: dict[str, list[float]], max_groups: int = 40
) -> list[dict[str, Any]]:
    """Summary rows ``{"group", "n", <column>: (mean, std)}``: overall, per prompt, per scale.

    ``std`` is the sample standard deviation (``nan`` for a single image).
    """
    def row(label: str, indices: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {"group": label, "n": len(indices)}
        for name, values in columns.items():
            selected = np.asarray([values[i] for i in indices], dtype=np.float64)
            out[name] = (float(selected.mean()), float(selected.std(ddof=1)) if len(selected) > 1 else math.nan)
        return out

    rows = [row("all", list(range(len(entries))))]
    for key, label in (("scale", "scale = {}"), ("prompt", "{}")):
        groups: dict[Any, list[int]] = {}
        for i, entry in enumerate(entries):
            if entry.get(key) is not None:
                groups.setdefault(entry[key], []).append(i)
        if len(groups) < 2:  # one group is the "all" row again
            continue
        ordered = sorted(groups.items()) if key == "scale" else list(groups.items())
        for value, indices in ordered[:max_groups]:
            rows.append(row(label.format(value), indices))
        if len(ordered) > max_groups:
            rows.append({"group": f"... {len(ordered) - max_groups} more prompts (see the scores file)", "n": None})
    return rows


def print_summary(rows: list[dict[str, Any]], names: list[str]) -> None:
    table = Table(title="Reward scores (mean ± std)")
    table.add_column("group", overflow="fold")
    table.add_column("n", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for row in rows:
        cells = []
        for name in names:
            if name not in row:
                cells.append("")
                continue
            mean, std = row[name]
            mean = round(mean, 9) or 0.0  # no "-2e-17" for a z-scored mean of zero
            cells.append(f"{mean:.4g}" if math.isnan(std) else f"{mean:.4g} ± {std:.3g}")
        table.add_row(str(row["group"]), "" if row["n"] is None else str(row["n"]), *cells)
    console = Console()
    if not console.is_terminal:  # files and pipes: wide enough for prompts and reward names
        console = Console(width=160)
    console.print(table)


def run(args: argparse.Namespace) -> int:
    folder, entries = read_entries(args.images, args.prompts)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    specs = [parse_reward_spec(spec) for spec in args.reward]
    rewards = []
    for spec in specs:
        reward = load(spec.name, **spec.kwargs)
        if "batch_size" not in spec.kwargs:
            reward.batch_size = args.batch_size
        rewards.append(reward.to(device))
    # One column per reward; repeated names get a suffix (clipscore, clipscore_2).
    seen: dict[str, int] = {}
    for reward in rewards:
        seen[reward.name] = seen.get(reward.name, 0) + 1
        if seen[reward.name] > 1:
            reward.name = f"{reward.name}_{seen[reward.name]}"

    scores = score_entries(folder, entries, rewards, batch_size=args.batch_size)
    columns = dict(scores)
    if len(rewards) > 1 or specs[0].weight != 1.0 or args.normalize != "none":
        normalize = None if args.normalize == "none" else args.normalize
        values = [torch.tensor(scores[r.name], dtype=torch.float64) for r in rewards]
        columns["total"] = combine(values, [s.weight for s in specs], normalize).tolist()

    out = Path(args.out) if args.out else folder / "scores.csv"
    write_scores(out, entries, columns)
    print_summary(summarize(entries, columns, args.max_groups), list(columns))
    print(f"Wrote {len(entries)} rows to {out}")
    return 0
