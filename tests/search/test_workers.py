"""Several workers on one study, lost workers, interrupts: real processes of the installed
``autonorm`` command on a journal file and on a real PostgreSQL server.

PostgreSQL tests read ``AUTONORM_TEST_POSTGRES_URL`` (``eval "$(.ci/postgres.sh start)"``); without
it they skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import autonorm
from autonorm._io import mask_password
from autonorm.search import _pool as worker_pool
from autonorm.search import _workers as workers
from autonorm.search._storage import make_storage, postgres_driver_url
from tests.lightning_models import TinyConvNet, TinyDataModule

AUTONORM = str(Path(sys.executable).with_name("autonorm"))
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

USER_MODULE = (Path(__file__).parents[1] / "user_project" / "usermodels.py").read_text()


def search_args(storage: str, name: str, out: Path, n_trials: int, sleep: float = 0.0) -> list:
    return [
        "search",
        "--model", "workmodels.Net",
        "--model.sleep", str(sleep),
        "--data", "workmodels.Data",
        "--trainer.max_epochs", "1",
        "--search.space", "minimal",
        "--search.seed", "0",
        "--search.n_trials", str(n_trials),
        "--search.storage", storage,
        "--search.study_name", name,
        "--search.out_dir", str(out),
        "--search.heartbeat_interval", "1",
        "--search.grace_period", "4",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("workers")
    (folder / "workmodels.py").write_text(USER_MODULE)
    return folder


def _env() -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    # the checkout under test, also when the installed command points at another one
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


def start(args: list, cwd: Path, log: Path) -> subprocess.Popen:
    handle = log.open("wb")
    proc = subprocess.Popen(
        [AUTONORM, *args], cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=_env()
    )
    handle.close()
    return proc


def run(args: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [AUTONORM, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env()
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"worker {proc.pid} did not finish:\n{log.read_text()[-3000:]}")


def load(storage: str, name: str, tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(storage, tmp_path))


def wait_for_running(storage, name, tmp_path, proc, log, pid=None, count=1, timeout=60) -> list:
    """Numbers of RUNNING trials (of worker ``pid``, or of any), once there are ``count``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            running = load(storage, name, tmp_path).get_trials(states=(TrialState.RUNNING,))
        except (KeyError, autonorm.AutoNormError):  # the study (or its folder) is not there yet
            running = []
        numbers = [
            t.number
            for t in running
            if pid is None or (t.user_attrs.get("worker") or {}).get("pid") == pid
        ]
        if len(numbers) >= count:
            time.sleep(0.5)  # well inside their training steps
            return numbers
        time.sleep(0.3)
    pytest.fail(f"not {count} running trials within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def postgres_url():
    url = os.environ.get("AUTONORM_TEST_POSTGRES_URL")
    if not url:
        message = (
            "AUTONORM_TEST_POSTGRES_URL is not set: start the test server with "
            '`eval "$(.ci/postgres.sh start)"`'
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: the PostgreSQL tests must run)")
        pytest.skip(message)
    return url


@pytest.fixture(params=["journal", "postgres"])
def storage(request, tmp_path):
    """(storage string, study name): a journal file, or the PostgreSQL test database."""
    name = f"workers-{uuid.uuid4().hex[:8]}"
    if request.param == "journal":
        yield str(tmp_path / "journal.log"), name
        return
    url = request.getfixturevalue("postgres_url")
    yield url, name
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=make_storage(url, tmp_path))


def assert_settled(study: optuna.Study, n_trials: int) -> list:
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials))), numbers
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == n_trials, [(t.number, t.state.name) for t in trials]
    return trials


