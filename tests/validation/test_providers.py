"""Provider names, availability and the options set for comparable results. CUDA paths run
with monkeypatched availability here; the real CUDA run is behind the ``cuda`` marker."""

import onnxruntime as ort
import pytest

from bnfold import check
from bnfold.errors import ProviderError, UsageError
from bnfold.validation import providers as P
from tests.validation.models import conv_bn


@pytest.mark.parametrize("name, ep", [
    ("cpu", "CPUExecutionProvider"), ("CUDA", "CUDAExecutionProvider"),
    ("tensorrt", "TensorrtExecutionProvider"), ("trt", "TensorrtExecutionProvider"),
    ("dml", "DmlExecutionProvider"), ("coreml", "CoreMLExecutionProvider"),
    ("openvino", "OpenVINOExecutionProvider"), ("CUDAExecutionProvider", "CUDAExecutionProvider"),
    ("xnnpackexecutionprovider", "XnnpackExecutionProvider"),
])
def test_names_map_to_execution_providers(name, ep):
    assert P.canonical_ep(name) == ep


def test_unknown_provider_is_a_usage_error():
    with pytest.raises(UsageError, match=r"^--providers: unknown execution provider 'gpu'; use one of acl, "):
        P.resolve_providers(["cpu", "gpu"])


def test_missing_provider_is_an_error_or_skipped(monkeypatch):
    monkeypatch.setattr(P, "available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProviderError) as info:
        P.resolve_providers("cpu,cuda")
    assert str(info.value) == (
        "provider 'cuda': CUDAExecutionProvider is not available in this onnxruntime (available: "
        "CPUExecutionProvider); install the matching onnxruntime package or pass --allow-missing-providers")
    assert info.value.exit_code == 2
    run, skipped = P.resolve_providers("cpu,cuda", allow_missing=True)
    assert [p.name for p in run] == ["cpu"]
    assert [(s.name, s.ep) for s in skipped] == [("cuda", "CUDAExecutionProvider")]
    assert "not available in this onnxruntime" in skipped[0].reason


def test_cuda_gets_no_tf32_and_a_fixed_conv_algorithm(monkeypatch):
    monkeypatch.setattr(P, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    run, skipped = P.resolve_providers(["cuda", "cpu", "CUDA"])
    assert skipped == [] and [p.name for p in run] == ["cuda", "cpu"]      # duplicates collapse
    cuda = run[0]
    assert cuda.options == {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}
    assert cuda.session_providers() == [
        ("CUDAExecutionProvider", {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}),
        ("CPUExecutionProvider", {}),
    ]
    assert run[1].session_providers() == [("CPUExecutionProvider", {})]


def test_tensorrt_falls_back_to_comparable_cuda(monkeypatch):
    monkeypatch.setattr(P, "available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    (trt,), _ = P.resolve_providers("tensorrt")
    assert trt.session_providers() == [
        ("TensorrtExecutionProvider", {"trt_fp16_enable": "False", "trt_int8_enable": "False"}),
        ("CUDAExecutionProvider", {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}),
        ("CPUExecutionProvider", {}),
    ]


def test_check_reports_skipped_provider_and_still_checks_cpu(monkeypatch):
    monkeypatch.setattr(P, "available_providers", lambda: ["CPUExecutionProvider"])
    report = check(conv_bn(folded=False), conv_bn(folded=True), providers=("cpu", "cuda"),
                   allow_missing_providers=True)
    assert report.passed
    assert [c.provider for c in report.comparisons] == ["cpu"]
    assert [s.name for s in report.skipped] == ["cuda"]
    assert report.baseline_note.startswith("not applicable: only one provider ran (cpu)")


def test_only_missing_providers_is_not_a_pass(monkeypatch):
    monkeypatch.setattr(P, "available_providers", lambda: ["CPUExecutionProvider"])
    report = check(conv_bn(folded=False), conv_bn(folded=True), providers="cuda", allow_missing_providers=True)
    assert not report.passed and report.comparisons == []
    assert report.verdict() == "FAIL: nothing was compared (every requested provider was skipped)"


def test_silent_cpu_fallback_is_a_missing_provider(monkeypatch):
    # This onnxruntime has no CUDA EP: claiming it is available makes onnxruntime fall back to
    # the CPU with a warning, exactly what happens when CUDA libraries fail to load.
    monkeypatch.setattr(P, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ProviderError) as info:
        check(conv_bn(folded=False), conv_bn(folded=True), providers="cpu,cuda")
    assert str(info.value) == (
        "provider 'cuda': onnxruntime could not initialize CUDAExecutionProvider (the session fell back "
        "to CPUExecutionProvider); fix the installation or pass --allow-missing-providers")
    report = check(conv_bn(folded=False), conv_bn(folded=True), providers="cpu,cuda", allow_missing_providers=True)
    assert report.passed and [c.provider for c in report.comparisons] == ["cpu"]
    assert [s.name for s in report.skipped] == ["cuda"] and report.baselines == []


CUDA_MISSING = "CUDAExecutionProvider" not in ort.get_available_providers()


@pytest.mark.cuda
@pytest.mark.skipif(CUDA_MISSING, reason="onnxruntime's CUDAExecutionProvider is not available "
                                         "(CPU-only onnxruntime or no GPU)")
def test_cuda_validation_against_cpu():
    report = check(conv_bn(folded=False), conv_bn(folded=True), providers=("cpu", "cuda"), samples=2)
    assert report.passed, report.format()
    assert [c.provider for c in report.comparisons] == ["cpu", "cuda"]
    assert report.comparisons[1].session_providers[0] == "CUDAExecutionProvider"
    assert report.comparisons[1].options["use_tf32"] == "0"
    (baseline,) = report.baselines
    assert (baseline.reference, baseline.candidate) == ("reference@cpu", "reference@cuda")
    broken = check(conv_bn(folded=False), conv_bn(folded=True, bn_scale=1.01), providers=("cpu", "cuda"))
    assert not broken.passed and [c.passed for c in broken.comparisons] == [False, False]


def test_baseline_compares_the_reference_across_providers(monkeypatch):
    # Plumbing only: "cuda" runs on the CPU here, so the EP noise it shows is exactly zero.
    monkeypatch.setattr(P, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(P.Provider, "session_providers", lambda self: [("CPUExecutionProvider", {})])
    from bnfold.validation import sessions
    monkeypatch.setattr(sessions.Runner, "providers", lambda self: ("CUDAExecutionProvider", "CPUExecutionProvider"))
    report = check(conv_bn(folded=False), conv_bn(folded=True, bn_scale=1.01), providers="cpu,cuda", samples=2)
    assert [c.provider for c in report.comparisons] == ["cpu", "cuda"] and not report.passed
    (baseline,) = report.baselines
    assert (baseline.kind, baseline.reference, baseline.candidate) == ("baseline", "reference@cpu", "reference@cuda")
    assert baseline.passed and baseline.outputs[0].max_abs_error == 0.0
    assert report.baseline_note is None
    text = report.format()
    assert "execution-provider noise (the reference model against itself; never fails the check):" in text
    assert "cuda provider options: use_tf32=0, cudnn_conv_algo_search=DEFAULT" in text
    assert report.to_dict()["baselines"][0]["outputs"][0]["max_abs_error"] == 0.0
