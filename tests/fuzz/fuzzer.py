"""A seeded mutation fuzzer for ``bnfold fold`` (issue 6).

Seed models (small, so mutations hit structure as often as weights):

* ``mixed``    — Conv→BN, Gemm→BN and a forward BN→Conv in one graph;
* ``matmul``   — MatMul + Add(bias) → BN;
* ``if``       — an If whose then-branch holds Conv→BN with every parameter from the outer scope;
* ``external`` — Conv→BN with its weight in ``m.onnx.data`` (the data file is mutated too);
* ``inline``   — the same Conv→BN with its 4.6 KB weight inside the file: over the streamed
  fold's 1 KiB placeholder threshold (``bnfold.stream.source``), so its wire-format walk and
  placeholders are fuzzed too (``fold_file`` without validation takes that path).

Mutations of the serialized model (several may stack): flip 1–8 random bits, truncate at a
random offset, splice the head of one seed onto the tail of another, insert a copy of a random
chunk elsewhere, overwrite a byte with 0x00/0x7f/0x80/0xff (varint edges); for ``external``
also truncate or flip the data file.

Each case runs in-process under a per-case time limit (``SIGALRM``), alternating between the
API (``fold_file(partial=True)``, then ``bnfold.check`` of the output when the mutated model
loads in onnxruntime) and the CLI (``bnfold fold --partial``, validation on). The only
acceptable outcomes: a :class:`~bnfold.errors.BnfoldError` whose message is one line naming
the input or output file (CLI: exit 2 and one stderr line ``bnfold: error: ...``), or a fold
whose output is equivalent — or, for weights mutated to near float32's limit, a fold that
validation refuses because one model overflows to ±inf where the other does not (see
``OVERFLOW``). Anything else — another exception type, exit 3, a check that fails on finite
values, a timeout — is a failure, reported with the case number that reproduces it
(:func:`mutate` is a pure function of the case number).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import helper, numpy_helper

BASE_SEED = 20260601
# Mutated weights near float32's limit (~3.4e38) can make the folded model overflow to inf
# where the original's different rounding stays finite (or the reverse). The fold is exact in
# real arithmetic; validation catches the difference (exit 1, nothing written). Counted apart.
OVERFLOW = "not equivalent by float overflow, refused by validation"
CASE_TIME_LIMIT_S = 20.0


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case; a BaseException so no `except Exception` swallows it."""


# ---- seeds -------------------------------------------------------------------------------------

def _seed_mixed() -> onnx.ModelProto:
    from tests.converter.builders import mixed_patterns

    return mixed_patterns(rng=np.random.default_rng(1))[0]


def _seed_matmul() -> onnx.ModelProto:
    from tests.converter.builders import matmul_bn

    return matmul_bn(with_add=True, rng=np.random.default_rng(2), n=3, k=4, f=5)[0]


