"""README.md stays true: its Python examples run, and every option it shows exists."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bnfold.cli import cli
from tests.test_fold_validate import _conv_bn

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```\n(.*?)```", text, flags=re.S).group(1)
    assert first_block.split("\n")[:2] == ["make demo", "make test"]


def test_python_examples_run(tmp_path, monkeypatch, rng):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.onnx").write_bytes(_conv_bn(rng).SerializeToString())
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((64, 3, 10, 10)).astype(np.float32))
    blocks = _blocks("python")
    assert blocks, "README has no Python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "model.folded.onnx").exists()
    assert (tmp_path / "shard0.stats").exists()


def _synopsis_options() -> dict[str, set[str]]:
    """Options shown per command in the README's command-line synopsis."""
    synopsis = _blocks("")[1]
    options: dict[str, set[str]] = {}
    command = None
    for line in synopsis.splitlines():
        if line.startswith("bnfold "):
            match = re.match(r"bnfold (\w+)", line)
            command = match.group(1) if match else None
        if command:
            options.setdefault(command, set()).update(re.findall(r"(--[a-z][a-z-]+)", line))
    return options


@pytest.mark.parametrize("command", ["fold", "inspect", "check", "calibrate"])
def test_synopsis_options_exist(command):
    shown = _synopsis_options()[command]
    assert shown, f"README shows no options for {command}"
    help_text = CliRunner().invoke(cli, [command, "--help"]).output
    missing = sorted(o for o in shown if o not in help_text)
    assert not missing, f"README shows options bnfold {command} does not have: {missing}"
