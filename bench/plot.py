"""The benchmark figure (matplotlib, Agg backend, PNG): up to four panels from the results dict.

1. tokens/s per system for the standard and long scenarios (grouped bars);
2. tokens/s vs number of tasks (log x), uniform levels as a line, Zipf levels as separate markers;
3. TTFT p50 / p95 vs offered rate, per system;
4. end-to-end latency p50 / p95 vs offered rate, per system.

A panel whose scenario did not run says so. matplotlib is an optional dependency (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

from .report import SYSTEM_ORDER

COLORS = {"server": "tab:blue", "vllm": "tab:orange", "hf-padded-batch": "tab:green", "hf-sequential": "tab:gray"}


def _empty(ax, title: str, why: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _bars(ax, scenarios: dict) -> None:
    names = [n for n in ("standard", "long") if n in scenarios]
    if not names:
        return _empty(ax, "tokens/s by system", "standard / long not run")
    systems = [s for s in SYSTEM_ORDER if any(s in scenarios[n]["legs"] for n in names)]
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        xs, ys = [], []
        for k, n in enumerate(names):
            tps = scenarios[n]["legs"].get(system, {}).get("tokens_per_s")
            if tps is not None:
                xs.append(k + (i - (len(systems) - 1) / 2) * width)
                ys.append(tps)
        bars = ax.bar(xs, ys, width, label=system, color=COLORS.get(system))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("tokens/s")
    ax.set_title("tokens/s by system")
    ax.legend(fontsize=7)


def _tasks(ax, sc: dict | None) -> None:
    if not sc or not sc.get("levels"):
        return _empty(ax, "tokens/s vs tasks", "many-tasks not run")
    uni = sorted((lv["tasks"], lv["server"]["tokens_per_s"]) for lv in sc["levels"] if lv["distribution"] == "uniform")
    zipf = [(lv["tasks"], lv["server"]["tokens_per_s"]) for lv in sc["levels"] if lv["distribution"] == "zipf"]
    if uni:
        ax.plot(*zip(*uni, strict=True), "o-", color=COLORS["server"], label="server, uniform")
    if zipf:
        ax.plot(*zip(*zipf, strict=True), "s", color="tab:red", label="server, Zipf")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tasks")
    ax.set_ylabel("tokens/s")
    ax.set_title("tokens/s vs number of tasks")
    ax.legend(fontsize=7)


def _load(ax, sc: dict | None, key: str, title: str) -> None:
    if not sc or not sc.get("rates"):
        return _empty(ax, title, "offered-load not run")
    systems = [s for s in SYSTEM_ORDER if any(s in r["legs"] and "error" not in r["legs"][s] for r in sc["rates"])]
    for system in systems:
        pts = [(r["rate_rps"], r["legs"][system]) for r in sc["rates"]
               if system in r["legs"] and "error" not in r["legs"][system]]
        xs = [x for x, _ in pts]
        ax.plot(xs, [s[f"{key}_p50_s"] for _, s in pts], "o-", color=COLORS.get(system), label=f"{system} p50")
        ax.plot(xs, [s[f"{key}_p95_s"] for _, s in pts], "o--", color=COLORS.get(system), label=f"{system} p95")
    ax.set_xlabel("offered load (requests/s, Poisson)")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot(res: dict, path: str) -> None:
    """Write the figure to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = res.get("scenarios", {})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    _bars(axes[0][0], sc)
    _tasks(axes[0][1], sc.get("many-tasks"))
    _load(axes[1][0], sc.get("offered-load"), "ttft", "time to first token vs offered load")
    _load(axes[1][1], sc.get("offered-load"), "latency", "latency vs offered load")
    fig.suptitle(f"softprompt bench: {res.get('model', '')}, {res.get('cpu_count', '?')} CPUs", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