def test_three_workers_share_one_study(storage, workdir, tmp_path):
    url, name = storage
    procs = []
    for i in range(3):
        out = tmp_path / ("w0" if i < 2 else "w2")  # two workers also share a bundle folder
        args = search_args(url, name, out, n_trials=6, sleep=0.3)  # long enough to share
        procs.append((start(args, workdir, tmp_path / f"w{i}.log"), tmp_path / f"w{i}.log"))
    codes = [finish(proc, log) for proc, log in procs]
    logs = [log.read_text() for _, log in procs]
    assert codes == [0, 0, 0], [text[-2000:] for text in logs]

    study = load(url, name, tmp_path)
    trials = assert_settled(study, 6)
    assert not [t for t in trials if t.state == TrialState.FAIL]
    # one epoch leaves no rung below the end: the plan's first trials are full runs
    planned = [t.user_attrs["baseline"] for t in trials if t.user_attrs.get("stage") == "promote"]
    assert planned and len(planned) == len(set(planned)), planned  # enqueued once
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert pids <= {proc.pid for proc, _ in procs} and len(pids) >= 2, pids

    # every worker wrote the same best config, and `autonorm report` agrees from any bundle
    configs = [autonorm.NormConfig.load(tmp_path / w / "best_config.yaml") for w in ("w0", "w2")]
    assert all(c == configs[0] for c in configs)
    assert len({c.metadata["trial"] for c in configs}) == 1
    for i in (0, 2):
        target = str(tmp_path / f"w{i}") if url.endswith(".log") else url
        result = run(
            ["report", target, "--study-name", name, "--out-dir", str(tmp_path / f"r{i}")], workdir
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert autonorm.NormConfig.load(tmp_path / f"r{i}" / "best_config.yaml") == configs[0]

    password = _password(url)
    if password:  # never printed, never written
        assert not any(password in text for text in logs)
        for path in tmp_path.rglob("*"):
            if path.is_file() and path.suffix in (".yaml", ".json", ".txt", ".html", ".log", ""):
                assert password not in path.read_text(errors="replace"), path


def _password(url: str) -> str | None:
    masked = mask_password(url)
    if masked == url:
        return None
    user_part = url.split("://", 1)[1].split("@", 1)[0]
    return user_part.split(":", 1)[1]


@pytest.mark.slow
def test_n_workers_runs_a_local_pool_with_one_display_and_one_bundle(workdir, tmp_path):
    out = tmp_path / "pool"
    args = [
        "search",
        "--model", "workmodels.Net",
        "--model.sleep", "0.5",  # trials long enough that the second worker is up to share them
        "--data", "workmodels.Data",
        "--trainer.max_epochs", "1",
        "--search.space", "minimal",
        "--search.n_trials", "6",
        "--search.out_dir", str(out),
        "--search.n_workers", "2",
    ]  # fmt: skip
    result = run(args, workdir, timeout=180)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert "journal file" in result.stdout
    # piped: the parent's one display is a line per trial of either worker, then its summary
    lines = [x for x in result.stderr.splitlines() if re.match(r"trial \d+  ", x)]
    assert sorted(int(x.split()[1]) for x in lines) == list(range(6))
    assert result.stderr.rstrip().splitlines()[-1].startswith("autonorm search: complete 6")
    assert (out / "journal.log").stat().st_size > 0
    assert {"best_config.yaml", "summary.json", "report.html", "storage.txt"} <= {
        p.name for p in out.iterdir()
    }
    assert sorted(p.name for p in (out / "workers").iterdir()) == ["worker-0.log", "worker-1.log"]
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["trials"]
    assert counts["complete"] + counts["pruned"] + counts["infeasible"] == 6, counts
    study = load(str(out / "journal.log"), "autonorm-Net", tmp_path)
    trials = assert_settled(study, 6)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2
    assert (
        summary["best_trial"]
        == autonorm.NormConfig.load(out / "best_config.yaml").metadata["trial"]
    )


@pytest.mark.slow
def test_a_killed_worker_loses_no_trial(storage, workdir, tmp_path):
    url, name = storage
    n_trials = 5
    args = search_args(url, name, tmp_path / "out", n_trials=n_trials, sleep=0.25)
    victim_log, survivor_log = tmp_path / "victim.log", tmp_path / "survivor.log"
    victim = start(args, workdir, victim_log)
    (lost,) = wait_for_running(url, name, tmp_path, victim, victim_log, pid=victim.pid)
    survivor = start(args, workdir, survivor_log)
    victim.kill()  # SIGKILL in the middle of a training step: no chance to clean up
    assert victim.wait(timeout=30) == -signal.SIGKILL
    assert finish(survivor, survivor_log) == 0, survivor_log.read_text()[-3000:]
    resumed = run(args, workdir)  # a restart continues the study: nothing left to run
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    study = load(url, name, tmp_path)
    trials = assert_settled(study, n_trials)
    lost_trial = trials[lost]
    assert lost_trial.state == TrialState.FAIL
    retries = [t for t in trials if t.user_attrs.get("retry_of") == lost]
    assert len(retries) == 1 and retries[0].state in FINISHED
    assert retries[0].params == lost_trial.params
    if url.endswith(".log"):
        assert f":{victim.pid} stopped sending heartbeats" in lost_trial.user_attrs["fail_reason"]
    else:  # Optuna's heartbeat failed it; its retry callback recorded the original
        assert retries[0].system_attrs["failed_trial"] == lost


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_interrupt_marks_the_trial_writes_the_bundle_and_a_restart_continues(
    signum, code, workdir, tmp_path
):
    url, name, out = str(tmp_path / "journal.log"), "interrupted", tmp_path / "out"
    args = search_args(url, name, out, n_trials=4, sleep=0.25)
    log = tmp_path / "first.log"
    proc = start(args, workdir, log)
    # the second trial: the first is done, so the bundle has something to report
    deadline = time.time() + 60
    (interrupted,) = wait_for_running(url, name, tmp_path, proc, log, pid=proc.pid)
    while interrupted == 0 and time.time() < deadline:
        (interrupted,) = wait_for_running(url, name, tmp_path, proc, log, pid=proc.pid)
    proc.send_signal(signum)
    assert finish(proc, log) == code, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text and "interrupted by" in text

    study = load(url, name, tmp_path)
    trial = study.trials[interrupted]
    assert trial.state == TrialState.FAIL
    assert signal.Signals(signum).name in trial.user_attrs["fail_reason"]
    assert json.loads((out / "summary.json").read_text())["trials"]["failed"] == 1
    assert (out / "report.html").exists()

    again = run(args, workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    trials = assert_settled(load(url, name, tmp_path), 4)
    retry = [t for t in trials if t.user_attrs.get("retry_of") == interrupted]
    assert len(retry) == 1 and retry[0].state in FINISHED and retry[0].params == trial.params


@pytest.mark.slow
def test_sigterm_to_a_pool_stops_its_workers_and_writes_the_bundle(workdir, tmp_path):
    out = tmp_path / "pool"
    args = [
        "search",
        "--model", "workmodels.Net",
        "--model.sleep", "0.25",
        "--data", "workmodels.Data",
        "--trainer.max_epochs", "2",
        "--search.space", "minimal",
        "--search.n_trials", "8",
        "--search.out_dir", str(out),
        "--search.study_name", "pool",
        "--search.n_workers", "2",
    ]  # fmt: skip
    log = tmp_path / "pool.log"
    proc = start(args, workdir, log)
    journal = str(out / "journal.log")
    running = wait_for_running(journal, "pool", tmp_path, proc, log, count=2)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, log) == 143, log.read_text()[-3000:]
    trials = load(journal, "pool", tmp_path).get_trials()
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    for number in running:
        assert trials[number].state == TrialState.FAIL
        assert "interrupted by SIGTERM" in trials[number].user_attrs["fail_reason"]
    assert (out / "summary.json").exists() and (out / "report.html").exists()
    for worker_log in (out / "workers").iterdir():
        assert "Traceback" not in worker_log.read_text()


# -- in one process: recovery rules on a study with a simulated dead worker ---------------------


MINIMAL_BN1 = ["batchnorm", "groupnorm(groups=2)", "layernorm"]  # TinyConvNet.bn1, "minimal"


def _dead_worker_trial(study: optuna.Study, beat_age: float) -> int:
    """A RUNNING trial of a worker that vanished ``beat_age`` seconds ago, with parameters."""
    trial = study.ask()
    trial.suggest_categorical("bn1", MINIMAL_BN1)
    trial.set_user_attr("worker", {"host": "elsewhere", "pid": 999999})
    trial.set_user_attr("heartbeat", time.time() - beat_age)
    return trial.number


def test_stale_trial_fails_once_and_runs_again_once(tmp_path):
    storage = make_storage(str(tmp_path / "journal.log"), tmp_path)
    study = optuna.create_study(study_name="s", storage=storage)
    fresh = _dead_worker_trial(study, beat_age=0)
    stale = _dead_worker_trial(study, beat_age=60)
    # two workers looking at once: one fails and retries it, the other finds nothing to do
    other = optuna.load_study(
        study_name="s", storage=make_storage(str(tmp_path / "journal.log"), tmp_path)
    )
    assert workers.recover_stale_trials(study, grace_period=10) == [stale]
    assert workers.recover_stale_trials(other, grace_period=10) == []
    trials = study.get_trials()
    assert trials[fresh].state == TrialState.RUNNING
    assert trials[stale].state == TrialState.FAIL
    assert "elsewhere:999999 stopped sending heartbeats" in trials[stale].user_attrs["fail_reason"]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].user_attrs == {"retry_of": stale}
    assert waiting[0].system_attrs["fixed_params"] == trials[stale].params
    # a retry that is lost in turn is failed, not retried again
    retry = study.ask()
    assert retry.number == waiting[0].number
    storage.set_trial_user_attr(retry._trial_id, "heartbeat", time.time() - 60)
    assert workers.recover_stale_trials(study, grace_period=10) == [retry.number]
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_search_waits_for_a_lost_trial_then_reruns_it_and_warns_about_sqlite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    study = optuna.create_study(study_name="s", storage=make_storage(None, out))
    study.set_user_attr("autonorm", {"monitor": "val_loss"})  # the other worker's record
    lost = _dead_worker_trial(study, beat_age=0)  # alive for now: SQLite shared by two workers
    with pytest.warns(UserWarning, match="same SQLite file"):
        result = autonorm.search(
            TinyConvNet, TinyDataModule(), n_trials=2, trainer_kwargs={"max_epochs": 1},
            out_dir=out, study_name="s", space="minimal", warm_start=False,
            heartbeat_interval=0.5, grace_period=2,
        )  # fmt: skip
    trials = assert_settled(result.study, 2)
    assert trials[lost].state == TrialState.FAIL
    assert [t.user_attrs.get("retry_of") for t in trials].count(lost) == 1
    assert result.summary["trials"]["failed"] == 1


