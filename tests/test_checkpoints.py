"""flowalign.checkpoints: crash-safe writes, safe loads, and resuming pretraining from the last checkpoint."""

import ast
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowalign import pretrain as pretrain_module
from flowalign.checkpoints import (atomic_write_dir, latest_checkpoint, load_state, resolve_checkpoint, save_state,
                                   write_pointer)
from flowalign.pretrain import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(folder: Path, iteration: int) -> None:
    """Two files, as a training checkpoint has (weights, then trainer_state.pt)."""
    save_state(folder / "weights.pt", {"w": torch.full((3,), float(iteration))})
    save_state(folder / "trainer_state.pt", {"iteration": iteration})


# -- atomic_write_dir / write_pointer ---------------------------------------------------------------
def test_exception_after_the_first_file_keeps_the_previous_checkpoint_and_pointer(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    atomic_write_dir(root / "iter-000001", lambda tmp: _checkpoint(tmp, 1))
    write_pointer(root, "iter-000001")

    def crash_midway(tmp: Path) -> None:
        save_state(tmp / "weights.pt", {"w": torch.zeros(3)})  # the first file is written ...
        raise RuntimeError("killed while writing")  # ... and the process dies before the second

    with pytest.raises(RuntimeError, match="killed while writing"):
        atomic_write_dir(root / "iter-000002", crash_midway)
    assert sorted(os.listdir(root)) == ["iter-000001", "latest"]  # no half folder, no temporary folder
    assert (root / "latest").read_text() == "iter-000001"
    previous = latest_checkpoint(tmp_path / "run")
    assert previous == root / "iter-000001"
    assert load_state(previous / "trainer_state.pt") == {"iteration": 1}  # resume from the previous one
    torch.testing.assert_close(load_state(previous / "weights.pt")["w"], torch.ones(3))

    # Rewriting an existing folder that fails midway leaves the old content whole as well.
    with pytest.raises(RuntimeError, match="killed while writing"):
        atomic_write_dir(root / "iter-000001", crash_midway)
    assert sorted(os.listdir(root)) == ["iter-000001", "latest"]
    assert sorted(os.listdir(root / "iter-000001")) == ["trainer_state.pt", "weights.pt"]
    torch.testing.assert_close(load_state(root / "iter-000001" / "weights.pt")["w"], torch.ones(3))


def test_atomic_write_dir_replaces_a_folder_whole_and_returns_it(tmp_path):
    target = tmp_path / "model"
    assert atomic_write_dir(target, lambda tmp: (tmp / "a.txt").write_text("1")) == target
    (target / "stale.txt").write_text("from the old version")
    atomic_write_dir(str(target), lambda tmp: (tmp / "sub").mkdir() or (tmp / "sub" / "b.txt").write_text("2"))
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["sub", "sub/b.txt"]
    assert os.listdir(tmp_path) == ["model"]  # neither the temporary nor the old folder is left behind


def test_atomic_write_dir_recovers_a_crash_between_its_two_renames(tmp_path):
    target = tmp_path / "model"
    (tmp_path / "model.old").mkdir()  # the state a crash leaves after `target -> target.old`, before `tmp -> target`
    (tmp_path / "model.old" / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        atomic_write_dir(target, lambda tmp: (_ for _ in ()).throw(RuntimeError("fails")))
    assert (target / "a.txt").read_text() == "old" and os.listdir(tmp_path) == ["model"]


def test_atomic_write_dir_removes_the_temporary_folder_of_a_killed_process(tmp_path):
    (tmp_path / ".model.tmp-k1ll3d").mkdir()  # what a process killed inside `write` leaves
    (tmp_path / ".model.tmp-k1ll3d" / "half.bin").write_bytes(b"x")
    (tmp_path / ".other.tmp-k1ll3d").mkdir()  # another target's: not ours to remove
    atomic_write_dir(tmp_path / "model", lambda tmp: (tmp / "a.txt").write_text("1"))
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-k1ll3d", "model"]


def test_atomic_write_dir_refuses_a_file_target(tmp_path):
    (tmp_path / "model").write_text("a file")
    with pytest.raises(NotADirectoryError, match="model is a file"):
        atomic_write_dir(tmp_path / "model", lambda tmp: None)


def test_write_pointer_points_only_at_a_complete_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="iter-000003 is not a folder; write the checkpoint folder"):
        write_pointer(tmp_path, "iter-000003")
    assert not (tmp_path / "latest").exists()
    with pytest.raises(ValueError, match="must be a folder name"):
        write_pointer(tmp_path, "../elsewhere")
    (tmp_path / "iter-000003").mkdir()
    write_pointer(tmp_path, "iter-000003")
    write_pointer(tmp_path, "iter-000003", pointer="best")
    assert (tmp_path / "latest").read_text() == "iter-000003" == (tmp_path / "best").read_text()
    assert sorted(os.listdir(tmp_path)) == ["best", "iter-000003", "latest"]


# -- resolve_checkpoint / latest_checkpoint -----------------------------------------------------------
def test_resolve_and_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None  # no run yet
    folder = run / "checkpoints" / "iter-000002"
    atomic_write_dir(folder, lambda tmp: _checkpoint(tmp, 2))
    assert latest_checkpoint(run) is None  # a complete folder, but no pointer yet
    write_pointer(run / "checkpoints", "iter-000002")
    assert resolve_checkpoint(run) == str(folder)  # the run's output_dir
    assert resolve_checkpoint(run / "checkpoints" / "latest") == str(folder)  # the pointer file
    assert resolve_checkpoint(folder) == str(folder)  # the folder itself
    assert resolve_checkpoint("org/some-lora") == "org/some-lora"  # a hub id passes through
    assert latest_checkpoint(run) == folder
    assert latest_checkpoint(run, marker="weights.pt") == folder
    assert latest_checkpoint(run, marker="critic") is None  # the folder lacks the marker
    (run / "checkpoints" / "latest").write_text("iter-000009")  # dangling pointer
    with pytest.raises(FileNotFoundError, match="names 'iter-000009', which is not a folder"):
        resolve_checkpoint(run)
    assert latest_checkpoint(run) is None  # resume then starts fresh


# -- save_state / load_state --------------------------------------------------------------------------
def test_state_round_trip_keeps_tensors_and_plain_values(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3), "rng": torch.Generator().manual_seed(3).get_state(), "step": 7,
             "elapsed": 1.5, "losses": [(50, 1.0, 0.25)], "config": {"lr": 1e-3, "out": "x", "resume": False},
             "none": None}
    save_state(tmp_path / "state.pt", state)
    loaded = load_state(tmp_path / "state.pt")
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["rng"], state["rng"])
    assert {k: v for k, v in loaded.items() if k not in ("w", "rng")} == {
        k: v for k, v in state.items() if k not in ("w", "rng")}
    assert os.listdir(tmp_path) == ["state.pt"]  # the temporary file was renamed, not left behind


