"""The root ``softprompt`` command (:mod:`softprompt_cli`): every package's subcommands are there, in order, with
their own flags, and listing them imports nothing heavy."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from softprompt_cli import COMMAND_MODULES, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["serve", "prepare-model", "upload", "bench", "train", "eval", "eval-report"]
OWNERS = {"server.cli": ["serve", "prepare-model", "upload"], "bench.cli": ["bench"],
          "training.cli": ["train", "eval", "eval-report"]}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_root_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert " ".join(out.split()).startswith("usage: softprompt [-h] {" + ",".join(COMMANDS) + "} ...")
    for name in COMMANDS:
        assert f"\n    {name} " in out
    assert list(_subcommands(build_parser())) == COMMANDS


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_each_package_registers_its_own_subcommands(module):
    import importlib

    parser = argparse.ArgumentParser(prog="softprompt")
    importlib.import_module(module).register(parser.add_subparsers(dest="command"))
    assert list(_subcommands(parser)) == OWNERS[module]


@pytest.mark.parametrize("command", ["bench", "train", "eval"])
def test_own_flag_commands_get_their_help(command, capsys):
    """bench / train / eval parse their own flags: ``--help`` reaches their parser."""
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: softprompt {command} [-h]")


def test_serve_flags_and_errors(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    assert "[env SOFTPROMPT_PORT]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--bogus"])
    assert exc.value.code == 2
    assert "softprompt: error: unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "the following arguments are required: command" in capsys.readouterr().err
    # Bad settings and bad model paths: one line on stderr, exit status 2.
    assert main(["prepare-model", "--model", str(ROOT / "no-such-model")]) == 2
    assert capsys.readouterr().err.startswith("softprompt prepare-model: --model ")
    monkeypatch.setenv("SOFTPROMPT_PORT", "not-a-port")
    assert main(["prepare-model"]) == 2
    assert capsys.readouterr().err.startswith("softprompt prepare-model: 1 validation error for Settings")


def test_help_imports_nothing_heavy():
    code = ("import sys\nfrom softprompt_cli import build_parser\nbuild_parser()\n"
            "heavy = ['torch', 'uvicorn', 'fastapi', 'transformers', 'peft', 'httpx', 'server.engine', 'server.app',"
            " 'training.evaluate', 'training.eval_backends', 'training.report', 'matplotlib', 'bench.serve_bench']"
            "\nprint([m for m in heavy if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_console_script_points_at_the_root_command():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["softprompt"] == "softprompt_cli:main"
    assert "softprompt_cli*" in meta["tool"]["setuptools"]["packages"]["find"]["include"]
