"""``bnfold check A.onnx B.onnx``: the validation command, and the validation options that
``bnfold fold`` shares (:func:`validation_options`, :func:`check_kwargs`, :func:`progress_bar`,
:func:`progress_phases`).

Exit status: 0 equivalent, 1 not equivalent, 2 usage error or unreadable model/input.
"""

from __future__ import annotations

import contextlib
import sys
import time

import click

from bnfold.cli import debug_option
from bnfold.errors import UsageError

# onnxruntime is imported when a check runs, not when the CLI starts (`bnfold fold --no-validate`
# never needs it). The level names of bnfold.validation.sessions.OPT_LEVELS (a test keeps them equal).
OPT_LEVEL_NAMES = ("disable", "basic", "extended", "all")

#: The keyword names :func:`validation_options` adds to a command (popped by check_kwargs).
VALIDATION_PARAMS = ("inputs", "providers", "rtol", "atol", "samples", "seed", "dim",
                     "ort_opt_level", "allow_missing_providers")


def validation_options(f):
    """Add the options shared by every command that runs a check (``check``, ``fold``)."""
    options = [
        click.option("--inputs", "inputs", type=click.Path(), default=None, metavar="FILE|DIR",
                     help="Input data: an .npz (input name → array; an extra leading axis holds "
                          "several samples) or an onnx test-data folder (input_0.pb …, or "
                          "test_data_set_*/). Default: seeded random inputs."),
        click.option("--providers", default="cpu", show_default=True, metavar="LIST",
                     help="Comma-separated execution providers: cpu, cuda, tensorrt, dml, coreml, "
                          "openvino, … or full onnxruntime EP names."),
        click.option("--allow-missing-providers", is_flag=True,
                     help="Report a requested provider this onnxruntime lacks as skipped "
                          "instead of failing with exit status 2."),
        click.option("--rtol", type=float, default=None,
                     help="Relative tolerance for every output (default: per dtype, see README)."),
        click.option("--atol", type=float, default=None,
                     help="Absolute tolerance for every output, in the output's units "
                          "(default: scales with each output's largest value)."),
        click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Number of random input samples."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs."),
        click.option("--dim", "dim", multiple=True, metavar="NAME=SIZE",
                     help="Size of a symbolic input dimension, e.g. --dim batch=8 (repeatable). "
                          "Default: 1 for a dynamic first axis, 8 for others."),
        click.option("--ort-opt-level", type=click.Choice(list(OPT_LEVEL_NAMES), case_sensitive=False),
                     default="disable", show_default=True,
                     help="onnxruntime graph optimizations for both models (disable: onnxruntime "
                          "does not fold BN in the reference itself)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def parse_dims(values) -> dict[str, int]:
    """``("batch=8", "seq=16")`` → ``{"batch": 8, "seq": 16}``; UsageError on a malformed one."""
    dims: dict[str, int] = {}
    for value in values or ():
        name, sep, size = str(value).partition("=")
        name = name.strip()
        try:
            number = int(size)
        except ValueError:
            number = None
        if not sep or not name or number is None or number < 1:
            raise UsageError(f"--dim {value!r}: expected NAME=SIZE with a positive integer size, e.g. batch=8")
        dims[name] = number
    return dims


def check_kwargs(params: dict) -> dict:
    """Pop the :data:`VALIDATION_PARAMS` out of a command's ``params`` and return the keyword
    arguments of :func:`bnfold.check` (``progress`` not included)."""
    values = {name: params.pop(name) for name in VALIDATION_PARAMS if name in params}
    return {
        "inputs": values.get("inputs"),
        "providers": [p.strip() for p in str(values.get("providers") or "cpu").split(",") if p.strip()],
        "rtol": values.get("rtol"),
        "atol": values.get("atol"),
        "samples": values.get("samples", 1),
        "seed": values.get("seed", 0),
        "dims": parse_dims(values.get("dim")),
        "ort_opt_level": (values.get("ort_opt_level") or "disable").lower(),
        "allow_missing_providers": bool(values.get("allow_missing_providers")),
    }


@contextlib.contextmanager
def progress_phases(*, delay_s: float = 1.0):
    """Yield ``phase(label)``, which gives the ``progress(done, total)`` callback of one phase
    of a command (``folding``, then ``validating``). Bars are drawn on stderr only when it is a
    terminal and the command is still going ``delay_s`` after it started (short runs stay
    quiet); a phase's first call closes the bar of the phase before, and a phase once closed
    draws nothing more (a late "done" of the fold does not reopen its bar).
    """
    if not sys.stderr.isatty():
        yield lambda label: None
        return
    start = time.monotonic()
    state: dict = {"label": None, "bar": None, "done": 0}
    closed: set[str] = set()

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
        if state["label"] is not None:
            closed.add(state["label"])
        state.update(label=None, bar=None, done=0)

    def phase(label: str):
        def progress(done: int, total: int) -> None:
            if label in closed:
                return
            if state["label"] != label:
                close()
                state["label"] = label
            if state["bar"] is None:
                if time.monotonic() - start < delay_s or done >= total:
                    return
                state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr)
                state["bar"].__enter__()
            state["bar"].update(done - state["done"])  # (a new bar starts from what is done)
            state["done"] = done

        return progress

    try:
        yield phase
    finally:
        close()


@contextlib.contextmanager
def progress_bar(label: str = "checking", *, delay_s: float = 1.0):
    """Yield one ``progress(done, total)`` callback (see :func:`progress_phases`), or None
    when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    with progress_phases(delay_s=delay_s) as phase:
        yield phase(label)


@click.command("check")
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@validation_options
@click.option("--json", "json_path", type=click.Path(), default=None, metavar="FILE|-",
              help="Write the report as JSON to FILE ('-': stdout; the table then goes to stderr).")
@click.option("--junit", "junit_path", type=click.Path(), default=None, metavar="FILE",
              help="Write the report as JUnit XML (one test case per provider × output).")
@debug_option
def check_command(reference: str, candidate: str, json_path: str | None, junit_path: str | None,
                  **params) -> None:
    """Check that CANDIDATE computes the same function as REFERENCE with onnxruntime.

    Exit status: 0 equivalent, 1 not equivalent, 2 usage error or unreadable model.
    """
    from bnfold.validation import check, to_json, write_json, write_junit

    kwargs = check_kwargs(params)
    with progress_bar() as progress:
        report = check(reference, candidate, progress=progress, **kwargs)
    if json_path == "-":
        click.echo(to_json(report), nl=False)
    elif json_path:
        write_json(report, json_path)
    if junit_path:
        write_junit(report, junit_path)
    click.echo(report.format(), err=json_path == "-")
    click.get_current_context().exit(0 if report.passed else 1)


COMMANDS = [check_command]
