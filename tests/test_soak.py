"""The multi-job soak (issue 15): three jobs and a Tune search at once on one `ray start --head`, one job stopped
half-way with `ray job stop` and resumed, every run checked in a real `mlflow server`.

What it starts (all torn down at the end, each by its own process group): a Ray head with 4 logical CPUs (its own
short temp dir, as tests/test_engine.py's head tests), an MLflow server on SQLite with a local artifact root, and,
through `ray job submit --no-wait`, `unlearn run` for three digits jobs (one worker each, each its own experiment)
and `unlearn tune --method ga --num-samples 4` (one trial at a time), so the four fit the 4 CPUs. The long job is
stopped once `job-state.json` records a method, then resumed with `ray job submit -- unlearn run --resume DIR`.

It asserts: the other jobs and the search finish with every run once in their own experiment; the stopped job's
runs are not left RUNNING; the resumed job completes under the same parent run with each method once; no run is
lost or duplicated in any experiment; nothing is written outside the job folders, the cache, the server's files
and the head's temp dir (the head's working directory stays empty, the repository gains no files). It prints each
phase's time (docs/operations.md holds a measured run). `.venv/bin/python -m pytest -q -m slow tests/test_soak.py -s`
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from gloo_workers import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN_FILE = Path.home() / ".ray" / "auth_token"

BASE = {
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "hidden": [64]},
    "train": {"epochs": 15},
    "ray": {"enabled": True, "num_workers": 1},
}
SHORT = [{"name": "retrain"}, {"name": "ft", "params": {"epochs": 10}}, {"name": "ga", "params": {"lr": 0.005}},
         {"name": "delete"}, {"name": "sfr_on"}]
# Stopped once its first method (retrain) is recorded: the runs after it take long enough (two ~1,500-step
# fine-tunes among them) that `ray job stop` lands half-way even on a quiet machine.
LONG = [{"name": "retrain"}, {"name": "ft", "params": {"epochs": 80}}, {"name": "ga", "params": {"lr": 0.005}},
        {"name": "delete"}, {"name": "grogu"}, {"name": "sfr_on"}, {"name": "tarf"},
        {"name": "ft", "label": "ft-again", "params": {"epochs": 80}}, {"name": "rl"}]
JOBS = {"soak-a": (1, SHORT), "soak-b": (2, SHORT), "soak-long": (3, LONG)}
STOPPED = "soak-long"
TUNE = "soak-tune"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except urllib.error.HTTPError:  # it answers (401: `ray job submit` brings the token)
        return True
    except OSError:
        return False


def _end_group(proc: subprocess.Popen) -> None:
    """Stop a process we started in its own session: its whole group, and nothing else."""
    try:
        group = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    os.killpg(group, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


class Head:
    """`ray start --head --num-cpus 4 --block` in its own session and temp dir; the job API over HTTP."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.gcs, self.dashboard = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
        self.cwd = work / "head-cwd"  # where a relative path in a driver would land: must stay empty
        self.cwd.mkdir()
        self.env = env
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", f"--port={self.gcs}", f"--dashboard-port={self.dashboard}",
             "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
             "--block"], cwd=self.cwd, env=env, stdout=open(work / "head.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.headers = {"Authorization": "Bearer " + TOKEN_FILE.read_text().strip()} if TOKEN_FILE.is_file() else {}

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not _answers(f"{self.address}/api/version"):
            assert self.proc.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray dashboard did not answer"
            time.sleep(0.5)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), "job", *args], capture_output=True, text=True, timeout=timeout,
                              env={**self.env, "RAY_AUTH_MODE": "token"}, cwd=self.cwd)  # send ~/.ray/auth_token

    def submit(self, sid: str, *entrypoint: str) -> None:
        for _ in range(60):  # the dashboard answers before the node's job agent has registered
            done = self.cli("submit", "--address", self.address, "--no-wait", "--submission-id", sid, "--",
                            *entrypoint)
            if "No available agent to submit job" not in done.stdout + done.stderr:
                break
            time.sleep(2)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def info(self, sid: str) -> dict:
        request = urllib.request.Request(f"{self.address}/api/jobs/{sid}", headers=self.headers)
        return json.loads(urllib.request.urlopen(request, timeout=10).read())

    def logs(self, sid: str) -> str:
        request = urllib.request.Request(f"{self.address}/api/jobs/{sid}/logs", headers=self.headers)
        try:
            return json.loads(urllib.request.urlopen(request, timeout=10).read()).get("logs", "")
        except OSError as err:
            return f"(no logs: {err})"

    def close(self) -> None:
        _end_group(self.proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on a SQLite store with a local artifact root, in its own session."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        folder.mkdir()
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "2"], cwd=folder, env=env, stdout=open(folder / "server.log", "w"),
            stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return
            except OSError:
                log = (self.folder / "server.log").read_text()
                assert self.proc.poll() is None, "mlflow server exited: " + log[-2000:]
                assert time.monotonic() < deadline, "the MLflow server did not answer /health"
                time.sleep(0.5)

    def close(self) -> None:
        _end_group(self.proc)


