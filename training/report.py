"""``softprompt eval-report`` (also ``python -m training.report``): the README's results tables and bar chart, from
the per-task JSON files that ``softprompt eval --json`` writes.

Input: for every task directory ``<tasks-dir>/<task>/`` and every test set ``LABEL=FILE`` (default
``in-template=eval.json`` and ``out-of-template=eval_ood.json``), the eval JSON ``<tasks-dir>/<task>/FILE``. Each
holds the conditions' summaries (:func:`training.evaluate.score`) and, per soft prompt, its adapter's training
metadata (``softprompt_training.json``: method, ``trainable_params``, ``wall_s``), so the report needs nothing
else.

Columns (:data:`COLUMNS`): the five prompt-engineering baselines, then one per training method (prompt tuning,
p-tuning, prefix tuning). A prompt condition lands in its method's column by the ``method`` of its training
metadata, else by its name when that is a method name. A missing task file, condition or method shows ``–``; a
mean over tasks is shown only when every task has the column.

Output, in ``--out`` (default ``docs/eval``): ``results.md`` (one table per test set, cells "exact match /
case-insensitive exact match" in %; the training table; the targets check), ``results.json`` (the same numbers)
and ``eval.png`` (grouped bars of exact match per task and the mean, one panel per test set; needs matplotlib).
With ``--readme FILE``, the markdown also replaces the part of FILE between :data:`START` and :data:`END`.

Targets checked (on the test set named ``out-of-template``, else the last): each method's mean exact match over
the tasks >= 90%, and on each task each method beats the best baseline by >= 10 points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASELINE_COLUMNS = (("base", "base"), ("instruction", "instruction (text)"), ("instruction_chat",
                    "instruction (chat)"), ("few_shot", "few-shot (text)"), ("few_shot_chat", "few-shot (chat)"))
METHOD_COLUMNS = (("prompt_tuning", "prompt tuning"), ("p_tuning", "p-tuning"), ("prefix_tuning", "prefix tuning"))
COLUMNS = BASELINE_COLUMNS + METHOD_COLUMNS
DEFAULT_SETS = (("in-template", "eval.json"), ("out-of-template", "eval_ood.json"))
START, END = "<!-- eval-report:start -->", "<!-- eval-report:end -->"
TARGET_MEAN, TARGET_MARGIN = 0.90, 0.10
DASH = "–"


def method_of(doc: dict, condition: str) -> str | None:
    """The training method of a prompt condition of an eval JSON ``doc``: its metadata's ``method``, else the
    condition's name when it is a method name, else None (baselines included)."""
    meta = ((doc.get("prompts") or {}).get(condition) or {}).get("training") or {}
    method = meta.get("method") or (condition if condition in dict(METHOD_COLUMNS) else None)
    return method if method in dict(METHOD_COLUMNS) else None


def columns_of(doc: dict) -> dict[str, dict]:
    """``{column: {"exact_match", "exact_match_ci", "total", "condition", "training"}}`` of one eval JSON. For a
    method with several prompt conditions, the one named like the method wins, else the first."""
    out: dict[str, dict] = {}
    for cond, s in doc.get("summary", {}).items():
        col = cond if cond in dict(BASELINE_COLUMNS) else method_of(doc, cond)
        if col is None or (col in out and cond != col):
            continue
        training = ((doc.get("prompts") or {}).get(cond) or {}).get("training")
        out[col] = {"exact_match": s["exact_match"], "exact_match_ci": s.get("exact_match_ci", s["exact_match"]),
                    "total": s["total"], "condition": cond, "training": training}
    return out


