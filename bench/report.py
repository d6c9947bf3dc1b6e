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
    err_ref: float | None = None        # max |out − unfolded out|, onnxruntime ORT_DISABLE_ALL, all samples
    err_f64: float | None = None        # max |out − float64 evaluation of the unfolded model|, all samples
    fold_err: float | None = None       # max |float64 eval of out − float64 eval of the unfolded model|
    fold_err_reason: str | None = None  # why fold_err is missing
    samples: int | None = None          # input samples the errors are the max over
    dtype: str | None = None            # the workload's float type
    latency_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # level → (before, after), CPU ms
    latency_iqr_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # level → after's quartiles
    latency_wall_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # as latency_ms, wall time
    latency_group: int | None = None    # which side-by-side group measured it (0 unless split for memory)
    latency_reason: str | None = None   # why latency is missing
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
           "max err vs unfolded", "max err vs float64", "fold err (float64 eval)", "ORT ms, no opt",
           "ORT ms, all opt"]


def _fold_cell(r: Row) -> str:
    if r.fold_err is not None:
        return _err(r.fold_err)
    return f"n/a: {_escape(r.fold_err_reason)}" if r.fold_err_reason else "—"


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
                     _err(r.err_f64) if r.ok else f"failed: {_escape(r.reason or 'unknown')}", "",
                     *(f"{r.latency_ms[lv][0]:.2f}" if lv in r.latency_ms else "—" for lv in ("disable", "all"))]
        elif r.wall_s is None:
            cells = [r.workload, tool, f"failed: {_escape(r.reason or 'unknown')}", *["—"] * (len(COLUMNS) - 3)]
        else:
            lat = [_pair(r.latency_ms.get(lv), lambda v: f"{v:.2f}") for lv in ("disable", "all")]
            err_ref = _err(r.err_ref) if r.ok else f"failed: {_escape(r.reason or 'unknown')}"
            cells = [r.workload, tool, f"{r.wall_s:.2f}{_x(r.time_ratio)}",
                     f"{_mb(r.peak_rss)}{_x(r.rss_ratio)}", _pair(r.bn), _pair(r.nodes),
                     _mb(r.bytes[1] if r.bytes else None) + (" ext" if r.external_data else ""),
                     err_ref, _err(r.err_f64), _fold_cell(r) if r.ok else "—", *lat]
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


PEERS = ("onnxoptimizer", "onnxslim", "onnxsim", "ort-basic", "ort-extended")
LOW_PRECISION = ("float16", "bfloat16")
#: bnfold variants with a precision row: tool → how the row names it.
BNFOLD_VARIANTS = {"bnfold": "", "bnfold-compensated": "bnfold --rounding compensated: "}


def _verdict(value: float | None, limit: float) -> str:
    return "n/a" if value is None else ("met" if value <= limit else "not met")


def _latency_verdict(ratio: float, noise: float | None) -> str:
    """``met`` at ≤ 1.0×; ``within noise`` when the excess is no larger than the difference
    this run measured between two identical graphs (the fastest of five noisy peers is the
    bar, so a tie is expected to land above 1.0× half of the time); else ``not met``."""
    if ratio <= 1.0:
        return "met"
    if noise is not None and ratio - 1.0 <= noise:
        return f"within noise (≤ {noise:.0%})"
    return "not met"


def _error_ratio(a: float, b: float) -> float:
    """a / b, with 0 / 0 = 1 (as good as) and a / 0 = inf (worse)."""
    if b > 0:
        return a / b
    return 1.0 if a == 0 else math.inf


def _versus(row: Row, peer_rows: list[Row], attr: str) -> tuple[str, float | None]:
    """'mine vs best peer's (peer, ratio×)' for the error ``attr``, and the ratio (None: n/a)."""
    mine = getattr(row, attr)
    have = [r for r in peer_rows if getattr(r, attr) is not None]
    if mine is None:
        why = row.fold_err_reason if attr == "fold_err" else None
        return ("n/a" + (f": {why}" if why else "")), None
    if not have:
        return f"{_err(mine)} vs n/a (no peer output could be evaluated)", None
    best = min(have, key=lambda r: getattr(r, attr))
    ratio = _error_ratio(mine, getattr(best, attr))
    return f"{_err(mine)} vs {_err(getattr(best, attr))} ({best.tool}, {ratio:.2f}×)", ratio


