"""The CLI group: version, help, and how errors reach the user (SPEC §4)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from bnfold import __version__
from bnfold.cli import cli, debug_option
from bnfold.errors import ModelLoadError, ValidationFailed


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def failing_command():
    """A throw-away sub-command that raises whatever the test asks for."""

    @click.command("explode")
    @click.argument("kind")
    @debug_option
    def explode(kind):
        if kind == "load":
            raise ModelLoadError("model.onnx: is empty (0 bytes), not an ONNX model")
        if kind == "validation":
            raise ValidationFailed("output y: max abs error 0.5 > tolerance 1e-4")
        raise RuntimeError("something\nbroke")

    cli.add_command(explode)
    yield
    cli.commands.pop("explode")


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"bnfold, version {__version__}"


def test_help_lists_usage(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "Usage: cli [OPTIONS] COMMAND" in result.output or "Usage: bnfold" in result.output


@pytest.mark.parametrize(
    "kind, code, line",
    [
        ("load", 2, "bnfold: error: model.onnx: is empty (0 bytes), not an ONNX model"),
        ("validation", 1, "bnfold: error: output y: max abs error 0.5 > tolerance 1e-4"),
        ("other", 3, "bnfold: error: internal error: RuntimeError: something broke (rerun with --debug for the traceback)"),
    ],
)
def test_errors_are_one_line_with_exit_code(runner, failing_command, kind, code, line):
    result = runner.invoke(cli, ["explode", kind])
    assert result.exit_code == code
    assert result.stderr.strip() == line
    assert "Traceback" not in result.output


def test_debug_shows_the_exception(runner, failing_command):
    result = runner.invoke(cli, ["explode", "load", "--debug"])
    assert result.exit_code == 1  # CliRunner's code for an uncaught exception
    assert isinstance(result.exception, ModelLoadError)


def test_debug_env_variable(runner, failing_command, monkeypatch):
    monkeypatch.setenv("BNFOLD_DEBUG", "1")
    result = runner.invoke(cli, ["explode", "other"])
    assert isinstance(result.exception, RuntimeError)


def test_unknown_command_is_usage_error(runner):
    result = runner.invoke(cli, ["no-such-command"])
    assert result.exit_code == 2


def test_module_entry_point_runs_as_a_process():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bnfold", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"bnfold, version {__version__}"


def test_closed_pipe_is_not_an_internal_error(runner):
    @click.command("pipe")
    def pipe():
        raise BrokenPipeError(32, "Broken pipe")

    cli.add_command(pipe)
    try:
        result = runner.invoke(cli, ["pipe"])
    finally:
        cli.commands.pop("pipe")
    # click's own EPIPE handling: quiet exit 1, not the exit-3 "internal error" line
    assert result.exit_code == 1
    assert "internal error" not in result.output and result.stderr == ""