def load(tasks_dir: Path, tasks: list[str], sets: list[tuple[str, str]]) -> dict[str, dict[str, dict | None]]:
    """``{set label: {task: columns_of(eval JSON) or None when the file is absent}}``.

    Raises:
        ValueError: a file that is not valid JSON, naming it.
    """
    res: dict[str, dict[str, dict | None]] = {}
    for label, name in sets:
        res[label] = {}
        for task in tasks:
            path = tasks_dir / task / name
            if not path.is_file():
                res[label][task] = None
                continue
            try:
                res[label][task] = columns_of(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: not an eval JSON ({exc})") from exc
    return res


def pct(x: float | None) -> str:
    """A fraction as a percentage with at most one decimal (``0.975`` -> ``"97.5"``, ``1.0`` -> ``"100"``)."""
    return DASH if x is None else f"{100 * x:.1f}".removesuffix(".0")


def means(by_task: dict[str, dict | None]) -> dict[str, tuple[float, float] | None]:
    """Per column, the mean (exact, case-insensitive) over tasks, or None unless every task has the column."""
    out: dict[str, tuple[float, float] | None] = {}
    for col, _ in COLUMNS:
        cells = [(t or {}).get(col) for t in by_task.values()]
        out[col] = None if not cells or any(c is None for c in cells) else (
            sum(c["exact_match"] for c in cells) / len(cells), sum(c["exact_match_ci"] for c in cells) / len(cells))
    return out


def training_info(data: dict[str, dict[str, dict | None]]) -> dict[str, dict[str, dict]]:
    """``{method: {task: {"trainable_params", "wall_s", "steps"}}}`` from the prompts' metadata (first set that
    has it)."""
    out: dict[str, dict[str, dict]] = {m: {} for m, _ in METHOD_COLUMNS}
    for by_task in data.values():
        for task, cols in by_task.items():
            for m, _ in METHOD_COLUMNS:
                meta = ((cols or {}).get(m) or {}).get("training")
                if meta and task not in out[m]:
                    out[m][task] = {k: meta.get(k) for k in ("trainable_params", "wall_s", "steps")}
    return out


def _one(values: list) -> str:
    vals = sorted({v for v in values if v is not None})
    if not vals:
        return DASH
    return f"{vals[0]:,}" if len(vals) == 1 else f"{vals[0]:,}-{vals[-1]:,}"


def render_table(label: str, by_task: dict[str, dict | None], train: dict[str, dict[str, dict]]) -> str:
    """One markdown table of a test set: a row per task, the mean, trainable parameters and mean training s."""
    head = "| task | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [f"**{label}** test set: exact match / case-insensitive exact match, % of rows", "", head,
             "|---" * (len(COLUMNS) + 1) + "|"]
    for task, cols in by_task.items():
        cells = [DASH if (c := (cols or {}).get(col)) is None else
                 f"{pct(c['exact_match'])} / {pct(c['exact_match_ci'])}" for col, _ in COLUMNS]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    m = means(by_task)
    lines.append("| **mean** | " + " | ".join(DASH if m[c] is None else f"**{pct(m[c][0])}** / {pct(m[c][1])}"
                                             for c, _ in COLUMNS) + " |")
    params = [DASH] * len(BASELINE_COLUMNS) + [_one([i["trainable_params"] for i in train[m].values()])
                                               for m, _ in METHOD_COLUMNS]
    secs = [DASH] * len(BASELINE_COLUMNS)
    for meth, _ in METHOD_COLUMNS:
        walls = [train[meth].get(t, {}).get("wall_s") for t in by_task]
        secs.append(DASH if any(w is None for w in walls) or not walls else f"{sum(walls) / len(walls):,.0f}")
    lines.append("| trainable parameters | " + " | ".join(params) + " |")
    lines.append("| training seconds (mean over tasks) | " + " | ".join(secs) + " |")
    lines += ["", "Few-shot (text) is scored on the first non-empty line of its output (the line its examples put "
              "the answer on); every other column on the whole output. Baselines (base model included) are the "
              "margin's reference."]
    return "\n".join(lines)