class _RunsCode:
    """A pickle that runs a shell command when unpickled (what a malicious checkpoint would carry)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_load_state_refuses_a_crafted_pickle_without_running_it(tmp_path, writer):
    marker, path = tmp_path / "code-ran", tmp_path / "run" / "trainer_state.pt"
    path.parent.mkdir()
    state = {"iteration": 3, "payload": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(ValueError, match="not a flowalign state file") as info:
        load_state(path)
    assert str(path) in str(info.value) and "untrusted source" in str(info.value)
    assert not marker.exists(), "unpickling ran the payload's code"


def test_load_state_refuses_a_file_that_is_not_a_state_dict(tmp_path):
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="tensor.pt holds a Tensor, not a state dict"):
        load_state(tmp_path / "tensor.pt")


# -- no unpickling anywhere in the package --------------------------------------------------------------
def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """``file:line call`` for every ``torch.load`` without ``weights_only=True``, every ``pickle.load(s)`` /
    ``Unpickler`` and every ``allow_pickle=True`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        weights_only = keywords.get("weights_only")
        if owner == "torch" and name == "load" and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(f"{filename}:{node.lineno} torch.load without weights_only=True")
        if owner in ("pickle", "cPickle", "dill", "cloudpickle") and name in ("load", "loads", "Unpickler"):
            found.append(f"{filename}:{node.lineno} {owner}.{name}")
        allow = keywords.get("allow_pickle")
        if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
            found.append(f"{filename}:{node.lineno} allow_pickle={ast.unparse(allow)}")
    return found


def test_the_unpickling_scan_finds_what_it_looks_for():
    source = ("torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)\n"
              "pickle.loads(b)\nnp.load(p, allow_pickle=True)\nload_state(p)\n")
    assert unsafe_loads(source) == ["<source>:1 torch.load without weights_only=True",
                                    "<source>:2 torch.load without weights_only=True",
                                    "<source>:4 pickle.loads", "<source>:5 allow_pickle=True"]


def test_nothing_in_the_package_unpickles():
    files = [p for folder in ("flowalign", "rewards", "pipelines") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20 and ROOT / "flowalign" / "checkpoints.py" in files
    found = [hit for p in files for hit in unsafe_loads(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, "\n".join(found)


# -- pretraining: interrupted, then resumed -------------------------------------------------------------
def _config(tmp_path: Path, name: str, **changes) -> PretrainConfig:
    """A few pretraining steps, a checkpoint after every step, all inside the learning-rate warm-up (so the
    schedule depends on the step only, not on wall-clock time)."""
    values = dict(out=str(tmp_path / name), checkpoint=str(tmp_path / f"{name}-ckpt" / "checkpoint.pt"),
                  dataset_size=64, max_steps=5, batch_size=8, minutes=10, eval_prompts=0, ema_decay=0.5,
                  checkpoint_minutes=0.0, warmup_steps=200)
    return PretrainConfig(**{**values, **changes})


class _Steps:
    """Counts optimisation steps (one ``sample_sigmas`` call each); raises at step ``crash_at`` if given."""

    def __init__(self, crash_at: int | None = None):
        self.calls, self.crash_at = 0, crash_at

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError(f"killed at step {self.calls}")
        return real_sample_sigmas(*args, **kwargs)


real_sample_sigmas = pretrain_module.sample_sigmas


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def test_interrupted_pretraining_resumes_from_its_last_checkpoint_and_equals_the_uninterrupted_run(
        tmp_path, monkeypatch):
    steps = _Steps()
    monkeypatch.setattr(pretrain_module, "sample_sigmas", steps)
    uninterrupted = pretrain(_config(tmp_path, "whole"))
    assert steps.calls == 5

    monkeypatch.setattr(pretrain_module, "sample_sigmas", _Steps(crash_at=4))
    cfg = _config(tmp_path, "interrupted")
    with pytest.raises(RuntimeError, match="killed at step 4"):
        pretrain(cfg)
    ckpt = Path(cfg.checkpoint)
    assert os.listdir(ckpt.parent) == ["checkpoint.pt"]  # no temporary file left by the checkpoint writes
    assert load_state(ckpt)["step"] == 3  # the last complete checkpoint
    assert not Path(cfg.out).exists()  # the pipeline folder is written only at the end

    resumed_steps = _Steps()
    monkeypatch.setattr(pretrain_module, "sample_sigmas", resumed_steps)
    cfg.resume = True
    resumed = pretrain(cfg)
    assert resumed_steps.calls == 2  # it continued at step 3; starting over would take 5 steps
    a, b = _weights(uninterrupted), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed != uninterrupted"
    whole, again = load_state(Path(_config(tmp_path, "whole").checkpoint)), load_state(ckpt)
    assert again["step"] == whole["step"] == 5
    assert all(torch.equal(whole["transformer"][k], again["transformer"][k]) for k in whole["transformer"])
    assert torch.equal(whole["generator"], again["generator"])  # same noise drawn after the resume


def test_write_json_is_strict_and_atomic(tmp_path):
    import json

    from flowalign.checkpoints import strict_json, write_json

    assert strict_json({"se": float("nan"), "x": [1.0, float("inf")], "n": 3}) == {"se": None, "x": [1.0, None], "n": 3}
    path = tmp_path / "a" / "result.json"
    write_json(path, {"gain": 0.5, "se": float("nan")})
    assert json.loads(path.read_text()) == {"gain": 0.5, "se": None}
    assert "NaN" not in path.read_text() and [p.name for p in path.parent.iterdir()] == ["result.json"]
