"""ACFlowConfig: typed coercion by field types, --help lists every key, the kl_coef mapping, unknown keys."""

import argparse
import dataclasses

import pytest

from flowalign.config import ACFlowConfig, add_config_arguments, coerce, config_overrides, parse_override
from flowalign.train import add_arguments


def test_values_are_coerced_by_the_field_types(tmp_path):
    assert coerce("learning_rate", "1e-4") == 1e-4 and isinstance(coerce("lora_rank", "8"), int)
    assert coerce("use_lora", "false") is False and coerce("resume", True) is True
    assert coerce("guidance_scale", "null") is None and coerce("guidance_scale", 3) == 3.0
    assert coerce("critic_channels", "[8, 16]") == [8, 16] and coerce("reward", ["a=1", "b=2"]) == ["a=1", "b=2"]
    with pytest.raises(ValueError, match="lora_rank='eight'"):
        coerce("lora_rank", "eight")
    with pytest.raises(ValueError, match="iterations cannot be None"):
        coerce("iterations", None)
    with pytest.raises(ValueError, match=r"'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        coerce("lerning_rate", "1")
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\nkl_coef: '0.3'\n")  # YAML 1.1 reads 1e-4 as a string
    cfg = ACFlowConfig.from_yaml(path)
    assert cfg.learning_rate == 1e-4 and cfg.kl_coef == 0.3 and cfg.w2_weight == 0.3 * cfg.beta
    assert parse_override("eval_rewards", "[shapes, jpeg_compressibility]") == ["shapes", "jpeg_compressibility"]


def test_help_lists_every_key_with_its_help_and_default():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for f in dataclasses.fields(ACFlowConfig):
        assert f"--{f.name}" in text, f.name
        first_words = " ".join(f.metadata["help"].split()[:3])
        assert first_words in text, (f.name, first_words)
    assert "(default: 0.7)" in text and "(default: 'acflow')" in text


def test_command_line_overrides_only_what_was_typed():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--learning-rate", "2e-3", "--use_lora", "false", "--kl_coef", "0.5"])
    assert config_overrides(args) == {"learning_rate": 2e-3, "use_lora": False, "kl_coef": 0.5}
    assert config_overrides(parser.parse_args([])) == {}


@pytest.mark.parametrize("algorithm,alpha", [("acflow", 0.6), ("orw", 0.6), ("awm", 0.3), ("nft", 0.15)])
def test_kl_coef_maps_onto_each_method(algorithm, alpha):
    cfg = ACFlowConfig(algorithm=algorithm, kl_coef=0.3, beta=2.0, advantage_clip=2.0)
    assert cfg.w2_weight == pytest.approx(alpha) and cfg.grpo_kl_weight == 0.3
    assert ACFlowConfig(algorithm=algorithm, w2_weight=0.7).w2_weight == 0.7  # kl_coef None: the knob as given


def _section_fields(cls) -> set[str]:
    """The fields a section declares itself (not those of its bases)."""
    return set(cls.__annotations__)


def test_every_key_is_declared_by_exactly_one_section_and_each_method_names_its_own():
    from flowalign.config import EvaluationSettings, RunSettings
    from flowalign.methods import METHODS

    sections = {RunSettings, EvaluationSettings} | {s for m in METHODS.values() for s in m.settings}
    assert all(issubclass(ACFlowConfig, s) for s in sections)
    declared = [name for s in sections for name in _section_fields(s)]
    assert len(declared) == len(set(declared)), "a key declared by two sections"
    assert set(declared) == {f.name for f in dataclasses.fields(ACFlowConfig)}
    assert {s.__name__ for s in METHODS["nft"].settings} == {"FlowMatchingSettings", "NFTSettings"}
    assert {s.__name__ for s in METHODS["grpo"].settings} == {"GRPOSettings"}


@pytest.mark.parametrize("name", ["acflow", "orw", "grpo", "nft", "awm"])
def test_a_method_reads_only_the_shared_settings_and_its_own(name):
    """Each method file reads ``cfg.<key>`` of RunSettings and of its own sections only: a knob of another method
    is never read behind its back (the sections say which knobs a method has)."""
    import inspect
    import re

    from flowalign.config import RunSettings
    from flowalign.methods import METHODS

    method = METHODS[name]
    allowed = _section_fields(RunSettings).union(*(_section_fields(s) for s in method.settings))
    source = inspect.getsource(inspect.getmodule(type(method)))
    read = set(re.findall(r"\b(?:cfg|config)\.(\w+)", source)) & {f.name for f in dataclasses.fields(ACFlowConfig)}
    assert read, f"methods/{name}.py reads no config key: the pattern is broken"
    assert read <= allowed, f"methods/{name}.py reads {sorted(read - allowed)}, not in its sections"


def test_the_method_owns_its_refusals_and_the_sections_their_choices():
    # AC-Flow refuses a critic on noised states; ORW, which has no critic, ignores the key
    with pytest.raises(ValueError, match="noised copy of the scored sample"):
        ACFlowConfig(fm_states="noised", critic="latent")
    assert ACFlowConfig(algorithm="orw", critic="latent").fm_states == "noised"
    # a field's declared choices and minimum are checked for every method
    with pytest.raises(ValueError, match=r"ACFlowConfig.weighting='square'; choose one of \("):
        ACFlowConfig(algorithm="grpo", weighting="square")
    with pytest.raises(ValueError, match="ACFlowConfig.critic_steps=0 must be >= 1"):
        ACFlowConfig(algorithm="nft", critic_steps=0)
