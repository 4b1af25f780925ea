"""`unlearn report`: the comparison table of each job's latest run, read back from MLflow."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from unlearn.errors import BadInput
from unlearn.job import format_table
from unlearn.spec import TrackingSpec
from unlearn.tracking import resolve_uri

REPORT_METRICS = ("FA", "RA", "TA", "MIA", "gap", "KL", "FD", "seconds", "speedup")


def report(experiment: str | None = None, uri: str | None = None) -> str:
    """One table per experiment: the nested method runs of its most recent job run."""
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
        if not parents:
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
    return "\n\n".join(blocks) if blocks else "no unlearning jobs recorded yet"
