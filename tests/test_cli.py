import subprocess
import sys

import pytest

from fxopt.cli import main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "recipes", "passes", "--debug"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["demo", "recipes", "passes"])
def test_subcommand_help_has_examples(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    assert f"fxopt {cmd}" in capsys.readouterr().out


def test_demo_prints_what_changed(capsys):
    assert main(["demo", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "remove-noops" in out and "changed" in out and "pipeline: cleanup" in out
    assert "max |compiled - original| on the example inputs: 0" in out


def test_recipes_and_passes(capsys):
    assert main(["recipes"]) == 0
    assert "default" in capsys.readouterr().out
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold-constants" in out and "[exact]" in out and "[pipeline]" in out


def test_bad_recipe_is_one_clear_line(capsys):
    assert main(["demo", "--recipe", "turbo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("fxopt: error: ") and "Known recipes" in err[0]
    assert "--debug" in err[-1]


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "fxopt.cli", "recipes"], capture_output=True, text=True)
    assert out.returncode == 0 and "default" in out.stdout
