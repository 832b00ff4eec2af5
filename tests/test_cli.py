"""The ``flowalign`` entry point: the top level lists the subcommands and dispatches to their modules."""

from __future__ import annotations

import importlib

import pytest

from flowalign import __version__
from flowalign.cli import SUBCOMMANDS, main


def test_no_command_prints_help_listing_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name, (_, help_text) in SUBCOMMANDS.items():
        assert name in out and help_text[:30] in out


def test_unknown_command_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"flowalign {__version__}"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_module_has_its_two_functions(name):
    module = importlib.import_module(SUBCOMMANDS[name][0])
    assert callable(module.add_arguments) and callable(module.run)
