"""Execution providers: short names, availability, and the options that make results comparable.

A provider is named by a short alias (``cpu``, ``cuda``, ``tensorrt``, …, case-insensitive)
or by any full onnxruntime EP name (``CUDAExecutionProvider``). A name that is neither is a
usage error; a known provider that this onnxruntime build lacks is a
:class:`~bnfold.errors.ProviderError` unless missing providers are allowed, in which case it
is reported as skipped with the reason.

Options set for comparability (recorded in every report):

* CUDA: ``use_tf32 = 0`` (onnxruntime enables TF32 by default on Ampere and newer; TF32
  rounds float32 convolution and matmul inputs to 10 mantissa bits, ~1e-3 relative, which
  would drown a fold error of 1e-6 in EP noise and make float32 tolerances meaningless), and
  ``cudnn_conv_algo_search = DEFAULT`` (a fixed cuDNN algorithm instead of the timing-based
  EXHAUSTIVE search, so the reference and the candidate's convolutions, which have the same
  shapes, are computed by the same algorithm and the check is repeatable run to run).
* TensorRT: ``trt_fp16_enable = False``, ``trt_int8_enable = False`` (no reduced precision
  behind the user's back); CUDA with the options above is its fallback for unsupported nodes.
* Every provider: the CPU EP is the final fallback, as onnxruntime itself does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnxruntime as ort

from bnfold.errors import ProviderError, UsageError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

#: short name → full onnxruntime execution-provider name.
ALIASES: dict[str, str] = {
    "cpu": CPU,
    "cuda": CUDA,
    "tensorrt": TENSORRT,
    "trt": TENSORRT,
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "cann": "CANNExecutionProvider",
    "acl": "ACLExecutionProvider",
}

#: Provider options bnfold sets so results are comparable (see the module docstring).
COMPARABLE_OPTIONS: dict[str, dict[str, str]] = {
    CUDA: {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"},
    TENSORRT: {"trt_fp16_enable": "False", "trt_int8_enable": "False"},
}

# What a provider falls back to for nodes it cannot run (before the CPU EP).
_FALLBACKS: dict[str, tuple[str, ...]] = {TENSORRT: (CUDA,)}


@dataclass(frozen=True)
class Provider:
    """One provider a check runs on: the name the user gave and what onnxruntime gets."""

    name: str                      # short name as reported ("cpu", "cuda", or the full EP name)
    ep: str                        # full onnxruntime EP name
    options: dict[str, str] = field(default_factory=dict)

    def session_providers(self) -> list[tuple[str, dict[str, str]]]:
        """The ``providers=`` list for an InferenceSession: this EP, its fallbacks, then CPU."""
        chain = [(self.ep, dict(self.options))]
        for fallback in _FALLBACKS.get(self.ep, ()):
            if fallback in available_providers():
                chain.append((fallback, dict(COMPARABLE_OPTIONS.get(fallback, {}))))
        if self.ep != CPU:
            chain.append((CPU, {}))
        return chain


@dataclass(frozen=True)
class SkippedProvider:
    """A requested provider that did not run, and why."""

    name: str
    ep: str
    reason: str


def available_providers() -> list[str]:
    """The EPs this onnxruntime build can use (a function so tests can replace it)."""
    return list(ort.get_available_providers())


def canonical_ep(name: str) -> str:
    """Full EP name for a short or full provider name; UsageError for an unknown one."""
    key = name.strip()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    known = set(ort.get_all_providers()) | set(ALIASES.values())
    for ep in known:
        if key.lower() == ep.lower():
            return ep
    raise UsageError(
        f"--providers: unknown execution provider {name!r}; use one of "
        f"{', '.join(sorted(ALIASES))} or a full onnxruntime provider name"
    )


def short_name(ep: str) -> str:
    for alias, full in ALIASES.items():
        if full == ep:
            return alias
    return ep


def resolve_providers(names, *, allow_missing: bool = False) -> tuple[list[Provider], list[SkippedProvider]]:
    """Map requested names to providers to run and providers skipped (with reasons).

    Args:
        names: short or full provider names, in the order to run them; duplicates collapse.
        allow_missing: report a provider this onnxruntime lacks as skipped instead of raising
            ProviderError.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    names = list(names)
    if not names:
        raise UsageError("--providers: no execution provider given")
    available = available_providers()
    run: list[Provider] = []
    skipped: list[SkippedProvider] = []
    seen: set[str] = set()
    for name in names:
        ep = canonical_ep(name)
        if ep in seen:
            continue
        seen.add(ep)
        short = short_name(ep)
        if ep not in available:
            reason = (f"{ep} is not available in this onnxruntime "
                      f"(available: {', '.join(available)})")
            if not allow_missing:
                raise ProviderError(f"provider {short!r}: {reason}; install the matching onnxruntime "
                                    "package or pass --allow-missing-providers")
            skipped.append(SkippedProvider(name=short, ep=ep, reason=reason))
            continue
        run.append(Provider(name=short, ep=ep, options=dict(COMPARABLE_OPTIONS.get(ep, {}))))
    return run, skipped
