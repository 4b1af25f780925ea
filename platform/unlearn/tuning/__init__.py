"""Ray Tune search over one method's declared parameters (`unlearn tune JOB.yaml --method M`).

Search space: every parameter of M that declares a `search` range (params.py), minus those the
spec's entry for M pins in `methods[].params`, plus whatever `tune.space` names (which always wins
and may add parameters). Each range is checked against the parameter's hard bounds before any work:
an unknown parameter or a range outside the declared one ends with one line (exit code 2).

Objectives (both are reported by every trial at every report, with FA/RA/TA/MIA and KL):

* `gap`: Avg.D to the retrain reference, mean(|FA−FA_rt|, |RA−RA_rt|, |TA−TA_rt|, |MIA−MIA_rt|).
  The reference is retrained once per job (cached by content hash like the original model),
  evaluated once, and shared with every trial through the Ray object store.
* `proxy`: retrain-free, for users who cannot afford retraining. With the original model's
  RA₀, TA₀ (measured once):

      proxy = mean( |FA − FA*|, max(0, RA₀ − RA), max(0, TA₀ − TA), |MIA − MIA*| )

  where, if no retained sample carries a label of the target (the target's labels leave the
  model's output space: class forgetting, concept all_matched / target / data), FA* = 0 and
  MIA* = 100 (a retrained model never predicts those labels and the attack calls all of the
  target non-member); otherwise (random forgetting, concept `model` mismatch) FA* = TA₀ (a
  retrained model treats the target like unseen test data) and MIA* = the attack's non-member
  rate on held-out test data under the original model (cross-fitted: the attack is trained on
  retain vs one half of the test set and scored on the other half, both ways, averaged).
  Percent units like gap; 0 is ideal; the MIA term drops out when `eval.mia` is off. The retain
  and test terms are one-sided: a method is not rewarded for beating the original there.

Trials report `tune.reports` times, evenly over their run (ASHA acts on these reports, with
`training_iteration` = reports so far): in-process (`tune.in_process`, or `ray.enabled: false`)
each trial runs the method in its Tune actor (1 CPU); otherwise each trial runs a Ray Train
`TorchTrainer` with `ray.num_workers` workers whose rank 0 evaluates and reports through
`TuneReportCallback`, while the Tune function itself reserves almost no CPU (and aborts its Train
run when Tune stops the trial, so the workers' CPUs are freed at once). Concurrency is capped by
what the cluster can hold. A trial whose loss diverges reports a penalty (100) and ends.

Outputs in DIR: `tune.json` (every trial: config, final metrics, status, reports, executions),
`best.yaml` (the job spec with the best completed trial's params, runnable with `unlearn run`),
`trials.png`; MLflow: a parent run (tag unlearn.kind=tune) with one nested run per trial, the best
tagged `unlearn.best=true`. `unlearn tune --resume DIR` continues an interrupted search
(Ctrl-C, SIGUSR1, a lost driver) via `Tuner.restore`: finished trials are not run again.

Modules: space.py (the search space and plan), objectives.py (proxy targets and objective, the
retrain reference), trials.py (what one trial does, in its Tune actor), driver.py (running the
search, resume), outputs.py (trial rows, the best trial and best.yaml, table, plot, MLflow).
"""

from unlearn.tuning.driver import (
    SEARCH_DIR,
    STATE_FILE,
    TrialProgress,
    resume_tune,
    run_tune,
)
from unlearn.tuning.objectives import (
    PENALTY,
    REPORTED,
    ProxyTargets,
    proxy_objective,
    proxy_targets,
)
from unlearn.tuning.outputs import TOP_ROWS, best_spec, format_trials, plot_trials
from unlearn.tuning.space import (
    KINDS,
    SPACE_KEYS,
    Dimension,
    Plan,
    plan_search,
    search_space,
)
from unlearn.tuning.trials import (
    ABORT_TIMEOUT_S,
    DRIVER_CPU,
    MAILBOX_WAIT_S,
    TRIALS_DIR,
    AbortTrainOnStop,
    SendController,
    Shared,
    TrialReports,
    report_index,
    run_trial,
    trial_job,
)

__all__ = [
    "ABORT_TIMEOUT_S", "DRIVER_CPU", "KINDS", "MAILBOX_WAIT_S", "PENALTY", "REPORTED", "SEARCH_DIR", "SPACE_KEYS",
    "STATE_FILE", "TOP_ROWS", "TRIALS_DIR",
    "AbortTrainOnStop", "Dimension", "Plan", "ProxyTargets", "SendController", "Shared", "TrialProgress",
    "TrialReports",
    "best_spec", "format_trials", "plan_search", "plot_trials", "proxy_objective", "proxy_targets", "report_index",
    "resume_tune", "run_trial", "run_tune", "search_space", "trial_job",
]
