"""Operations: readable progress (bars on a terminal, few lines otherwise) and resuming a job whose driver died."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
UNLEARN = str(Path(sys.executable).parent / "unlearn")
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# --- progress -------------------------------------------------------------------------------------------
def test_epochs_shown_match_the_spec():
    """`train.epochs: 30` shows 30 epochs even when a pass is not a whole number of batches (1,347 / 64)."""
    from unlearn.loop import epoch_ends, total_steps
    from unlearn.methods import build

    method = build("retrain", {"epochs": 30, "batch_size": 64})
    total = total_steps(method, 0, 1347)
    ends = epoch_ends(method, 0, 1347, total, "classification")
    assert len(ends) == 30 and ends[-1] == total and ends[0] == 22
    stepped = build("ga", {"steps": 50, "batch_size": 64})  # steps declared: passes of 3 steps, the last partial
    assert epoch_ends(stepped, 137, 1210, 50, "classification")[-2:] == [48, 50]


def test_progress_draws_from_ticks_and_says_a_resume_in_one_line():
    import io

    from unlearn.progress import Progress

    out = io.StringIO()
    shown = Progress("lines", out)
    for step in range(1, 101):
        shown.tick({"label": "ga", "step": step, "total_steps": 100, "epoch": 1 + step // 20, "epochs": 5,
                    "seconds": step * 60.0, "losses": {"loss": 0.5}, "resumed": step == 40, "group": 1})
    shown.finished("ga", "[ga] done")
    lines = out.getvalue().splitlines()
    resumed = [line for line in lines if "restarted" in line]
    assert resumed == ["[ga] worker group 1 restarted: resumed from epoch 3/5 (step 40/100)"]
    assert 5 <= len(lines) - 2 <= 10  # sparse: at most one line per 10% of the steps
    assert lines[-1] == "[ga] done"
    quiet = io.StringIO()
    Progress("quiet", quiet).finished("ga", "[ga] done")
    assert quiet.getvalue() == ""


def _quickstart(tmp_path: Path, *extra: str) -> list[str]:
    return [UNLEARN, "run", str(QUICKSTART), "--out", str(tmp_path / "out"), "--set", "ray.enabled=false",
            "--set", f"cache_dir={ROOT / '.cache' / 'unlearn'}", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
            *extra]


def test_quickstart_prints_at_most_40_lines_when_not_a_terminal(tmp_path):
    proc = subprocess.run(_quickstart(tmp_path), capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    done = [line for line in lines if line.startswith("[") and "] done in " in line]
    assert len(done) == 7  # one line per method (retrain and the six others)
    assert not any(re.search(r"\] epoch \d+/\d+ step", line) for line in lines)  # no per-epoch lines


def test_console_script_under_a_terminal_draws_a_bar_per_method(tmp_path):
    """Under a pseudo-terminal each method run gets a tqdm bar (epoch, step count, elapsed, ETA)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the console script with the pty as its terminal (120 x 40, as a window would be)
        import fcntl
        import struct
        import termios

        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.chdir(tmp_path)
        os.execve(UNLEARN, _quickstart(tmp_path, "--set", "methods=[{name: retrain}, {name: ft}, {name: sfr_on}]"),
                  ENV)
    chunks, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-3000:]
    for label in ("retrain", "ft", "sfr_on"):
        assert f"[{label}] epoch" in text and "%|" in text, text[-3000:]  # its bar: "[ft] epoch 2/5  40%|███ ..."
        assert f"[{label}] done in " in text


# --- resuming a lost driver -------------------------------------------------------------------------------
RESUME_JOB = {
    "name": "resume-digits",
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "hidden": [64]},
    "train": {"epochs": 15},
    "forget": {"kind": "class", "classes": [5]},
    "methods": [{"name": "retrain"}, {"name": "ft", "params": {"epochs": 15}}, {"name": "delete"},
                {"name": "ga", "params": {"lr": 0.005}}, {"name": "grogu"}, {"name": "sfr_on"}],
    "ray": {"enabled": False},
}


