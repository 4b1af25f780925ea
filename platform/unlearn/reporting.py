"""`unlearn report`: the comparison table of each job's latest run, and of each method's latest Tune search
(one row per trial: status, metrics, the searched params; `*` marks the best), read back from MLflow."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from unlearn.errors import BadInput
from unlearn.job import format_table
from unlearn.spec import TrackingSpec
from unlearn.tracking import resolve_uri

REPORT_METRICS = ("FA", "RA", "TA", "ASR", "clean_TA", "MIA", "gap", "KL", "FD", "seconds", "speedup")
TRIAL_METRICS = ("gap", "proxy", "FA", "RA", "TA", "MIA", "KL")


def report(experiment: str | None = None, uri: str | None = None) -> str:
    """Per experiment: the nested method runs of its most recent job run, and the trials of each method's
    most recent Tune search."""
    client = MlflowClient(tracking_uri=uri or resolve_uri(TrackingSpec()))
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = [e.name for e in client.search_experiments()]
            raise BadInput(f"no MLflow experiment named {experiment!r}; known: {', '.join(names) or 'none'}")
        experiments = [found]
    else:
        experiments = [e for e in client.search_experiments() if e.name != "Default"]
    blocks = []
    for exp in experiments:
        parents = client.search_runs([exp.experiment_id], "tags.`unlearn.kind` = 'job'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        searches = _searches(client, exp)
        if not parents:
            blocks.extend(searches)
            continue
        parent = parents[0]
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                      order_by=["attributes.start_time ASC"])
        rows = {"original": {k.split(".", 1)[1]: v for k, v in parent.data.metrics.items()
                             if k.startswith("original.") and k.split(".", 1)[1] in REPORT_METRICS}}
        for child in children:
            rows[child.info.run_name] = {k: v for k, v in child.data.metrics.items() if k in REPORT_METRICS}
            if child.info.status != "FINISHED":
                rows[child.info.run_name]["status"] = child.info.status
        blocks.append(f"{exp.name} (run {parent.info.run_id[:8]}, {parent.info.status})\n{format_table(rows)}")
        blocks.extend(searches)
    return "\n\n".join(blocks) if blocks else "no unlearning jobs recorded yet"


def _searches(client: MlflowClient, exp) -> list[str]:
    """One table per method: the trials of its most recent `unlearn tune` search in this experiment."""
    latest: dict[str, object] = {}
    for run in client.search_runs([exp.experiment_id], "tags.`unlearn.kind` = 'tune'",
                                  order_by=["attributes.start_time DESC"]):
        latest.setdefault(run.data.tags.get("unlearn.method", run.info.run_name), run)
    blocks = []
    for method, parent in latest.items():
        trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                    order_by=["attributes.start_time ASC"])
        metric, mode = parent.data.params.get("tune.metric", "gap"), parent.data.params.get("tune.mode", "min")
        best = parent.data.tags.get("unlearn.best_trial")
        blocks.append(f"{exp.name}: tune {method} (run {parent.info.run_id[:8]}, {parent.info.status}; "
                      f"{len(trials)} trials, {metric} {mode}, * best)\n{format_trials(trials, metric, mode, best)}")
    return blocks


def format_trials(trials: list, metric: str, mode: str, best: str | None) -> str:
    """Trial runs as a table, best first: status, the Tune metrics, then the searched params."""
    params = sorted({k for t in trials for k in t.data.params if not k.startswith("fixed.")})
    metrics = [k for k in TRIAL_METRICS if any(k in t.data.metrics for t in trials)]

    def key(t) -> tuple[bool, float]:
        value = t.data.metrics.get(metric)
        return value is None, (value if mode == "min" else -value) if value is not None else 0.0

    header = ["trial", "status", *metrics, *params]
    rows = [[("* " if t.data.tags.get("unlearn.trial_id") == best else "  ") + t.data.tags.get(
                 "unlearn.trial_id", t.info.run_name),
             t.data.tags.get("unlearn.status", t.info.status.lower()),
             *(_short(t.data.metrics.get(k)) for k in metrics), *(_short(t.data.params.get(k)) for k in params)]
            for t in sorted(trials, key=key)]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w)  # noqa: E731
                               for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)]) if rows else "(no trials)"


def _short(value) -> str:
    """Metrics with 2 decimals, numeric params with 4 significant digits, anything else as it is."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    try:
        number = float(value)
    except ValueError:
        return str(value)
    return str(value) if number.is_integer() and "." not in str(value) else f"{number:.4g}"