def _seed_if() -> onnx.ModelProto:
    from tests.ortutil import make_model

    rng = np.random.default_rng(3)
    c = 3
    vi = helper.make_tensor_value_info
    params = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
        ("bn.scale", rng.uniform(0.5, 2, c)), ("bn.B", rng.normal(0, 1, c)), ("bn.mean", rng.normal(0, 1, c)),
        ("bn.var", rng.uniform(0.5, 2, c)))]
    then_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["tc"], name="then_conv"),
         helper.make_node("BatchNormalization", ["tc", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["ty"],
                          name="then_bn")],
        "then", [], [vi("ty", onnx.TensorProto.FLOAT, [1, c, 3, 3])])
    else_g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["ey"], name="else_conv")], "else", [],
                               [vi("ey", onnx.TensorProto.FLOAT, [1, c, 3, 3])])
    w = numpy_helper.from_array(rng.normal(size=(c, 2, 1, 1)).astype(np.float32), "W")
    return make_model([helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
                      [vi("cond", onnx.TensorProto.BOOL, []), vi("x", onnx.TensorProto.FLOAT, [1, 2, 3, 3])],
                      [vi("y", onnx.TensorProto.FLOAT, [1, c, 3, 3])], [w, *params])


def _seed_external() -> dict[str, bytes]:
    import tempfile

    from bnfold.modelio import save_model
    from tests.reliability._models import conv_bn_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        save_model(conv_bn_model(), path, external_data=True)
        return {"m.onnx": path.read_bytes(), "m.onnx.data": (Path(tmp) / "m.onnx.data").read_bytes()}


def seeds() -> dict[str, dict[str, bytes]]:
    """Seed name -> files (``m.onnx`` and any data file) as bytes."""
    out = {name: {"m.onnx": build().SerializeToString()}
           for name, build in (("mixed", _seed_mixed), ("matmul", _seed_matmul), ("if", _seed_if))}
    out["external"] = _seed_external()
    from tests.reliability._models import conv_bn_model

    out["inline"] = {"m.onnx": conv_bn_model().SerializeToString()}
    return out


# ---- mutations ---------------------------------------------------------------------------------

def _flip(rng, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    k = int(rng.integers(1, 9))
    for _ in range(k):
        i = int(rng.integers(len(b)))
        b[i] ^= 1 << int(rng.integers(8))
    return bytes(b), f"flip{k}"


def _truncate(rng, data: bytes) -> tuple[bytes, str]:
    n = int(rng.integers(len(data)))
    return data[:n], f"truncate@{n}"


def _splice(rng, data: bytes, other: bytes) -> tuple[bytes, str]:
    i, j = int(rng.integers(len(data) + 1)), int(rng.integers(len(other) + 1))
    return data[:i] + other[j:], f"splice@{i}+{j}"


def _insert(rng, data: bytes) -> tuple[bytes, str]:
    i, j = sorted(int(v) for v in rng.integers(len(data) + 1, size=2))
    at = int(rng.integers(len(data) + 1))
    return data[:at] + data[i:j] + data[at:], f"insert[{i}:{j}]@{at}"


def _poke(rng, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    i = int(rng.integers(len(b)))
    b[i] = int(rng.choice([0x00, 0x7F, 0x80, 0xFF]))
    return bytes(b), f"poke@{i}={b[i]:#x}"


def mutate(case: int, all_seeds: dict[str, dict[str, bytes]]) -> tuple[str, dict[str, bytes], str]:
    """(seed name, mutated files, description) of case number ``case``: deterministic."""
    rng = np.random.default_rng([BASE_SEED, case])
    names = sorted(all_seeds)
    seed = names[case % len(names)]
    files = dict(all_seeds[seed])
    target = "m.onnx"
    if "m.onnx.data" in files and rng.random() < 0.25:
        target = "m.onnx.data"
    data = files[target]
    steps = []
    for _ in range(int(rng.integers(1, 3))):
        op = int(rng.integers(5))
        if not data:
            break
        if op == 0:
            data, how = _flip(rng, data)
        elif op == 1:
            data, how = _truncate(rng, data)
        elif op == 2:
            other = all_seeds[names[int(rng.integers(len(names)))]]["m.onnx"]
            data, how = _splice(rng, data, other)
        elif op == 3:
            data, how = _insert(rng, data)
        else:
            data, how = _poke(rng, data)
        steps.append(how)
    files[target] = data
    return seed, files, f"{seed}:{target}:{'+'.join(steps)}"


# ---- running a case ----------------------------------------------------------------------------

@dataclass
class Campaign:
    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # BnfoldError subclass -> count
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def summary(self) -> str:
        total = sum(self.outcomes.values())
        return (f"{total} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
                + f"; errors by type: {dict(self.errors)}; slowest case {self.slowest:.2f} s; "
                + f"failures {len(self.failures)}")


def _ort_loads(path: Path) -> bool:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    try:
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return True
    except Exception:  # noqa: BLE001 - any refusal means "cannot be validated"
        return False


def _one_line(message: str, *names: Path) -> bool:
    return "\n" not in message and any(str(n) in message for n in names)


def _run_api(src: Path, dst: Path, campaign: Campaign) -> str:
    import bnfold
    from bnfold.errors import BnfoldError

    try:
        bnfold.fold_file(src, dst, partial=True)
    except BnfoldError as exc:
        campaign.errors[type(exc).__name__] += 1
        if not _one_line(str(exc), src, dst):
            raise AssertionError(f"error message is not one line naming the file: {exc}") from exc
        return "error"
    if not _ort_loads(src):
        return "folded (original not runnable: not validated)"
    try:
        report = bnfold.check(src, dst)
    except BnfoldError as exc:
        campaign.errors[f"check:{type(exc).__name__}"] += 1
        return "folded (check refused the inputs)"
    if not report.passed:
        overflow = any(o.nonfinite_mismatches for c in report.comparisons for o in c.outputs)
        if not overflow:
            raise AssertionError(f"folded model not equivalent: {report.verdict()}")
        return OVERFLOW
    return "folded + validated"


def _run_cli(src: Path, dst: Path, campaign: Campaign) -> str:
    from bnfold.cli import cli

    result = CliRunner().invoke(cli, ["fold", str(src), "-o", str(dst), "--partial"])
    line = result.stderr.strip()
    if result.exit_code == 0:
        return "folded + validated (cli)"
    if result.exit_code == 2 and line.startswith("bnfold: error: ") and _one_line(line, src, dst):
        campaign.errors["cli exit 2"] += 1
        return "error"
    if result.exit_code == 1 and "NaN/inf mismatch" in line and "nothing written" in line and not dst.exists():
        return OVERFLOW
    raise AssertionError(f"CLI exit {result.exit_code}: {line or result.exception!r}")


def run_cases(cases: range, workdir: Path, *, time_limit: float = CASE_TIME_LIMIT_S) -> Campaign:
    all_seeds = seeds()
    campaign = Campaign()

    def on_alarm(signum, frame):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for case in cases:
            seed, files, how = mutate(case, all_seeds)
            folder = workdir / f"case{case}"
            folder.mkdir()
            for name, data in files.items():
                (folder / name).write_bytes(data)
            src, dst = folder / "m.onnx", folder / "out.onnx"
            runner = _run_cli if case % 2 else _run_api
            started = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, time_limit)
            try:
                outcome = runner(src, dst, campaign)
            except CaseTimeout:
                outcome = "FAILED"
                campaign.failures.append(f"case {case} ({how}): over the {time_limit:.0f} s limit")
            except AssertionError as exc:
                outcome = "FAILED"
                campaign.failures.append(f"case {case} ({how}, {runner.__name__}): {exc}")
            except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer hunts
                outcome = "FAILED"
                msg = " ".join(str(exc).split())[:300]
                campaign.failures.append(f"case {case} ({how}, {runner.__name__}): {type(exc).__name__}: {msg}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            campaign.slowest = max(campaign.slowest, time.monotonic() - started)
            campaign.outcomes[outcome] += 1
            _remove(folder)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return campaign


def _remove(folder: Path) -> None:
    for p in sorted(folder.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
    os.rmdir(folder)
