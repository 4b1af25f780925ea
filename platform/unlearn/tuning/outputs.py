"""The results of a search: each trial's row and status, the best trial and its runnable spec, the
table, the plot, and the MLflow runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearn.spec import validate
from unlearn.tuning.objectives import REPORTED
from unlearn.tuning.space import Plan
from unlearn.tuning.trials import TRIALS_DIR, _plain

if TYPE_CHECKING:
    from unlearn.tuning.driver import _State

TOP_ROWS = 5


def _config_text(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in config.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def _status(trial_status: str, metrics: dict[str, Any], error: Any) -> str:
    if trial_status == "ERROR" or error is not None:
        return "error"
    if metrics.get("diverged"):
        return "diverged"
    if metrics.get("final"):
        return "completed"
    if trial_status == "TERMINATED":
        return "early_stopped"
    return "unfinished"


def _executions(out_dir: Path, trial_id: str) -> int:
    path = out_dir / TRIALS_DIR / f"{trial_id}.log"
    return sum(1 for line in path.read_text().splitlines() if line.startswith("start")) if path.is_file() else 0


def _trial_rows(grid, out_dir: Path) -> list[dict[str, Any]]:
    """One row per trial of a ResultGrid: config, final metrics, status, reports, history.

    Statuses come from the experiment state Tune saved (an interrupted trial is saved as running or
    pending; in memory Tune has already marked it terminated while cleaning up).
    """
    from ray.tune import ExperimentAnalysis

    from unlearn.tuning.driver import SEARCH_DIR  # lazily: driver imports this module

    trials = {t.trial_id: t for t in ExperimentAnalysis(str((out_dir / SEARCH_DIR).resolve())).trials}
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        trial = trials.get(trial_id)
        status = _status(trial.status if trial else "", metrics, result.error)
        history = []
        frame = result.metrics_dataframe
        if frame is not None and len(frame):
            keep = [c for c in ("training_iteration", *REPORTED, "progress") if c in frame.columns]
            history = [{k: _plain(v) for k, v in r.items()} for r in frame[keep].to_dict("records")]
        rows.append({
            "trial_id": trial_id,
            "config": {k: _plain(v) for k, v in (trial.config if trial else result.config or {}).items()},
            "status": status,
            "metrics": {k: _plain(metrics[k]) for k in REPORTED if k in metrics},
            "reports": int(metrics.get("training_iteration", 0) or 0),
            "seconds": _plain(metrics.get("seconds")),
            "executions": _executions(out_dir, trial_id),
            "error": str(result.error).strip().splitlines()[-1][:300] if result.error is not None else None,
            "history": history,
        })
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def _best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best completed trial (an early-stopped trial's metric is from part of a run)."""
    def value(r):
        v = r["metrics"].get(metric)
        return v if v is not None and math.isfinite(v) else None

    for pool in ([r for r in rows if r["status"] == "completed"], [r for r in rows if r["status"] == "early_stopped"]):
        scored = [r for r in pool if value(r) is not None]
        if scored:
            return (min if mode == "min" else max)(scored, key=value)
    return None


def best_spec(plan: Plan, params: dict[str, Any]) -> dict[str, Any]:
    """The job spec with the tuned method's params replaced by `params`, retrain kept as the reference."""
    data = plan.spec.model_dump(mode="json")
    retrain = next((m.model_dump(mode="json", exclude_none=True) for m in plan.spec.methods if m.name == "retrain"),
                   {"name": "retrain"})
    entry = {"name": plan.method, "params": params}
    if plan.entry.label:
        entry["label"] = plan.entry.label
    data["methods"] = [retrain, entry]
    data["tune"]["method"] = plan.method
    validate(data)
    return data


