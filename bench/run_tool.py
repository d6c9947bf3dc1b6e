"""Run one tool on one model, as a whole process: ``python -m bench.run_tool TOOL IN OUT``.

The bench starts this script once per measurement and takes its wall time and peak RSS
(:mod:`bench.tools`), so imports, loading, work and saving are all counted, as they would be
for a user running the tool. Each tool is invoked the way its users invoke it: the peers
through their own command-line entry points (their defaults: onnxsim with ``check_n`` 0, the
onnxoptimizer CLI with the passes named below), onnxruntime through ``optimized_model_filepath``,
and the floor through ``onnx.load`` + ``onnx.save``. A tool that keeps external data when the
input has it does so on its own; only the floor and onnxruntime are told to (they are the
references for "external data stays external").

Exit status 0 with OUT written is success; anything else is a failure whose last stderr line
the bench shows as the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: onnxoptimizer passes for the fold: the fusion, and the clean-up it relies on.
ONNXOPTIMIZER_PASSES = ["fuse_bn_into_conv", "eliminate_unused_initializer", "eliminate_deadend"]


def _uses_external_data(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(onnx.external_data_helper.uses_external_data(t)
               for t in onnx.external_data_helper._get_all_tensors(model))


def _cli(main, argv: list[str]) -> int:
    """Run a console-script ``main`` with ``argv``; its exit status (0 if it just returns)."""
    saved = sys.argv
    sys.argv = argv
    try:
        result = main()
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return result if isinstance(result, int) else 0


def floor(src: Path, dst: Path) -> int:
    import onnx

    external = _uses_external_data(src)
    model = onnx.load(str(src))
    onnx.save_model(model, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{dst.name}.data", size_threshold=1024)
    return 0


def _bnfold_fold_flags() -> set[str]:
    from bnfold.cli.fold import fold_command

    return {opt for p in fold_command.params for opt in (*p.opts, *p.secondary_opts)}


def bnfold(src: Path, dst: Path) -> int:
    from bnfold.cli import main

    flags = ["--no-validate"] if "--no-validate" in _bnfold_fold_flags() else []
    return _cli(lambda: main(["fold", str(src), "-o", str(dst), *flags]), ["bnfold"])


def bnfold_validate(src: Path, dst: Path) -> int:
    """``bnfold fold`` with its validation; while fold has no validation, fold then ``check``."""
    from bnfold.cli import main

    flags = _bnfold_fold_flags()
    extra = ["--validate"] if "--validate" in flags else []
    code = _cli(lambda: main(["fold", str(src), "-o", str(dst), *extra]), ["bnfold"])
    if code or extra or "--no-validate" in flags:
        return code
    return _cli(lambda: main(["check", str(src), str(dst)]), ["bnfold"])


def bnfold_compensated(src: Path, dst: Path) -> int:
    """``bnfold fold --no-validate --rounding compensated`` (float16/bfloat16 workloads only)."""
    from bnfold.cli import main

    return _cli(lambda: main(["fold", str(src), "-o", str(dst), "--no-validate", "--rounding", "compensated"]),
                ["bnfold"])


def onnxoptimizer(src: Path, dst: Path) -> int:
    from onnxoptimizer.onnxoptimizer_main import main

    return _cli(main, ["onnxoptimizer", str(src), str(dst), "-p", *ONNXOPTIMIZER_PASSES])


def onnxslim(src: Path, dst: Path) -> int:
    from onnxslim.cli import main

    return _cli(main, ["onnxslim", str(src), str(dst)])


def onnxsim(src: Path, dst: Path) -> int:
    from onnxsim import main

    return _cli(main, ["onnxsim", str(src), str(dst)])


def _ort(level: str):
    def run(src: Path, dst: Path) -> int:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                         "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
        opts.optimized_model_filepath = str(dst)
        opts.log_severity_level = 3
        if _uses_external_data(src):
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          f"{dst.name}.data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                          "1024")
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        return 0

    return run


def _fail(src: Path, dst: Path) -> int:
    """Test helper: fails the way a tool fails, with a message on stderr."""
    raise RuntimeError(f"deliberate failure on {src.name}")


def _crash(src: Path, dst: Path) -> int:
    """Test helper: dies the way a native tool crashes."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)
    return 0


def _silent(src: Path, dst: Path) -> int:
    """Test helper: exits 0 without writing anything."""
    return 0


RUNNERS = {
    "floor": floor,
    "bnfold": bnfold,
    "bnfold-validate": bnfold_validate,
    "bnfold-compensated": bnfold_compensated,
    "onnxoptimizer": onnxoptimizer,
    "onnxslim": onnxslim,
    "onnxsim": onnxsim,
    "ort-basic": _ort("basic"),
    "ort-extended": _ort("extended"),
    "_fail": _fail,
    "_crash": _crash,
    "_silent": _silent,
}


#: Environment variable naming the file where the runner writes its peak RSS (bytes).
PEAK_RSS_FILE = "BENCH_PEAK_RSS_FILE"


def _write_peak_rss() -> None:
    """This process's own peak RSS (VmHWM of its post-exec memory map), for :mod:`bench.tools`."""
    import os

    target = os.environ.get(PEAK_RSS_FILE)
    if not target:
        return
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                Path(target).write_text(str(int(line.split()[1]) * 1024))
                return


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    finally:
        try:
            _write_peak_rss()
        except OSError:
            pass


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in RUNNERS:
        print(f"usage: python -m bench.run_tool {{{','.join(RUNNERS)}}} IN OUT", file=sys.stderr)
        return 2
    tool, src, dst = argv
    try:
        return RUNNERS[tool](Path(src), Path(dst))
    except Exception as exc:  # noqa: BLE001 - the bench wants the reason as one line
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{type(exc).__name__}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    status = main(sys.argv[1:])
    if sys.argv[1:2] and sys.argv[1].startswith("bnfold"):
        # The `bnfold` console script (bnfold.cli.run) flushes its streams and ends with
        # os._exit, skipping the interpreter's teardown: end the way users' runs end.
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
