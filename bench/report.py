"""The bench's results as data (:class:`Row`), the ratios, the Markdown table and the targets.

Ratios are always taken between rows of the same workload in the same bench run (the machine
is shared and noisy; numbers from different runs are not comparable). ``time ×floor`` is a
tool's median wall time over the floor's (``onnx.load`` + ``onnx.save``) median wall time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

UNFOLDED = "(unfolded)"


@dataclass
class Row:
    workload: str
    tool: str
    ok: bool = True
    reason: str | None = None           # one line when not ok (tool failed or output unusable)
    wall_s: float | None = None         # median
    walls: list[float] = field(default_factory=list)
    peak_rss: int | None = None         # bytes, median
    time_ratio: float | None = None     # vs the floor, same run
    rss_ratio: float | None = None
    bn: tuple[int, int] | None = None           # before, after
    nodes: tuple[int, int] | None = None
    bytes: tuple[int, int] | None = None
    err_ref: float | None = None        # max |out − unfolded out|, onnxruntime ORT_DISABLE_ALL
    err_f64: float | None = None        # max |out − float64 evaluation of the unfolded model|
    latency_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # level → (before, after)
    external_data: bool | None = None   # the output keeps tensors in external files

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def add_ratios(rows: list[Row], floor: str = "floor") -> None:
    """Fill ``time_ratio`` and ``rss_ratio`` of every row from its workload's floor row."""
    floors = {r.workload: r for r in rows if r.tool == floor and r.ok}
    for r in rows:
        f = floors.get(r.workload)
        if f is not None and r.ok:
            r.time_ratio = _ratio(r.wall_s, f.wall_s)
            r.rss_ratio = _ratio(r.peak_rss, f.peak_rss)


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def _x(r: float | None) -> str:
    return "" if r is None else f" ({r:.2f}×)"


def _err(e: float | None) -> str:
    if e is None:
        return "—"
    if math.isinf(e):
        return "inf"
    return "0" if e == 0 else f"{e:.3g}"


def _pair(p, fmt=str) -> str:
    return "—" if p is None else f"{fmt(p[0])} → {fmt(p[1])}"


COLUMNS = ["workload", "tool", "wall s (×floor)", "peak RSS MiB (×floor)", "BN", "nodes", "output MiB",
           "max err vs unfolded", "max err vs float64", "ORT ms, no opt", "ORT ms, all opt"]


def render_markdown(rows: list[Row], labels: dict[str, str] | None = None) -> str:
    """One Markdown table, one line per (workload, tool); failures say why in the wall column."""
    labels = labels or {}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        tool = labels.get(r.tool, r.tool)
        if r.tool == UNFOLDED:
            cells = [r.workload, tool, "", "", str(r.bn[0]) if r.bn else "—",
                     str(r.nodes[0]) if r.nodes else "—",
                     _mb(r.bytes[0] if r.bytes else None) + (" ext" if r.external_data else ""), "",
                     _err(r.err_f64), *(f"{r.latency_ms[lv][0]:.2f}" if lv in r.latency_ms else "—"
                                        for lv in ("disable", "all"))]
        elif r.wall_s is None:
            cells = [r.workload, tool, f"failed: {_escape(r.reason or 'unknown')}", *["—"] * 8]
        else:
            lat = [_pair(r.latency_ms.get(lv), lambda v: f"{v:.2f}") for lv in ("disable", "all")]
            err_ref = _err(r.err_ref) if r.ok else f"failed: {_escape(r.reason or 'unknown')}"
            cells = [r.workload, tool, f"{r.wall_s:.2f}{_x(r.time_ratio)}",
                     f"{_mb(r.peak_rss)}{_x(r.rss_ratio)}", _pair(r.bn), _pair(r.nodes),
                     _mb(r.bytes[1] if r.bytes else None) + (" ext" if r.external_data else ""),
                     err_ref, _err(r.err_f64), *lat]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _find(rows, workload, tool) -> Row | None:
    return next((r for r in rows if r.workload == workload and r.tool == tool), None)


def _folds(r: Row) -> bool:
    """BN nodes went away and no nodes were added: folded into constants, not into runtime
    arithmetic (onnxoptimizer's fuse_bn_into_conv emits the fold as Sqrt/Div/Mul nodes)."""
    return bool(r.bn and r.nodes and r.bn[1] < r.bn[0] and r.nodes[1] <= r.nodes[0])


def targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """Issue 8's targets that this run's rows can answer: (target, measured, verdict)."""
    out = []

    def verdict(value, limit):
        return "n/a" if value is None else ("met" if value <= limit else "not met")

    bn = _find(rows, "resnet50", "bnfold")
    if bn is not None and bn.ok:
        basic = _find(rows, "resnet50", "ort-basic")
        r_basic = _ratio(bn.wall_s, basic.wall_s) if basic and basic.ok else None
        out.append(("ResNet-50 fp32: bnfold ≤ 0.8 × floor", f"{bn.time_ratio:.2f}×" if bn.time_ratio else "n/a",
                    verdict(bn.time_ratio, 0.8)))
        out.append(("ResNet-50 fp32: bnfold ≤ 1.0 × ORT basic", f"{r_basic:.2f}×" if r_basic else "n/a",
                    verdict(r_basic, 1.0)))
    xl = _find(rows, "wide-XL", "bnfold")
    if xl is not None and xl.ok:
        size = xl.bytes[0] if xl.bytes else None
        rss = _ratio(xl.peak_rss, size)
        out.append(("wide-XL (external data): bnfold ≤ 0.5 × floor time",
                    f"{xl.time_ratio:.2f}×" if xl.time_ratio else "n/a", verdict(xl.time_ratio, 0.5)))
        out.append(("wide-XL: bnfold peak RSS ≤ 0.5 × model size", f"{rss:.2f}×" if rss else "n/a",
                    verdict(rss, 0.5)))
    peers = ("onnxoptimizer", "onnxslim", "onnxsim", "ort-basic", "ort-extended")
    for w in dict.fromkeys(r.workload for r in rows):
        bn_row = _find(rows, w, "bnfold")
        peer_rows = [r for p in peers if (r := _find(rows, w, p)) is not None and r.ok and _folds(r)]
        if bn_row is None or not bn_row.ok or bn_row.err_f64 is None or not peer_rows:
            continue
        best = min(peer_rows, key=lambda r: r.err_f64 if r.err_f64 is not None else math.inf)
        if best.err_f64 is None:
            continue
        factor = 0.5 if w == "resnet50-fp16" else 1.0
        ratio = _ratio(bn_row.err_f64, best.err_f64)
        out.append((f"{w}: error vs float64 ≤ {factor:g} × best peer that folds ({best.tool})",
                    f"{_err(bn_row.err_f64)} vs {_err(best.err_f64)}" + (f" ({ratio:.2f}×)" if ratio else ""),
                    verdict(ratio, factor) if best.err_f64 > 0 else ("met" if bn_row.err_f64 == 0 else "not met")))
        lat = [(r.latency_ms["all"][1], r.tool) for r in peer_rows if "all" in r.latency_ms]
        if lat and "all" in bn_row.latency_ms:
            fastest = min(lat)
            ratio = bn_row.latency_ms["all"][1] / fastest[0]
            out.append((f"{w}: ORT latency of the output ≤ best peer's ({fastest[1]})",
                        f"{bn_row.latency_ms['all'][1]:.2f} vs {fastest[0]:.2f} ms ({ratio:.2f}×)", verdict(ratio, 1.0)))
    for tool in ("bnfold", "floor"):
        pts = [(r.bytes[0], r.wall_s, r.peak_rss) for w in ("wide-S", "wide-M", "wide-L")
               if (r := _find(rows, w, tool)) is not None and r.ok and r.bytes]
        if len(pts) == 3:
            t0, t1, t_dev = _line([p[0] / 1e9 for p in pts], [p[1] for p in pts])
            m0, m1, m_dev = _line([p[0] / 1e9 for p in pts], [p[2] / 1e9 for p in pts])
            out.append((f"linear scaling ({tool}, wide S/M/L)",
                        f"time ≈ {t0:.2f} s + {t1:.2f} s/GB (worst point {t_dev:.0%} off the line); "
                        f"peak RSS ≈ {m0 * 1e3:.0f} MB + {m1:.2f} × model size ({m_dev:.0%} off)",
                        "linear" if max(t_dev, m_dev) <= 0.15 else "not linear"))
    return out


def _line(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least-squares y ≈ a + b·x; returns a, b and the worst relative deviation of a point."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx if sxx else 0.0
    a = my - b * mx
    dev = max(abs(yi - (a + b * xi)) / yi for xi, yi in zip(x, y) if yi)
    return a, b, dev


def render_targets(rows: list[Row]) -> str:
    items = targets(rows)
    if not items:
        return ""
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in items]
    return "\n".join(lines)
