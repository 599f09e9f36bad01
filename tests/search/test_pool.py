"""The local worker pool (``--search.n_workers``): the storage URL, which may hold a password,
reaches its workers through their environment, never their command line."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from autonorm.search._export import STORAGE_FILE
from autonorm.search._pool import _without_storage

SECRET = "s3cr3t-Pw"


def test_the_pool_strips_the_storage_from_the_worker_command():
    argv = ["search", "--search.storage", "u", "--a", "1", f"--search.storage=x:{SECRET}", "--b"]
    assert _without_storage(argv) == ["search", "--a", "1", "--b"]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Query string argument")
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_pool_workers_get_the_storage_off_their_command_line(workdir, tmp_path, autonorm_cli):
    # SQLite ignores the query's password (with a warning): a real storage whose URL has one
    storage = f"sqlite:///{tmp_path / 'study.db'}?password={SECRET}"
    out = tmp_path / "bundle"
    args = [
        "search", "--model", "usermodels.Net", "--model.sleep", "0.3",
        "--data", "usermodels.Data", "--trainer.max_epochs", "1", "--search.space", "minimal",
        "--search.n_trials", "2", "--search.n_workers", "2", "--search.out_dir", str(out),
        "--search.storage", storage, "--search.warm_start", "false",
    ]  # fmt: skip
    log = (tmp_path / "pool.log").open("wb")
    parent = subprocess.Popen(
        [autonorm_cli.path, *args],
        cwd=workdir,
        env=autonorm_cli.env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    seen: dict[int, tuple[bytes, bytes]] = {}
    deadline = time.time() + 150
    while parent.poll() is None and time.time() < deadline and len(seen) < 2:
        for pid in _children(parent.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if b"autonorm.cli" in cmdline:
                seen[pid] = (cmdline, environ)
        time.sleep(0.2)
    assert parent.wait(timeout=240) == 0, (tmp_path / "pool.log").read_text()[-3000:]
    assert len(seen) == 2, (tmp_path / "pool.log").read_text()[-3000:]
    for cmdline, environ in seen.values():
        assert SECRET.encode() not in cmdline and b"--search.storage" not in cmdline
        assert f"AUTONORM_STORAGE={storage}".encode() in environ.split(b"\0")
    study = optuna.load_study(study_name="autonorm-Net", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert SECRET not in (out / STORAGE_FILE).read_text()
    for path in [tmp_path / "pool.log", *(out / "workers").iterdir()]:
        assert SECRET not in path.read_text(), path


COUNTING_MODULE = '''
import os
from usermodels import Data, Net


class CountedNet(Net):
    """Appends the root folder of every fit to fits.log: the learn pass trains under .../learn."""

    def on_fit_start(self):
        with open(os.path.join(os.environ["FITS_LOG_DIR"], "fits.log"), "a") as log:
            log.write(f"{os.getpid()} {self.trainer.default_root_dir}\\n")
'''


def test_a_pool_runs_one_learn_pass_for_its_study(workdir, tmp_path, autonorm_cli):
    """Two workers with a learned warm start: one learns (under the claim lock), the other
    waits and reuses its narrowed space and learned config."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "usermodels.py").write_text((workdir / "usermodels.py").read_text())
    (project / "counted.py").write_text(COUNTING_MODULE)
    out = tmp_path / "bundle"
    args = [
        "search", "--model", "counted.CountedNet", "--data", "usermodels.Data",
        "--trainer.max_epochs", "1", "--search.space", "minimal", "--search.n_trials", "4",
        "--search.n_workers", "2", "--search.out_dir", str(out), "--search.warm_start", "learn",
        "--search.storage", str(tmp_path / "journal.log"),
    ]  # fmt: skip
    env = {**autonorm_cli.env(), "FITS_LOG_DIR": str(tmp_path)}
    result = subprocess.run(
        [autonorm_cli.path, *args], cwd=project, env=env, capture_output=True, timeout=300
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    fits = (tmp_path / "fits.log").read_text().splitlines()
    learn_passes = [line for line in fits if line.endswith(os.sep + "learn")]
    assert len(learn_passes) == 1, fits


def test_a_pool_interrupted_while_starting_starts_no_more_workers(tmp_path):
    """The first worker interrupts its parent at once (as a Ctrl-C while the pool starts): the
    pool stops starting workers, forwards the signal to the ones it has, and says so."""
    import signal

    from autonorm.search._pool import run_worker_pool

    # a shell, not Python: it signals at once (a Python worker's start, slower still under
    # coverage, lost the race against the pool starting all 40)
    interrupt_parent = ["sh", "-c", "kill -INT $PPID; exec sleep 20"]
    before = signal.getsignal(signal.SIGINT)
    started = time.time()
    workers, received = run_worker_pool(interrupt_parent, 40, tmp_path / "logs", poll_interval=0.05)
    assert received == signal.SIGINT
    assert len(workers) < 40  # it stopped starting them
    assert all(w.process.returncode is not None for w in workers)  # none left running
    assert time.time() - started < 20  # the forwarded signal ended the sleeping workers
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_a_worker_started_as_the_signal_arrives_gets_it_too(tmp_path, monkeypatch):
    """Ctrl-C while a worker is being started: its handler runs before the pool has listed the
    new worker, which must still get the forwarded signal (it slept its 20 s out, and the pool
    waited for it)."""
    import signal

    from autonorm.search._pool import run_worker_pool

    start = subprocess.Popen

    def start_then_interrupt(*args, **kwargs):
        process = start(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, before the pool lists it
        return process

    monkeypatch.setattr(subprocess, "Popen", start_then_interrupt)
    started = time.time()
    workers, received = run_worker_pool(["sleep", "20"], 3, tmp_path / "logs", poll_interval=0.05)
    monkeypatch.undo()
    assert received == signal.SIGINT and len(workers) == 1  # no more workers after it
    assert workers[0].process.returncode == -signal.SIGINT
    assert time.time() - started < 15  # not the 20 s of an unsignalled worker


def test_two_workers_started_together_with_other_settings_one_is_refused(
    workdir, tmp_path, autonorm_cli
):
    """Settings are recorded and checked under the claim lock: of two processes that start
    the same study at the same moment with different budgets, the second is refused."""
    storage = str(tmp_path / "journal.log")
    base = [
        "search", "--model", "usermodels.Net", "--data", "usermodels.Data",
        "--trainer.max_epochs", "1", "--search.space", "minimal", "--search.n_trials", "2",
        "--search.storage", storage, "--search.warm_start", "false",
    ]  # fmt: skip
    runs = [
        [*base, "--search.out_dir", str(tmp_path / "a")],
        [*base, "--search.out_dir", str(tmp_path / "b"), "--search.budget.max_params", "100000"],
    ]
    processes = [
        subprocess.Popen(
            [autonorm_cli.path, *args],
            cwd=workdir,
            env=autonorm_cli.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for args in runs
    ]
    outcomes = [(p.wait(timeout=240), p.stderr.read().decode()) for p in processes]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    refused = next(err for code, err in outcomes if code == 2)
    assert "recorded with other settings: budget.max_params" in refused
