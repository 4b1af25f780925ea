"""`unlearn run | tune | methods | report | register`: wiring only; the work lives in job.py, tuning/, tracking.py.

Exit codes: 0 done, 2 bad spec or usage (one line naming the cause), 1 failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from unlearn.errors import BadInput

DEFAULT_JOB = Path(__file__).resolve().parents[2] / "jobs" / "quickstart.yaml"


def cmd_run(args: argparse.Namespace) -> int:
    from unlearn import spec as spec_mod

    if args.resume:  # the interrupted job's own output folder
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise BadInput(f"--resume {args.resume} and --out {args.out}: a job resumes in its own folder (give one)")
        args.out = args.resume
        from unlearn.resume import STATE_FILE

        if not (Path(args.resume) / STATE_FILE).is_file():  # before anything is created there
            raise BadInput(f"nothing to resume in {args.resume}: no {STATE_FILE} (was the job started with this --out?)")
    spec = spec_mod.load(args.job, args.set)
    if args.seeds is not None:  # --seeds N: the spec's seed and the N - 1 after it
        spec = spec_mod.validate({**spec.model_dump(mode="json"), "seeds": list(range(spec.seed, spec.seed + args.seeds))})
    from unlearn.preflight import preflight

    # Before Ray starts: the folder job.run_job writes to (same default), the engine's storage, MLflow's server.
    preflight(spec, Path(args.out) if args.out else Path("results") / spec.name)
    with _session(spec, "unlearn.job", "unlearn.engine", "unlearn.local_trainer"):
        from unlearn.job import run_job

        results = run_job(spec, Path(args.out) if args.out else None, resume=bool(args.resume),
                          progress="quiet" if args.quiet else "auto")
    if results["failed"]:  # every other run finished and is written; one line per run that did not
        for label in results["failed"]:
            print(f"failed: {label}: {results['methods'][label]['error']}", file=sys.stderr)
        return 1
    return 0


def _session(spec, *modules: str):
    """The job's Ray session, started while the job's modules import (none for in-process jobs)."""
    if not spec.ray.enabled:
        return contextlib.nullcontext()
    from unlearn.ray_session import session_while_importing

    # MLflow's SQL store (its SQLAlchemy models: ~2 s) and the plots' matplotlib come later in the job
    # (ray_session.connect keeps the CLI's SIGTERM handler, which ray.init would replace with sys.exit)
    return session_while_importing(spec.ray, modules,
                                   optional=("mlflow.store.tracking.sqlalchemy_store", "unlearn.plots"))


def cmd_methods(args: argparse.Namespace) -> int:
    from unlearn.methods import REGISTRY
    from unlearn.params import bounds, field_doc

    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        print(f"{name}: {cls.summary}")
        print(f"  uses: {', '.join(sorted(cls.uses))}; tasks: {', '.join(sorted(cls.tasks))}; paper: {cls.paper}")
        for pname, field in cls.Params.model_fields.items():
            help_text, paper, search = field_doc(field)
            low, high = bounds(field)
            rng = f" range [{low}, {high}]" if low is not None or high is not None else ""
            tune = f" search {search['kind']}({search['low']}, {search['high']})" if search and search["kind"] != "choice" else (
                f" search choice{list(search['values'])}" if search else "")
            src = f" [{paper}]" if paper else ""
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            per_family = "".join(f", {f}: {v!r}" for f, v in (extra.get("family") or {}).items())
            print(f"    {pname} = {field.default!r}{per_family}{rng}{tune}  {help_text}{src}")
        print()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from unlearn.reporting import report

    print(report(args.experiment, args.tracking_uri))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from unlearn.registry import register

    done = register(args.run_id, args.name, args.alias, args.tracking_uri)
    alias = f", alias {done['alias']}" if done["alias"] else ""
    print(f"registered {done['name']} version {done['version']}{alias} ({done['source']}, run {done['run_id']})")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from unlearn import spec as spec_mod
    from unlearn.tuning import resume_tune, run_tune

    if args.resume:
        resume_tune(Path(args.resume))
        return 0
    if not args.job:
        raise BadInput("unlearn tune: give a JOB.yaml (or --resume DIR)")
    spec = spec_mod.load(args.job, args.set)
    from unlearn.preflight import preflight

    # MLflow's server before any work; run_tune checks its output folder (default named after the method) itself.
    preflight(spec, Path(args.out) if args.out else None, engine_storage=False)
    run_tune(spec, method=args.method, num_samples=args.num_samples, out_dir=Path(args.out) if args.out else None)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unlearn", description="Machine unlearning at cluster scale (Ray + MLflow).")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job: every method of the spec, evaluated against retrain")
    run.add_argument("job", nargs="?", default=str(DEFAULT_JOB), help="job spec YAML (default: jobs/quickstart.yaml)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field, e.g. ray.num_workers=1")
    run.add_argument("--out", help="results folder (default: results/<name>/)")
    run.add_argument("--seeds", type=int, metavar="N", help="run the job for N seeds (from the spec's seed) and "
                                                          "report mean ± std")
    run.add_argument("--resume", metavar="DIR", help="finish the job an interrupted driver left in DIR (its --out): "
                     "finished methods are kept, a cut-off one continues from its last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress, only the results table and errors")
    run.set_defaults(fn=cmd_run)
    methods = sub.add_parser("methods", help="list methods, their parameters, defaults and sources")
    methods.set_defaults(fn=cmd_methods)
    report = sub.add_parser("report", help="comparison table from MLflow")
    report.add_argument("--experiment", help="experiment (job) name; default: every experiment")
    report.add_argument("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or ./mlruns.db)")
    report.set_defaults(fn=cmd_report)
    register = sub.add_parser("register", help="put a method run's logged model into the MLflow model registry")
    register.add_argument("run_id", metavar="RUN_ID", help="the method's MLflow run (results.json: mlflow.runs)")
    register.add_argument("--name", required=True, help="registered model name (created if missing)")
    register.add_argument("--alias", help="alias to point at the new version, e.g. champion")
    register.add_argument("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or ./mlruns.db)")
    register.set_defaults(fn=cmd_register)
    if _tuning_available():
        tune = sub.add_parser("tune", help="Ray Tune search over one method's parameters")
        tune.add_argument("job", nargs="?", help="job spec YAML")
        tune.add_argument("--method", help="method to tune (default: the spec's tune.method)")
        tune.add_argument("--num-samples", type=int, help="trials (default: the spec's tune.num_samples)")
        tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        tune.add_argument("--out", help="output folder (default: results/<name>-tune-<method>/)")
        tune.add_argument("--resume", metavar="DIR", help="resume an interrupted search from its output folder")
        tune.set_defaults(fn=cmd_tune)
    return p


def _tuning_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("unlearn.tuning") is not None


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (`ray job stop`, a scheduler's preemption) ends the job like Ctrl-C: its MLflow runs are marked
    KILLED and `unlearn run --resume` can finish it (Ray sends SIGKILL 3 s later)."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None, exit: Callable[[int], None] = sys.exit) -> int:
    import signal
    import threading

    args = parser().parse_args(argv)
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_main else None
    try:
        code = args.fn(args)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted (finish it with: unlearn run JOB --resume <its output folder>)"
              if getattr(args, "command", None) == "run" else "interrupted", file=sys.stderr)
        code = 130
    except Exception as err:  # one line for the user; the traceback on request
        if os.environ.get("UNLEARN_DEBUG"):
            traceback.print_exc()
        print(f"failed: {type(err).__name__}: {err}", file=sys.stderr)
        code = 1
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    exit(code)
    return code


if __name__ == "__main__":
    main()