def _precision_targets(rows: list[Row], w: str, peer_rows: list[Row]) -> list[tuple[str, str, str]]:
    """Error vs float64 against the best of ``peer_rows`` (peers that fold into constants, as
    many BN as bnfold), for each bnfold variant of workload ``w``.

    float32 etc.: "no worse than any peer", decided on the fold error (float64 evaluation of the
    output: free of runtime noise), the onnxruntime-run ratio shown beside it. float16/bfloat16:
    "≤ 0.5 × the best peer", decided on the onnxruntime-run error (what issue 8 measured), the
    fold error shown beside it.
    """
    out = []
    for tool, prefix in BNFOLD_VARIANTS.items():
        row = _find(rows, w, tool)
        if row is None or not row.ok or not peer_rows:
            continue
        n = f"{row.samples} samples" if row.samples else "samples"
        fold, fold_ratio = _versus(row, peer_rows, "fold_err")
        ort, ort_ratio = _versus(row, peer_rows, "err_f64")
        if row.dtype in LOW_PRECISION:
            out.append((f"{w}: {prefix}error vs float64 ≤ 0.5 × best peer that folds as many BN (decided on the "
                        "ORT run)",
                        f"ORT run, max of {n}: {ort}; fold error (float64 eval): {fold}", _verdict(ort_ratio, 0.5)))
        else:
            out.append((f"{w}: {prefix}error vs float64 ≤ 1 × best peer that folds as many BN (decided on the "
                        "fold error, float64 eval)", f"fold error: {fold}; ORT run, max of {n}: {ort}",
                        _verdict(fold_ratio, 1.0)))
    return out


def _latency_ratio(a: Row, b: Row, level: str = "all") -> tuple[float, bool]:
    """a's latency over b's; when they were measured in different groups, each relative to its
    group's unfolded model (True)."""
    (a0, a1), (b0, b1) = a.latency_ms[level], b.latency_ms[level]
    if a.latency_group == b.latency_group:
        return a1 / b1, False
    return (a1 / a0) / (b1 / b0), True


#: Pairs of rows whose models are the same graph: their latency difference is the noise floor.
SAME_GRAPH = ((UNFOLDED, "floor"), ("bnfold", "bnfold-validate"))


def _latency_noise(rows: list[Row], w: str, level: str = "all") -> float | None:
    """The largest relative latency difference, in this run, between two models of workload ``w``
    that are the same graph (:data:`SAME_GRAPH`, measured side by side): what a ratio needs to
    beat to be more than noise."""
    diffs = []
    for a, b in SAME_GRAPH:
        ra, rb = _find(rows, w, a), _find(rows, w, b)
        if (ra is not None and rb is not None and level in ra.latency_ms and level in rb.latency_ms
                and ra.latency_group == rb.latency_group):
            x, y = ra.latency_ms[level][1], rb.latency_ms[level][1]
            diffs.append(abs(x - y) / min(x, y))
    return max(diffs) if diffs else None


def targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """Issue 8's targets that this run's rows can answer: (target, measured, verdict)."""
    out = []
    verdict = _verdict
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
    for w in dict.fromkeys(r.workload for r in rows):
        bn_row = _find(rows, w, "bnfold")
        peer_rows = [r for p in PEERS if (r := _find(rows, w, p)) is not None and r.ok and _folds(r)]
        if bn_row is None or not bn_row.ok or not peer_rows:
            continue
        # A peer that leaves some BN unfolded changes the function less by construction (onnxsim
        # on the decoder, 3 → 2): the precision rows compare only with peers that fold as many.
        out += _precision_targets(rows, w, [r for r in peer_rows if r.bn[1] <= bn_row.bn[1]])
        lat = [(r, *_latency_ratio(bn_row, r)) for r in peer_rows if "all" in r.latency_ms]
        if lat and "all" in bn_row.latency_ms:
            peer, ratio, relative = max(lat, key=lambda t: t[1])
            note = ", each relative to the unfolded model measured beside it" if relative else ""
            noise = _latency_noise(rows, w)
            if noise is not None:
                note += f"; identical graphs differ by {noise:.0%} here"
            out.append((f"{w}: ORT latency of the output ≤ best peer's ({peer.tool})",
                        f"{bn_row.latency_ms['all'][1]:.2f} vs {peer.latency_ms['all'][1]:.2f} ms "
                        f"({ratio:.2f}×{note})", _latency_verdict(ratio, noise)))
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