def _job_file(tmp_path: Path) -> Path:
    job = dict(RESUME_JOB, cache_dir=str(tmp_path / "cache"), tracking={"uri": f"sqlite:///{tmp_path}/mlruns.db"})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_a_job_whose_driver_was_killed_resumes_with_every_method_once(tmp_path):
    """SIGKILL the driver after two methods are recorded; `--resume` finishes the job: each method once in
    MLflow (the same run ids) and results.json, with an uninterrupted run's metrics."""
    from mlflow.tracking import MlflowClient

    from unlearn import spec as spec_mod
    from unlearn.job import run_job

    path, out = _job_file(tmp_path), tmp_path / "out"
    driver = subprocess.Popen([UNLEARN, "run", str(path), "--out", str(out)], cwd=tmp_path, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state_file, deadline = out / "job-state.json", time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if state_file.is_file() and len(json.loads(state_file.read_text())["recorded"]) >= 2:
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the job ended before it could be killed: " + driver.stderr.read()[-2000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed = json.loads(state_file.read_text())
    assert not (out / "results.json").exists() and 2 <= len(killed["recorded"]) < len(RESUME_JOB["methods"])

    resumed = subprocess.run([UNLEARN, "run", str(path), "--resume", str(out)], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    labels = [m["name"] for m in RESUME_JOB["methods"]]
    assert set(results["methods"]) == {"original", *labels} and not results["failed"]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    parent = results["mlflow"]["parent_run"]
    assert parent == killed["parent_run"] and client.get_run(parent).info.status == "FINISHED"
    children = client.search_runs([results["mlflow"]["experiment_id"]], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_name for r in children) == sorted(labels)  # each exactly once
    assert all(r.info.status == "FINISHED" for r in children)
    for label in killed["recorded"]:  # recorded before the kill: the same runs, not logged again
        assert results["mlflow"]["runs"][label] == killed["runs"][label]
    jobs = client.search_runs([results["mlflow"]["experiment_id"]], "tags.`unlearn.kind` = 'job'")
    assert len(jobs) == 1

    spec = spec_mod.load(path).model_copy(update={"tracking": spec_mod.TrackingSpec(enabled=False)})
    straight = run_job(spec, tmp_path / "straight", progress="quiet")
    for name, metrics in straight["methods"].items():
        for key in ("FA", "RA", "TA", "MIA", "gap", "KL"):
            assert results["methods"][name].get(key) == metrics.get(key), (name, key)


def test_resume_refuses_a_folder_without_a_job_or_with_another_spec(tmp_path, capsys):
    from unlearn import cli

    path = _job_file(tmp_path)
    codes: list[int] = []
    cli.main(["run", str(path), "--resume", str(tmp_path / "nothing")], exit=codes.append)
    assert codes == [2] and "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()  # nothing is created there
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "job-state.json").write_text(json.dumps(
        {"spec_hash": "0" * 16, "token": "job-0", "parent_run": None}))
    cli.main(["run", str(path), "--resume", str(tmp_path / "nothing")], exit=codes.append)
    assert codes == [2, 2] and "the job spec differs" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ray
def test_on_ray_a_method_cut_off_mid_run_resumes_from_its_checkpoint(tmp_path):
    """Ray Train restores the group's checkpoint (same run name and storage path) for the method that was running."""
    job = dict(RESUME_JOB, cache_dir=str(tmp_path / "cache"), tracking={"enabled": False},
               methods=[{"name": "retrain", "params": {"epochs": 400}}],
               ray={"enabled": True, "num_workers": 2})
    path, out = tmp_path / "job.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(job))
    env = {**ENV, "UNLEARN_REPORT_EVERY_S": "1"}
    driver = subprocess.Popen([UNLEARN, "run", str(path), "--out", str(out)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and driver.poll() is None:
        checkpoints = list((out / "engine").glob("*/attempts/checkpoint-retrain-*.json"))
        if len(checkpoints) >= 3:
            break
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
    driver.wait()
    resumed = subprocess.run([UNLEARN, "run", str(path), "--resume", str(out)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["engine"]["runs"]["retrain"]["resumed_from_step"] > 0
    assert "resumed from epoch" in resumed.stderr