def test_postgres_urls_use_the_installed_driver():
    url = "postgresql://u:secret@127.0.0.1:5432/db"
    try:
        import psycopg2  # noqa: F401

        expected = url
    except ImportError:
        expected = "postgresql+psycopg://u:secret@127.0.0.1:5432/db"
    assert postgres_driver_url(url) == expected
    assert postgres_driver_url("postgres://u:secret@h/db").startswith("postgresql")
    assert postgres_driver_url("sqlite:///x.db") == "sqlite:///x.db"
    assert mask_password(url) == "postgresql://u:***@127.0.0.1:5432/db"


def test_bad_worker_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="grace_period"):
        autonorm.search(
            TinyConvNet, TinyDataModule(), heartbeat_interval=2, grace_period=1, out_dir=tmp_path
        )
    with pytest.raises(ValueError, match="heartbeat_interval"):
        autonorm.search(TinyConvNet, TinyDataModule(), heartbeat_interval=0, out_dir=tmp_path)


def test_pool_hands_out_gpus_round_robin_and_numbers_its_workers(tmp_path):
    code = "import os; print(os.environ['AUTONORM_WORKER'], os.environ['CUDA_VISIBLE_DEVICES'])"
    pool, signum = worker_pool.run_worker_pool(
        [sys.executable, "-c", code], 3, tmp_path, gpus=["0", "1"], poll_interval=0.1
    )
    assert signum is None and [w.returncode for w in pool] == [0, 0, 0]
    printed = [w.log_path.read_text().split() for w in pool]
    assert printed == [["0/3", "0"], ["1/3", "1"], ["2/3", "0"]]