def plot_trials(rows: list[dict[str, Any]], plan: Plan, path: Path) -> Path:
    """Objective vs each searched parameter, one subplot per parameter (log x for loguniform)."""
    from unlearn import plots  # noqa: F401, I001  (selects the Agg backend, so first)
    import matplotlib.pyplot as plt

    names = list(plan.space)
    cols = min(len(names), 3)
    lines = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.2 * cols, 3.4 * lines), squeeze=False)
    styles = {"completed": ("o", "tab:blue"), "early_stopped": ("x", "tab:orange"), "diverged": ("s", "tab:red")}
    best = _best(rows, plan.metric, plan.spec.tune.mode)
    for ax, name in zip(axes.flat, names):
        dim = plan.space[name]
        for status, (marker, color) in styles.items():
            pts = [(r["config"].get(name), r["metrics"].get(plan.metric)) for r in rows if r["status"] == status]
            pts = [(x, y) for x, y in pts if x is not None and y is not None and math.isfinite(y)]
            if dim.kind == "choice":
                pts = [(list(dim.values).index(x), y) for x, y in pts if x in dim.values]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, label=status.replace("_", " "), alpha=0.8)
        if best is not None and name in best["config"]:
            x = best["config"][name]
            x = list(dim.values).index(x) if dim.kind == "choice" else x
            ax.scatter([x], [best["metrics"][plan.metric]], s=160, facecolors="none", edgecolors="black", label="best")
        if dim.kind == "choice":
            ax.set_xticks(range(len(dim.values)))
            ax.set_xticklabels([str(v) for v in dim.values], rotation=30, fontsize=8)
        elif dim.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(plan.metric)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{plan.spec.name}: {plan.method} trials ({plan.metric}, {plan.spec.tune.mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def format_trials(rows: list[dict[str, Any]], plan: Plan, top: int = TOP_ROWS) -> str:
    """The best trials as an aligned table: metrics, then the searched params."""
    metric, mode = plan.metric, plan.spec.tune.mode
    scored = [r for r in rows if r["metrics"].get(metric) is not None and math.isfinite(r["metrics"][metric])]
    scored.sort(key=lambda r: r["metrics"][metric], reverse=mode == "max")
    shown = [k for k in REPORTED if any(_finite(r["metrics"].get(k)) for r in scored)]  # the task's own numbers
    header = ["trial", "status", *shown, *plan.space]
    table = [header] + [[r["trial_id"], r["status"], *(_short(r["metrics"].get(k)) for k in shown),
                         *(_short(r["config"].get(k)) for k in plan.space)] for r in scored[:top]]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    text = ["  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
            for line in table]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text) if scored else "(no trial reported)"


def _log_mlflow(tracker, plan: Plan, rows: list[dict[str, Any]], payload: dict[str, Any], out_dir: Path,
                state: _State) -> None:
    """DIR/trials.png; nested runs for trials not logged yet (from the driver: no store contention), best tags."""
    runs = state.data["mlflow"]
    parent = runs.get("parent")
    plot = plot_trials(rows, plan, out_dir / "trials.png") if rows else None
    if not parent:
        return
    logged: dict[str, str] = runs.setdefault("trials", {})
    for row in rows:
        if row["trial_id"] in logged or row["status"] == "unfinished":
            continue
        run_id = tracker.start(f"trial-{row['trial_id']}", parent=parent,
                               tags={"unlearn.kind": "tune-trial", "unlearn.method": plan.method,
                                     "unlearn.trial_id": row["trial_id"], "unlearn.status": row["status"]})
        tracker.params(run_id, {**row["config"], **{f"fixed.{k}": v for k, v in plan.fixed.items()}})
        for point in row["history"]:
            tracker.metrics(run_id, {k: v for k, v in point.items() if k != "training_iteration"},
                            step=int(point.get("training_iteration", 0)))
        tracker.metrics(run_id, {**row["metrics"], "reports": row["reports"]})
        tracker.end(run_id, "FAILED" if row["status"] == "error" else "FINISHED")
        logged[row["trial_id"]] = run_id
    best = payload["best"]
    previous = runs.get("best")
    if best is not None and best["trial_id"] != previous and best["trial_id"] in logged:
        if previous in logged:
            tracker.tag(logged[previous], "unlearn.best", "false")
        tracker.tag(logged[best["trial_id"]], "unlearn.best", "true")
        runs["best"] = best["trial_id"]
        tracker.tag(parent, "unlearn.best_trial", best["trial_id"])
        for k, v in best["config"].items():
            tracker.tag(parent, f"unlearn.best.{k}", str(v))
        tracker.metrics(parent, {f"best.{k}": v for k, v in best["metrics"].items() if v is not None})
    if plot is not None:
        tracker.artifact(parent, plot)
