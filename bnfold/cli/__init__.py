"""The ``bnfold`` command line: a thin layer over the Python API.

Each sub-command lives in its own module of this package and only parses options, calls the
library and renders its report. Errors from the library (:class:`bnfold.errors.BnfoldError`)
become one line on stderr and the error's exit status; anything unexpected becomes one line
too, with exit status 3. ``--debug`` (on any command) or ``BNFOLD_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

# The command line does no linear algebra worth a thread pool, and OpenBLAS (NumPy's BLAS)
# starts one thread per core at `import numpy`: ~0.06 s of every run on 2 cores, more on big
# machines. A value the user set wins. (Before any import that may import NumPy.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click  # noqa: E402

from bnfold._version import __version__  # noqa: E402
from bnfold.errors import BnfoldError  # noqa: E402

INTERNAL_ERROR_EXIT = 3


class _OneLineError(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"bnfold: error: {self.format_message()}", err=True)


def debug_enabled(ctx: click.Context | None = None) -> bool:
    if os.environ.get("BNFOLD_DEBUG", "") not in ("", "0"):
        return True
    ctx = ctx or click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.meta.get("bnfold.debug"):
            return True
        ctx = ctx.parent
    return False


def _set_debug(ctx: click.Context, _param, value: bool) -> bool:
    if value:
        ctx.meta["bnfold.debug"] = True
    return value


def debug_option(f):
    """``--debug`` for any command: show tracebacks instead of one-line errors."""
    return click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_debug,
        help="Show a Python traceback on error.",
    )(f)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BnfoldError as exc:
            if debug_enabled(ctx):
                raise
            raise _OneLineError(str(exc), exc.exit_code) from exc
        except KeyboardInterrupt:
            raise click.Abort() from None
        except BrokenPipeError:
            raise  # the reader went away (`bnfold inspect m.onnx | head`): click ends quietly
        except Exception as exc:  # noqa: BLE001 - the CLI never shows a raw traceback
            if debug_enabled(ctx):
                raise
            msg = " ".join(str(exc).split()) or type(exc).__name__
            raise _OneLineError(
                f"internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)",
                INTERNAL_ERROR_EXIT,
            ) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="bnfold")
@debug_option
def cli() -> None:
    """Fold BatchNormalization into the neighbouring linear layers of ONNX models, exactly,
    explain every BN left alone, and prove the folded model computes the same function."""


def _register() -> None:
    # Sub-commands, one module each. Imported here (not on `import bnfold`) so the library
    # never pays for click or the CLI's dependencies.
    import importlib

    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"bnfold.cli.{name}")
        for command in module.COMMANDS:
            cli.add_command(command)


# One entry per module of bnfold/cli that defines sub-commands (a COMMANDS list).
_COMMAND_MODULES: tuple[str, ...] = ("check", "fold", "calibrate")


_register()


def main(argv: list[str] | None = None) -> None:
    """Run the command line in this process (raises SystemExit with the exit status)."""
    cli.main(args=argv, prog_name="bnfold")


def run(argv: list[str] | None = None) -> NoReturn:
    """Console-script entry point (``bnfold``, ``python -m bnfold``): :func:`main`, then exit
    without the interpreter's teardown.

    By the time a command returns, everything it wrote is closed (outputs are fsynced and
    renamed into place by :mod:`bnfold.modelio`, reports written with ``with open``), so
    what teardown would do — free every module and object one by one, ~0.1 s after a fold of
    a 100 MB model — is wasted time in a pipeline that runs bnfold per model build. Only the
    standard streams are left to flush, which this does before ``os._exit``.
    """
    try:
        main(argv)
        code: int = 0
    except SystemExit as exc:
        code = _exit_status(exc.code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can reach the reader
            code = code or 1
    os._exit(code)


def _exit_status(code: object) -> int:
    """The status ``SystemExit(code)`` gives, printing a message as the interpreter would."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


__all__ = ["cli", "main", "run", "debug_option", "debug_enabled"]
