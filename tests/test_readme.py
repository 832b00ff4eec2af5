"""Every code block of README.md runs, so the README cannot go stale.

- ``bash`` blocks that install (``pip install ...``) are the commands ``.ci/run`` executes: the test
  checks that README's test command is exactly the one in ``.ci/run``, and that the demo command
  installs the same way.
- ``python`` and the other ``bash`` blocks run for real, with the documented substitution of real
  models by tiny local ones (``SUBSTITUTIONS`` below): a hub id of SD3.5-M becomes a tiny SD3
  pipeline folder, a Flow-GRPO LoRA a tiny LoRA, PickScore a tiny PickScore checkpoint, and every
  count of steps / iterations / prompts is shrunk so the block runs in seconds.
"""

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from flowalign.demo import grid_size, markdown_table

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.DOTALL)


def blocks(lang):
    return [code for kind, code in BLOCKS if kind == lang]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory, tiny_pipeline, tiny_reward_checkpoints):
    """Tiny stand-ins for the real models the README names, saved in their real formats."""
    from peft import LoraConfig, get_peft_model_state_dict

    root = tmp_path_factory.mktemp("readme")
    pipe = tiny_pipeline(seed=0, num_layers=1)
    pipe.save_pretrained(root / "sd35m")
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    # A PEFT adapter folder, as Flow-GRPO publishes it.
    from peft import PeftModel  # noqa: F401  (format check below)
    from safetensors.torch import save_file

    lora = root / "flow-grpo-lora"
    lora.mkdir()
    state = {f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(pipe.transformer).items()}
    save_file(state, lora / "adapter_model.safetensors")
    config = pipe.transformer.peft_config["default"]
    config.base_model_name_or_path = None
    config.save_pretrained(lora)
    pick = tiny_reward_checkpoints("pickscore")["pickscore"]
    (root / "prompts.txt").write_text("a photo of a red circle\na photo of two squares\n")
    return {"root": root, "sd35m": root / "sd35m", "lora": lora, "pickscore": pick}


# Every count shrunk so that a documented training command runs in seconds.
SMOKE_RUN = ("--iterations 1 --eval-prompts 0 --sample-steps 2 --prompts-per-iteration 2 --images-per-prompt 2 "
             "--inner-epochs 1 --noise-draws 1")


def substitutions(world):
    """Real name in the README -> tiny stand-in (documented in the module docstring)."""
    return [
        ('"stabilityai/stable-diffusion-3.5-medium"', repr(str(world["sd35m"]))),
        ("stabilityai/stable-diffusion-3.5-medium", str(world["sd35m"])),
        ('"jieliu/SD3.5M-FlowGRPO-PickScore"', repr(str(world["lora"]))),
        ("jieliu/SD3.5M-FlowGRPO-PickScore", str(world["lora"])),
        ('rewards.load("pickscore")', (f"rewards.load('pickscore', model={str(world['pickscore']['model'])!r}, "
                                       f"processor={str(world['pickscore']['processor'])!r})")),
        ("samples/prompts/drawbench_mini.txt", str(world["root"] / "prompts.txt")),
        ('device="cuda"', 'device="cpu"'),
        # the tiny stand-in has no T5 encoder: stock diffusers then needs these two None components
        ("torch_dtype=torch.bfloat16", "torch_dtype=torch.float32, text_encoder_3=None, tokenizer_3=None"),
        ("--reward pickscore ", (f"--reward 'pickscore(model={world['pickscore']['model']},"
                                 f"processor={world['pickscore']['processor']})' ")),
        (".to(\"cuda\")", ".to(\"cpu\")"),
        ("num_inference_steps=28", "num_inference_steps=2"),
        ("--steps 28", "--steps 2"),
        ("--iterations 40", SMOKE_RUN),
        ("--config samples/configs/acflow_jpeg.yaml", f"--config samples/configs/acflow_jpeg.yaml {SMOKE_RUN}"),
        ("--n-prompts 300", "--n-prompts 6"),
        ("max_sequence_length=256", "max_sequence_length=1"),
    ]


def substitute(code, world):
    for real, tiny in substitutions(world):
        code = code.replace(real, tiny)
    return code


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    install = [c for c in blocks("bash") if "pip install" in c]
    assert len(install) >= 2, "README must show the demo and the test commands"
    test_cmd = next(c.strip() for c in install if "pytest" in c)
    demo_cmd = next(c.strip() for c in install if "flowalign demo" in c)
    assert test_cmd in ci
    assert demo_cmd.split(" && flowalign demo")[0].replace("pip install -e .", "") in test_cmd