def _spec(tmp: Path, name: str, forget: int, methods: list[dict], uri: str, **extra) -> Path:
    data = {"name": name, **BASE, "forget": {"kind": "class", "classes": [forget]}, "methods": methods,
            "cache_dir": str(tmp / "cache"), "tracking": {"uri": uri}, **extra}
    path = tmp / "specs" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _untracked_files() -> dict[str, tuple[int, int]]:
    """Every file in the repository that git does not track (ignored ones included), with (mtime, size); the
    virtual environment, git's own folder and bytecode aside."""
    tracked = set(subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split("\0"))
    found = {}
    for base, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(base, ROOT)
        dirs[:] = [d for d in dirs if d not in (".git", ".venv", "__pycache__", ".pytest_cache")]
        for name in files:
            path = os.path.normpath(os.path.join(rel, name))
            if path not in tracked and not name.endswith(".pyc"):
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(ROOT / path)
                    found[path] = (st.st_mtime_ns, st.st_size)
    return found


def _runs(client, experiment_name: str) -> tuple[str, list]:
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no MLflow experiment {experiment_name}"
    return experiment.experiment_id, client.search_runs([experiment.experiment_id], max_results=1000)


def _job_runs(client, name: str) -> tuple[object, list]:
    """(the job's parent run, its children) in experiment `name`; every run of the experiment is one of them."""
    _, runs = _runs(client, name)
    parents = [r for r in runs if r.data.tags.get("unlearn.kind") == "job"]
    assert len(parents) == 1, (name, [(r.info.run_name, r.info.status) for r in runs])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(runs) == 1 + len(children), (name, [(r.info.run_name, r.data.tags) for r in runs])
    return parents[0], children


