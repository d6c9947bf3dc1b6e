"""Renderings of a :class:`~bnfold.validation.report.CheckReport`: the human table, the
verdict line, JSON and JUnit XML (files written atomically: temp file beside, then rename)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from bnfold.errors import OutputError

_COLUMNS = ("provider", "output", "max abs", "max rel", "err/rms", "failing", "rtol", "atol",
            "needed atol", "result")


def _g(x: float) -> str:
    if x == 0:
        return "0"
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return f"{x:.2e}"


def _failing(o) -> str:
    pct = 100.0 * o.failing_fraction
    return f"{o.failing}/{o.elements} ({pct:.3g}%)"


def _rows(comparisons, label):
    rows = []
    for c in comparisons:
        name = label(c)
        if c.error is not None:
            rows.append((name, "-", "", "", "", "", "", "", "", "ERROR"))
        for o in c.outputs:
            if o.message:
                rows.append((name, o.output, "", "", "", "", "", "", "", "FAIL"))
                continue
            rows.append((name, o.output, _g(o.max_abs_error), _g(o.max_rel_error), _g(o.error_vs_rms),
                         _failing(o), _g(o.tolerance.rtol), _g(o.tolerance.atol), _g(o.needed_atol),
                         "PASS" if o.passed else "FAIL"))
    return rows


def _table(rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    fmt = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(_COLUMNS), *[fmt(r) for r in rows]]


def format_report(report) -> str:
    """The human-readable report: header, table, EP-noise table or note, skips, verdict."""
    lines = [
        f"reference: {report.reference}",
        f"candidate: {report.candidate}",
        f"inputs:    {report.input_source}, {report.samples} sample(s); "
        + ", ".join(f"{n} {i['dtype']}{i['shape']}" for n, i in report.inputs.items()),
        f"onnxruntime {report.onnxruntime_version}, graph optimizations: {report.ort_opt_level}; "
        f"default tolerances for longest dot product K = {report.reduction}",
    ]
    for c in report.comparisons:
        if c.options:
            opts = ", ".join(f"{k}={v}" for k, v in c.options.items())
            lines.append(f"{c.provider} provider options: {opts}")
    lines.append("")
    lines += _table(_rows(report.comparisons, lambda c: c.provider))
    for c in report.comparisons:
        if c.error:
            lines.append(f"{c.provider}: {c.error}")
        for o in c.outputs:
            if o.message:
                lines.append(f"{c.provider}: {o.message}")
    lines.append("")
    if report.baselines:
        lines.append("execution-provider noise (the reference model against itself; never fails the check):")
        lines += _table(_rows(report.baselines, lambda c: f"{c.reference.split('@')[1]}→{c.provider}"))
    else:
        lines.append(f"execution-provider noise: {report.baseline_note}")
    for s in report.skipped:
        lines.append(f"skipped provider {s.name}: {s.reason}")
    lines.append(verdict_line(report))
    return "\n".join(lines)


def verdict_line(report) -> str:
    if not report.comparisons:
        return "FAIL: nothing was compared (every requested provider was skipped)"
    failures = report.failures()
    if not failures:
        worst = max((o for c in report.comparisons for o in c.outputs), key=lambda o: o.max_abs_error)
        providers = ", ".join(c.provider for c in report.comparisons)
        n_outputs = len(report.comparisons[0].outputs)
        return (f"PASS: equivalent on {providers} ({n_outputs} output(s), "
                f"{report.samples} sample(s); largest error {_g(worst.max_abs_error)} on {worst.output!r})")
    c, o = failures[0]
    more = f" (+{len(failures) - 1} more failing)" if len(failures) > 1 else ""
    if o is None:
        return f"FAIL: {c.error}{more}"
    if o.message:
        return f"FAIL: {o.message} on {c.provider}{more}"
    where = ""
    if o.worst is not None:
        w = o.worst
        idx = "[" + ", ".join(map(str, w.index)) + "]"
        where = (f"; worst at sample {w.sample} index {idx}: reference {w.reference:.7g}, "
                 f"candidate {w.candidate:.7g}")
    nonfinite = f", {o.nonfinite_mismatches} NaN/inf mismatch(es)" if o.nonfinite_mismatches else ""
    return (f"FAIL: output {o.output!r} on {c.provider}: {_failing(o)} elements out of tolerance"
            f"{nonfinite}; max abs error {_g(o.max_abs_error)} (needed atol {_g(o.needed_atol)} > "
            f"atol {_g(o.tolerance.atol)} with rtol {_g(o.tolerance.rtol)}){where}{more}")


def to_json(report) -> str:
    def clean(x):
        # JSON has no inf/NaN: write them as strings so every parser reads the file.
        if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(report.to_dict()), indent=2, allow_nan=False) + "\n"


def to_junit_xml(report) -> str:
    """JUnit XML: one testcase per provider × output (classname ``bnfold.check.<provider>``),
    a failure element with the figures when it fails, a skipped one per missing provider."""
    suite = ET.Element("testsuite", name="bnfold check")
    tests = failures = skipped = 0
    for c in report.comparisons:
        cases = [(o.output, o) for o in c.outputs] or [("(model)", None)]
        for name, o in cases:
            tests += 1
            case = ET.SubElement(suite, "testcase", classname=f"bnfold.check.{c.provider}", name=name,
                                 time=f"{c.seconds:.3f}")
            if o is not None:
                props = ET.SubElement(case, "properties")
                for key, value in o.to_dict().items():
                    if key in ("output", "worst") or value is None:
                        continue
                    ET.SubElement(props, "property", name=key, value=str(value))
            if o is None or not o.passed:
                failures += 1
                message = c.error if o is None else (o.message or _failure_text(o))
                ET.SubElement(case, "failure", message=message, type="NotEquivalent").text = message
    for s in report.skipped:
        tests += 1
        skipped += 1
        case = ET.SubElement(suite, "testcase", classname=f"bnfold.check.{s.name}", name="(provider)")
        ET.SubElement(case, "skipped", message=s.reason)
    if not report.comparisons:
        tests += 1
        failures += 1
        case = ET.SubElement(suite, "testcase", classname="bnfold.check", name="(nothing compared)")
        ET.SubElement(case, "failure", message=verdict_line(report), type="NotEquivalent")
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", str(skipped))
    suite.set("time", f"{report.seconds:.3f}")
    ET.SubElement(suite, "system-out").text = format_report(report)
    root = ET.Element("testsuites", tests=str(tests), failures=str(failures))
    root.append(suite)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _failure_text(o) -> str:
    return (f"{o.failing}/{o.elements} elements out of tolerance; max abs error {_g(o.max_abs_error)}, "
            f"max rel error {_g(o.max_rel_error)}, needed atol {_g(o.needed_atol)} "
            f"(atol {_g(o.tolerance.atol)}, rtol {_g(o.tolerance.rtol)})")


def write_text_atomic(path: str | os.PathLike, text: str, *, what: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder and a rename."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: cannot write the {what}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the {what}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the {what}: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(report, path) -> Path:
    return write_text_atomic(path, to_json(report), what="JSON report")


def write_junit(report, path) -> Path:
    return write_text_atomic(path, to_junit_xml(report), what="JUnit report")