def _checkout_outputs(code: str) -> dict[Path, bool]:
    """The checkout paths where a block's relative outputs would land if it ran in the checkout (every ``--out``,
    the ``output_dir`` of every ``--config``, ``output_dir=`` / ``"output_dir": ...`` in Python), and whether each
    exists now. Only these are watched: other jobs may write elsewhere under the checkout's ``runs/`` meanwhile."""
    names = re.findall(r"--out\s+(\S+)", code) + re.findall(r"""output_dir["']?\s*[:=]\s*["']([^"']+)["']""", code)
    for config in re.findall(r"--config\s+(\S+)", code):
        names.append(yaml.safe_load((ROOT / config).read_text())["output_dir"])
    return {ROOT / name: (ROOT / name).exists() for name in names if not Path(name).is_absolute()}


def local_paths(code):
    """Repository-relative inputs (``samples/...``) become absolute, so that a block runs in a temporary folder
    and its outputs (``runs/...``, ``outputs/...``) land there, never in the checkout."""
    return code.replace("samples/", f"{ROOT / 'samples'}/")


@pytest.mark.slow
def test_readme_python_blocks_run(tiny_world, tmp_path, monkeypatch):
    """The python blocks run in order in one namespace, as a reader would paste them into one session."""
    monkeypatch.chdir(tmp_path)
    before = _checkout_outputs("".join(blocks("python")))
    assert ROOT / "runs" / "readme" in before
    namespace = {"__name__": "__readme__"}
    for index, code in enumerate(blocks("python")):
        exec(compile(local_paths(substitute(code, tiny_world)), f"README.md python block {index}", "exec"), namespace)  # noqa: S102 (the README runs as written)
    assert (tmp_path / "runs" / "readme" / "checkpoints" / "latest").is_file()  # the training block's run, here
    assert {p: p.exists() for p in before} == before, "a README block wrote into the checkout"


CLI_BLOCKS = [c for c in blocks("bash") if "pip install" not in c and c.strip().startswith(("flowalign", "accelerate"))]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CLI_BLOCKS)))
def test_readme_cli_blocks_run(index, tiny_world, tmp_path):
    before = _checkout_outputs(CLI_BLOCKS[index])
    code = local_paths(substitute(CLI_BLOCKS[index], tiny_world))
    for line in [l for l in code.replace("\\\n", " ").splitlines() if l.strip() and not l.startswith("#")]:
        args = shlex.split(line)
        if args[0] == "accelerate":  # two CPU processes, as the README says for a CPU machine
            cmd = [sys.executable, "-m", "accelerate.commands.launch", *args[2:]]
        else:
            cmd = [sys.executable, "-m", "flowalign.cli", *args[1:]]
        proc = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True,
                              timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
        if "train" in args:  # the documented effect: a checkpoint of the run in its output_dir (relative: here)
            output_dir = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())["output_dir"]
            assert (tmp_path / output_dir / "checkpoints" / "latest").is_file(), proc.stdout[-2000:]
        if args[:2] == ["flowalign", "eval"]:  # the documented output: the accuracy table
            assert "| **all** |" in proc.stdout, proc.stdout[-2000:]
    assert {p: p.exists() for p in before} == before, "a README block wrote into the checkout"


@pytest.mark.committed
def test_readme_demo_section_is_the_committed_demo():
    """The README shows the committed samples/demo/: its table is results.csv, its figures are the demo's files,
    and the gain it quotes is the report's."""
    demo = ROOT / "samples" / "demo"
    with open(demo / "results.csv") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    assert markdown_table(rows) in README, "README's demo table is not samples/demo/results.csv; copy it again"
    settings = json.loads((demo / "settings.json").read_text())
    sizes = {"grid.png": grid_size(settings["grid_rows"], len(settings["scales"])), "plot.png": (1000, 380)}
    for name, size in sizes.items():  # each link opens the demo's figure: decoded, its size, not a blank canvas
        assert f"(samples/demo/{name})" in README
        image = Image.open(demo / name)
        assert image.size == size, (name, image.size)
        assert np.asarray(image.convert("L")).std() > 10, f"samples/demo/{name} is blank"
    gain = re.search(r"The training reward changes by ([+-]\d\.\d{4} ± \d\.\d{4})",
                     (demo / "report.md").read_text().replace("\n", " "))
    assert gain and gain.group(1) in README, "README quotes another w = 1 gain than samples/demo/report.md"


def test_readme_is_for_users():
    """About 250 lines; the benchmark narrative and the algorithm notes live in docs/, which it links."""
    assert len(README.splitlines()) <= 260
    for doc in ("docs/algorithms.md", "docs/benchmarks.md"):
        assert doc in README and (ROOT / doc).is_file()
    assert "## Benchmarks" not in README