@pytest.mark.slow
@pytest.mark.ray
def test_three_jobs_and_a_search_share_a_head_and_a_stopped_job_resumes():
    import ray
    from mlflow.tracking import MlflowClient

    if ray.is_initialized():  # the tests' shared session (conftest.ray_session): one cluster at a time
        ray.shutdown()
    repo_before = _untracked_files()
    home_before = set(os.listdir(Path.home()))
    tmp_top_before = set(os.listdir("/tmp"))
    # Its own folder, not pytest's tmp folder: pytest prunes old base temp folders when other sessions start, and
    # this test runs for minutes on a machine where others run tests. Removed when the test passes.
    work = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    (work / "specs").mkdir()
    scratch = Path(tempfile.mkdtemp(prefix="st", dir="/tmp"))  # TMPDIR of every process started here
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    times: dict[str, float] = {}
    head = server = None
    passed = False
    sids: list[str] = []
    try:
        started = time.monotonic()
        head = Head(work, env)
        server = MlflowServer(work / "mlflow", env)
        server.wait(120)
        times["mlflow server answers /health (both started at 0)"] = time.monotonic() - started
        head.wait(120)
        times["Ray dashboard answers (both started at 0)"] = time.monotonic() - started
        specs = {name: _spec(work, name, forget, methods, server.uri) for name, (forget, methods) in JOBS.items()}
        specs[TUNE] = _spec(work, TUNE, 4, [{"name": "retrain"}, {"name": "ga", "params": {"epochs": 3}}],
                            server.uri, tune={"space": {"lr": {"kind": "loguniform", "low": 1e-3, "high": 3e-2}},
                                              "max_concurrent": 1, "reports": 3})
        before = _tree(work)

        # --- submit all four at once ------------------------------------------------------------------------
        unlearn = str(BIN / "unlearn")
        entrypoints = {name: (unlearn, "run", str(specs[name]), "--out", str(work / name)) for name in JOBS}
        entrypoints[TUNE] = (unlearn, "tune", str(specs[TUNE]), "--method", "ga", "--num-samples", "4", "--out",
                             str(work / TUNE))
        t_submit = time.monotonic()
        errors: list[BaseException] = []

        def submit(name: str) -> None:
            try:
                head.submit(name, *entrypoints[name])
            except BaseException as err:  # re-raised below
                errors.append(err)

        sids.extend(entrypoints)
        threads = [threading.Thread(target=submit, args=(name,)) for name in entrypoints]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        times["4 submissions (ray job submit --no-wait, in parallel)"] = time.monotonic() - t_submit
        times["start of both to all 4 submissions accepted"] = time.monotonic() - started

        # --- stop the long job half-way; wait for the others -----------------------------------------------
        state_file = work / STOPPED / "job-state.json"
        labels = {name: [m.get("label", m["name"]) for m in methods] for name, (_, methods) in JOBS.items()}
        stopped_at: dict | None = None
        status: dict[str, dict] = {}
        deadline = time.monotonic() + 1500
        while True:
            status = {name: head.info(name) for name in entrypoints}
            if stopped_at is None and state_file.is_file():
                state = json.loads(state_file.read_text())
                if state["recorded"]:
                    assert not (work / STOPPED / "results.json").exists(), "the long job finished already"
                    assert len(state["recorded"]) < len(labels[STOPPED]), state
                    t_stop = time.monotonic()
                    times[f"{STOPPED}: submitted to first method recorded"] = t_stop - t_submit
                    done = head.cli("stop", "--address", head.address, STOPPED, timeout=120)
                    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
                    times["ray job stop (until STOPPED)"] = time.monotonic() - t_stop
                    stopped_at = {"before": state, "after": json.loads(state_file.read_text())}
                    continue
            if all(s["status"] in TERMINAL for s in status.values()):
                break
            if any(s["status"] in TERMINAL - {"SUCCEEDED"} and name != STOPPED for name, s in status.items()):
                break
            assert time.monotonic() < deadline, {n: s["status"] for n, s in status.items()}
            time.sleep(1)
        logs = {name: head.logs(name) for name in entrypoints}
        for name, info in status.items():
            expected = "STOPPED" if name == STOPPED else "SUCCEEDED"
            said = f"{name}: {info['status']} ({info.get('message')})\n"
            assert info["status"] == expected, said + logs[name][-4000:]
            times[f"{name}: wall time ({info['status']})"] = (info["end_time"] - info["start_time"]) / 1000
        assert stopped_at is not None, "the long job was never stopped"

        # --- the finished jobs and the search: every run once, in its own experiment ------------------------
        client = MlflowClient(server.uri)
        for name in ("soak-a", "soak-b"):
            results = json.loads((work / name / "results.json").read_text())
            assert not results["failed"] and set(results["methods"]) == {"original", *labels[name]}
            parent, children = _job_runs(client, name)
            assert parent.info.status == "FINISHED" and parent.info.run_id == results["mlflow"]["parent_run"]
            assert sorted(r.info.run_name for r in children) == sorted(labels[name])
            assert all(r.info.status == "FINISHED" for r in children)
            assert set(results["mlflow"]["models"]) == set(labels[name])  # a LoggedModel per method
        tune = json.loads((work / TUNE / "tune.json").read_text())
        assert (work / TUNE / "best.yaml").is_file() and len(tune["trials"]) == 4 and not tune["interrupted"]
        _, tune_runs = _runs(client, TUNE)
        [search] = [r for r in tune_runs if r.data.tags.get("unlearn.kind") == "tune"]
        trials = [r for r in tune_runs if r.data.tags.get("mlflow.parentRunId") == search.info.run_id]
        assert search.info.status == "FINISHED" and len(trials) == 4 and len(tune_runs) == 5

        # --- the stopped job: nothing left RUNNING ----------------------------------------------------------
        state = stopped_at["after"]
        assert not (work / STOPPED / "results.json").exists()
        parent, children = _job_runs(client, STOPPED)
        assert parent.info.run_id == state["parent_run"]
        stopped_statuses = {"parent": parent.info.status, **{r.info.run_name: r.info.status for r in children}}
        print(f"\nafter `ray job stop`: recorded {state['recorded']}; MLflow statuses {stopped_statuses}")
        print(f"stopped job's driver log (tail):\n{logs[STOPPED][-1500:]}")
        # SIGTERM ends the driver like Ctrl-C (cli._terminated): the job's run and any method run it was still
        # logging are KILLED, none is left RUNNING; the methods recorded before stay FINISHED.
        assert parent.info.status == "KILLED", stopped_statuses
        assert all(r.info.status in ("FINISHED", "KILLED") for r in children), stopped_statuses
        hint = "interrupted (finish it with: unlearn run JOB --resume" in logs[STOPPED]
        print(f"the stopped driver printed the resume hint before Ray's SIGKILL: {hint}")
        assert len({r.info.run_name for r in children}) == len(children)
        assert all(r.info.status == "FINISHED" for r in children if r.info.run_name in state["recorded"])

        # --- resume it --------------------------------------------------------------------------------------
        t_resume = time.monotonic()
        sids.append(f"{STOPPED}-resume")
        head.submit(f"{STOPPED}-resume", unlearn, "run", str(specs[STOPPED]), "--resume", str(work / STOPPED))
        while (info := head.info(f"{STOPPED}-resume"))["status"] not in TERMINAL:
            assert time.monotonic() < t_resume + 900, "the resumed job did not finish"
            time.sleep(1)
        resume_log = head.logs(f"{STOPPED}-resume")
        assert info["status"] == "SUCCEEDED", info.get("message", "") + "\n" + resume_log[-4000:]
        times[f"{STOPPED}: resume (submit to SUCCEEDED)"] = time.monotonic() - t_resume
        times[f"{STOPPED}: resumed driver's wall time"] = (info["end_time"] - info["start_time"]) / 1000
        results = json.loads((work / STOPPED / "results.json").read_text())
        assert not results["failed"] and set(results["methods"]) == {"original", *labels[STOPPED]}
        parent, children = _job_runs(client, STOPPED)
        assert parent.info.run_id == state["parent_run"] == results["mlflow"]["parent_run"]
        assert parent.info.status == "FINISHED"
        assert sorted(r.info.run_name for r in children) == sorted(labels[STOPPED])  # each method exactly once
        assert all(r.info.status == "FINISHED" for r in children)
        for label in state["recorded"]:  # recorded before the stop: the same runs, not logged again
            assert results["mlflow"]["runs"][label] == state["runs"][label]
        assert set(results["mlflow"]["models"]) == set(labels[STOPPED])

        # --- across the server: no run lost, duplicated or left running --------------------------------------
        experiments = {e.name: e.experiment_id for e in client.search_experiments()}
        assert set(experiments) == {"Default", *JOBS, TUNE}, experiments
        every = client.search_runs(list(experiments.values()), max_results=5000)
        assert len(every) == sum(1 + len(labels[n]) for n in JOBS) + 1 + 4
        assert not [r.info.run_name for r in every if r.info.status != "FINISHED"]

        # --- nothing written outside the job folders, the cache, the server's files, the head's temp dir ------
        new = sorted(p for p in _tree(work) - before)
        owners = [*JOBS, TUNE, "cache", "mlflow"]
        stray = [p for p in new if p.split(os.sep)[0] not in owners]
        assert not stray, stray
        assert not any(head.cwd.iterdir()), list(head.cwd.iterdir())  # no relative path used by any driver
        assert {p.name for p in (work / "mlflow").iterdir()} <= {"mlflow.db", "artifacts", "server.log"}
        # The repository: other people's runs write there meanwhile (benchmarks, `make run`), so a new or changed
        # untracked file counts as the soak's when it names one of its jobs or its folder, or is one of its cache
        # entries (content-hashed names: models/<key>.pt, data/store-<key>); and the repository's own MLflow
        # store must hold none of its experiments.
        repo_after = _untracked_files()
        changed = sorted(p for p in repo_after if repo_before.get(p) != repo_after[p])
        keys = {e.name for folder in ("models", "data") for e in (work / "cache" / folder).iterdir()}
        ours = [p for p in changed if set(Path(p).parts) & (keys | {*JOBS, TUNE})]
        assert not ours, ours
        if (ROOT / "mlruns.db").is_file():
            with contextlib.closing(sqlite3.connect(f"file:{ROOT / 'mlruns.db'}?mode=ro", uri=True)) as db:
                found = db.execute("select name from experiments where name like 'soak-%'").fetchall()
            assert not found, found
        assert set(os.listdir(Path.home())) == home_before
        defaults = {"ray_results", "mlruns", "mlruns.db", "mlartifacts", "results"}  # relative defaults in /tmp
        assert not (set(os.listdir("/tmp")) - tmp_top_before) & defaults
        # The processes' temp dir: the platform leaves nothing (a checkpoint a worker killed inside `report` leaves
        # stays in its job's folder); Ray's, torch's and MLflow's own leftovers are shown.
        left = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*"))
        print(f"left in TMPDIR: {left[:20]}{' ...' if len(left) > 20 else ''}")
        assert not [p for p in left if p.startswith("unlearn-")], left
        print(f"untracked repository files others changed meanwhile: {changed}")
        passed = True
    finally:
        if head is not None and not passed:
            for sid in sids:
                print(f"\n--- ray job logs {sid} (tail) ---\n{head.logs(sid)[-3000:]}")
            print(f"\nkept for inspection: {work}")
        if head is not None:
            head.close()
        if server is not None:
            server.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if passed:
            shutil.rmtree(work, ignore_errors=True)
        width = max(map(len, times), default=0)
        print("\nsoak timings (s):\n" + "\n".join(f"  {k.ljust(width)}  {v:7.1f}" for k, v in times.items()))