def render_training(tasks: list[str], train: dict[str, dict[str, dict]]) -> str:
    """Markdown: training seconds (and steps) per method and task."""
    lines = ["Training time per task: seconds of the training loop (steps)", "",
             "| method | trainable parameters | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for m, name in METHOD_COLUMNS:
        cells = [DASH if (i := train[m].get(t)) is None or i.get("wall_s") is None else
                 f"{i['wall_s']:,.0f} ({i.get('steps') or '?'})" for t in tasks]
        lines.append(f"| {name} | {_one([i['trainable_params'] for i in train[m].values()])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(by_task: dict[str, dict | None]) -> dict[str, dict]:
    """Per method: ``{"mean", "mean_ok", "margins": {task: points or None}, "margins_ok"}`` against the best
    baseline of each task (``mean`` None, ``*_ok`` False when a task lacks the method)."""
    m = means(by_task)
    out = {}
    for meth, _ in METHOD_COLUMNS:
        margins: dict[str, float | None] = {}
        for task, cols in by_task.items():
            cols = cols or {}
            base = [cols[c]["exact_match"] for c, _ in BASELINE_COLUMNS if c in cols]
            margins[task] = None if meth not in cols or not base else \
                round(100 * (cols[meth]["exact_match"] - max(base)), 1)
        mean = m[meth][0] if m[meth] else None
        out[meth] = {"mean": mean, "mean_ok": mean is not None and mean >= TARGET_MEAN - 1e-9, "margins": margins,
                     "margins_ok": all(v is not None and v >= 100 * TARGET_MARGIN - 1e-9 for v in margins.values())}
    return out


def render_targets(label: str, tg: dict[str, dict]) -> str:
    lines = [f"Targets on the {label} test set: mean exact match >= {pct(TARGET_MEAN)}%, and on every task >= "
             f"{pct(TARGET_MARGIN)} points above the best baseline (margin in points per task):", ""]
    for meth, name in METHOD_COLUMNS:
        t = tg[meth]
        margins = ", ".join(f"{task} {DASH if v is None else f'{v:+g}'}" for task, v in t["margins"].items())
        mean = DASH if t["mean"] is None else f"{pct(t['mean'])}%"
        lines.append(f"- {name}: mean {mean} ({'met' if t['mean_ok'] else 'NOT met'}); margins: "
                     f"{margins} ({'met' if t['margins_ok'] else 'NOT met'})")
    return "\n".join(lines)


def render(data: dict[str, dict[str, dict | None]], tasks: list[str]) -> str:
    """The whole markdown block: a table per test set, the training table, the targets check."""
    train = training_info(data)
    parts = [render_table(label, by_task, train) for label, by_task in data.items()]
    parts.append(render_training(tasks, train))
    target_set = "out-of-template" if "out-of-template" in data else list(data)[-1]
    parts.append(render_targets(target_set, targets(data[target_set])))
    return "\n\n".join(parts) + "\n"


def plot(data: dict[str, dict[str, dict | None]], path: Path) -> None:
    """Grouped bar chart (PNG): one panel per test set, a group per task and the mean, a bar per column.

    Raises:
        ImportError: matplotlib is not installed (``pip install -e '.[dev]'``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["#bbbbbb", "#8fb0d0", "#4f7fae", "#d9b36c", "#b07d2b", "#59a14f", "#e15759", "#7b4ea3"]
    fig, axes = plt.subplots(len(data), 1, figsize=(12, 3.6 * len(data)), squeeze=False)
    for ax, (label, by_task) in zip(axes[:, 0], data.items(), strict=True):
        groups = list(by_task) + ["mean"]
        m = means(by_task)
        width = 0.8 / len(COLUMNS)
        for j, (col, name) in enumerate(COLUMNS):
            xs, ys = [], []
            for i, g in enumerate(groups):
                if g == "mean":
                    c = m[col][0] if m[col] else None
                else:
                    c = ((by_task.get(g) or {}).get(col) or {}).get("exact_match")
                if c is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(100 * c)
            ax.bar(xs, ys, width, label=name, color=colors[j % len(colors)])
        ax.axhline(100 * TARGET_MEAN, color="black", lw=0.8, ls="--", label=f"{pct(TARGET_MEAN)}% target")
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylim(0, 105)
        ax.set_ylabel("exact match, %")
        ax.set_title(f"{label} test set")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=len(handles), fontsize=8, loc="lower center")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between :data:`START` and :data:`END` (markers kept) replaced by ``block``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"markers {START} ... {END} not found")
    return text[:i + len(START)] + "\n" + block + text[j:]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softprompt eval-report", description="The README's results tables and bar "
                                "chart, from the per-task JSON files that softprompt eval --json writes.")
    p.add_argument("--tasks-dir", type=Path, default=Path("examples/tasks"), help="one directory per task (default "
                   "examples/tasks)")
    p.add_argument("--tasks", default=None, help="comma-separated task directories (default: every directory of "
                   "--tasks-dir holding one of the set files, sorted)")
    p.add_argument("--set", action="append", metavar="LABEL=FILE", help="a test set and its eval file name in each "
                   "task directory (repeatable; default in-template=eval.json, out-of-template=eval_ood.json)")
    p.add_argument("--out", type=Path, default=Path("docs/eval"), help="results.md, results.json and eval.png here "
                   "(default docs/eval)")
    p.add_argument("--readme", type=Path, default=None, help=f"also replace the block between {START} and {END}")
    p.add_argument("--no-plot", action="store_true", help="skip eval.png")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 0, or 2 with a message for bad input (no results, a bad file, missing markers)."""
    args = parser().parse_args(argv)
    sets = [tuple(s.split("=", 1)) for s in args.set] if args.set else list(DEFAULT_SETS)
    if any(len(s) != 2 or not all(s) for s in sets):
        print("softprompt eval-report: --set takes LABEL=FILE", file=sys.stderr)
        return 2
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    else:
        tasks = sorted(d.name for d in args.tasks_dir.iterdir() if d.is_dir() and any(
            (d / f).is_file() for _, f in sets)) if args.tasks_dir.is_dir() else []
    try:
        if not tasks:
            raise ValueError(f"no eval files ({', '.join(f for _, f in sets)}) under {args.tasks_dir}")
        data = load(args.tasks_dir, tasks, sets)  # type: ignore[arg-type]
        md = render(data, tasks)
        if args.readme:
            args.readme.write_text(replace_block(args.readme.read_text(encoding="utf-8"), md), encoding="utf-8")
    except (OSError, ValueError) as exc:
        print(f"softprompt eval-report: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(md, encoding="utf-8")
    tg_set = "out-of-template" if "out-of-template" in data else list(data)[-1]
    doc = {"sets": data, "means": {k: means(v) for k, v in data.items()}, "training": training_info(data),
           "targets": {"set": tg_set, "mean": TARGET_MEAN, "margin": TARGET_MARGIN, **targets(data[tg_set])}}
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(md)
    if not args.no_plot:
        plot(data, args.out / "eval.png")
        print(f"chart: {args.out / 'eval.png'}")
    print(f"tables: {args.out / 'results.md'}" + (f", {args.readme} updated" if args.readme else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
