"""``flowalign.pipelines.lora_utils``: one place for fine-tuned sources (PEFT folders, diffusers LoRAs, full transformers).

Run: nice -n 10 env OMP_NUM_THREADS=1 python -m pytest tests/test_lora_utils.py -q -x
"""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import test_rlg
import torch
from flowalign.pipelines import RLGStableDiffusion3Pipeline, lora_utils, rlg
from flowalign.pipelines.lora_utils import (
    load_finetuned_model,
    resolve_finetuned_source,
)
from huggingface_hub.utils import LocalEntryNotFoundError

world = test_rlg.world  # the shared fixture: tiny pipeline, one random LoRA saved in every format


def test_public_names_stay_where_they_were():
    for name in ("check_lora_fits", "check_same_architecture", "load_peft_adapter"):
        assert getattr(rlg, name) is getattr(lora_utils, name)
        assert name in rlg.__all__ and name in lora_utils.__all__


def test_source_kinds(world, tmp_path):
    assert resolve_finetuned_source(world.full) == ("module", world.full)
    state = {"transformer.a.lora_A.weight": torch.zeros(1, 1)}
    assert resolve_finetuned_source(state) == ("lora", state)
    assert resolve_finetuned_source(world.peft_dir) == ("peft", world.peft_dir)
    assert resolve_finetuned_source(str(world.diffusers_dir)) == ("lora", world.diffusers_dir)
    file = world.diffusers_dir / "pytorch_lora_weights.safetensors"
    assert resolve_finetuned_source(file) == ("lora", file)
    assert resolve_finetuned_source(world.full_dir) == ("full", world.full_dir)
    # a pipeline folder: its transformer/
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    shutil.copytree(world.full_dir, tmp_path / "pipe" / "transformer")
    assert resolve_finetuned_source(tmp_path / "pipe") == ("full", tmp_path / "pipe" / "transformer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"Cannot tell what .*empty holds"):
        resolve_finetuned_source(tmp_path / "empty")
    with pytest.raises(TypeError, match=r"must be a path, a hub id, a transformer module or a LoRA state dict; got int"):
        resolve_finetuned_source(123)


def test_home_relative_source_is_expanded(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(world.peft_dir, tmp_path / "my-lora")
    assert resolve_finetuned_source("~/my-lora") == ("peft", tmp_path / "my-lora")


@pytest.fixture
def no_hub(monkeypatch):
    """Record hub look-ups and fail them as an unreachable hub does (hermetic: no network in tests)."""
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        raise LocalEntryNotFoundError("unreachable (test)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize(
    "source", ["./no-such-lora", "../no-such-lora", "~/no-such-lora-rlg", "/no/such/lora", "runs/x/lora", "lora.safetensors", "lora"]
)
def test_missing_local_path_is_a_file_not_found_naming_it(source, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"Fine-tuned model '{source}' not found"):
        resolve_finetuned_source(source)
    assert no_hub == []  # a path that can only be local is never looked up on the hub


def test_missing_owner_name_tries_the_hub_then_names_the_path(world, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'x/lora' not found: there is no local folder .*x/lora.*hub repo 'x/lora'"):
        resolve_finetuned_source("x/lora")
    assert no_hub == ["x/lora"]
    # through the pipeline: the same error, nothing attached
    pipe = RLGStableDiffusion3Pipeline.from_pipe(world.pipe)
    with pytest.raises(FileNotFoundError, match=r"'x/lora'"):
        pipe.load_finetuned("x/lora")
    with pytest.raises(FileNotFoundError, match=r"'\./x/lora' not found: no such file or folder"):
        pipe.load_finetuned("./x/lora")
    assert pipe.rlg_transformer is None and not getattr(world.pipe.transformer, "peft_config", {})
    assert no_hub == ["x/lora", "x/lora"]  # ('./x/lora' was not looked up)
    # an existing relative folder is used as is
    shutil.copytree(world.peft_dir, tmp_path / "x" / "lora")
    assert resolve_finetuned_source("x/lora")[0] == "peft"
    assert no_hub == ["x/lora", "x/lora"]


def test_load_finetuned_model_lora_and_full(world):
    transformer = world.pipe.transformer
    try:
        assert load_finetuned_model(transformer, world.peft_dir, adapter_name="a") is None
        assert set(transformer.peft_config) == {"a"}
        with pytest.raises(ValueError, match="already has an adapter named 'a'"):
            load_finetuned_model(transformer, world.diffusers_dir, adapter_name="a")
        # the same weights from the diffusers file under another name
        load_finetuned_model(transformer, world.diffusers_dir, adapter_name="b")
        a = {k.replace(".a.", "."): v for k, v in transformer.state_dict().items() if ".a." in k}
        b = {k.replace(".b.", "."): v for k, v in transformer.state_dict().items() if ".b." in k}
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        transformer.unload_lora()
    full = load_finetuned_model(transformer, world.full_dir)
    assert type(full) is type(transformer) and full is not transformer
    assert all(torch.equal(v, world.full.state_dict()[k]) for k, v in full.state_dict().items())


def test_adapter_whose_config_does_not_fit(world, tmp_path):
    bad = tmp_path / "peft"
    shutil.copytree(world.peft_dir, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"DoRA adapter; only plain LoRA is supported"):
        load_finetuned_model(world.pipe.transformer, bad)
    (bad / "adapter_model.safetensors").unlink()
    config["use_dora"] = False
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"has adapter_config.json but no adapter_model.safetensors"):
        load_finetuned_model(world.pipe.transformer, bad)
    assert not getattr(world.pipe.transformer, "peft_config", {})