def test_a_job_interrupted_while_recording_a_method_leaves_no_run_running_and_resumes(tmp_path, monkeypatch):
    """What the soak found: `ray job stop` came while the driver was logging a method's run (its params, losses,
    model: most of a small job's driver time), and that run stayed RUNNING. Now the job's run ends every run opened
    inside it the same way (KILLED), and `--resume` reopens and finishes it: each method once, FINISHED."""
    from mlflow.tracking import MlflowClient

    from unlearn import spec as spec_mod
    from unlearn.job import run_job
    from unlearn.tracking import Tracker

    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts in ./mlartifacts
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    spec = spec_mod.validate({
        "name": "interrupted", **BASE, "train": {"epochs": 3}, "forget": {"kind": "class", "classes": [5]},
        "methods": [{"name": "retrain", "params": {"epochs": 2}}, {"name": "ft", "params": {"epochs": 1}},
                    {"name": "ga", "params": {"lr": 0.005}}],
        "ray": {"enabled": False}, "cache_dir": str(tmp_path / "cache"),
        "tracking": {"uri": uri, "log_models": "none"}})
    logged = Tracker.history

    def interrupted(self, run_id, rows):  # Ctrl-C / SIGTERM while ft's run is being written
        if self.client.get_run(run_id).info.run_name == "ft":
            raise KeyboardInterrupt
        return logged(self, run_id, rows)

    monkeypatch.setattr(Tracker, "history", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_job(spec, tmp_path / "out", progress="quiet")
    state = json.loads((tmp_path / "out" / "job-state.json").read_text())
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("interrupted").experiment_id
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([experiment])}
    assert statuses == {"interrupted": "KILLED", "retrain": "FINISHED", "ft": "KILLED"}, statuses
    assert state["recorded"] == ["retrain"] and "ft" in state["runs"]

    monkeypatch.setattr(Tracker, "history", logged)
    results = run_job(spec, tmp_path / "out", resume=True, progress="quiet")
    assert not results["failed"] and results["mlflow"]["runs"]["ft"] == state["runs"]["ft"]
    runs = client.search_runs([experiment])
    assert sorted(r.info.run_name for r in runs) == ["ft", "ga", "interrupted", "retrain"]
    assert all(r.info.status == "FINISHED" for r in runs)
