"""Per-request records and the summary figures of one leg (one system running one workload).

Units: tokens/s is generated (completion) tokens, EOS included, divided by the leg's wall-clock seconds;
latencies and TTFTs are seconds. A request may stop early at EOS (no system here is asked to ignore EOS), so the
actual token counts are used and early stops are counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` with linear interpolation between order statistics; NaN when
    ``values`` is empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan
    s = sorted(vals)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class RequestRecord:
    """One request as a client saw it. ``status`` 200 means it finished; anything else is a failure (HTTP
    status, or 599 for a broken stream / transport error) and ``error`` says why."""

    status: int
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class LegResult:
    """One system on one workload: its records (index ``j`` = request ``j`` of the workload), wall time and
    the 1-minute load average when the leg started."""

    system: str
    records: list[RequestRecord]
    wall_s: float
    load1: float
    max_new_tokens: int
    extra: dict = field(default_factory=dict)

    def texts(self) -> dict[int, str]:
        return {j: r.text for j, r in enumerate(self.records) if r.ok}


def texts_equal(a: LegResult, b: LegResult) -> tuple[int, int]:
    """(equal, compared): requests finished by both legs whose generated texts are identical."""
    ta, tb = a.texts(), b.texts()
    common = sorted(set(ta) & set(tb))
    return sum(1 for j in common if ta[j] == tb[j]), len(common)


def summarize(leg: LegResult) -> dict:
    """The JSON-ready summary of a leg (what the table and the plot read)."""
    ok = [r for r in leg.records if r.ok]
    tokens = sum(r.tokens for r in ok)
    lats = [r.latency_s for r in ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    errors = sorted({r.error for r in leg.records if not r.ok and r.error})
    return {
        "system": leg.system,
        "requests": len(leg.records),
        "failed_requests": len(leg.records) - len(ok),
        "errors": errors[:5],
        "wall_s": leg.wall_s,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / leg.wall_s if leg.wall_s > 0 else math.nan,
        "requests_per_s": len(ok) / leg.wall_s if leg.wall_s > 0 else math.nan,
        "early_stops": sum(1 for r in ok if r.tokens < leg.max_new_tokens),
        "latency_p50_s": percentile(lats, 0.5),
        "latency_p95_s": percentile(lats, 0.95),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
        "load_avg_1min_at_start": leg.load1,
        **leg.extra,
    }
