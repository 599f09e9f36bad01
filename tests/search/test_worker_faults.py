"""Faults a worker must survive: a worker paused past the grace period, a PostgreSQL server
restarted under two workers, a bundle folder that turns read-only or full during the export.
Real ``autonorm`` processes, a private PostgreSQL server, real tmpfs mounts."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import autonorm
from autonorm import AutoNormError
from tests.lightning_models import TinyConvNet, TinyDataModule
from tests.search.test_workers import (  # noqa: F401  (workdir is a fixture)
    assert_settled,
    finish,
    load,
    search_args,
    start,
    wait_for_running,
    workdir,
)


def retries_are_single(study: optuna.Study) -> None:
    """Every FAIL trial ran again exactly once; no trial left RUNNING or WAITING."""
    trials = study.get_trials()
    for failed in (t for t in trials if t.state == TrialState.FAIL):
        retries = [t.number for t in trials if t.user_attrs.get("retry_of") == failed.number]
        assert len(retries) <= 1, (failed.number, retries)
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


# -- a worker stopped past the grace period, then continued ------------------------------------


def test_a_paused_worker_finds_its_trial_taken_over_and_goes_on(workdir, tmp_path):  # noqa: F811
    storage, name = str(tmp_path / "journal.log"), f"pause-{uuid.uuid4().hex[:6]}"
    args = search_args(storage, name, tmp_path / "out", n_trials=4, sleep=0.2)
    paused_log, other_log = tmp_path / "paused.log", tmp_path / "other.log"
    paused = start(args, workdir, paused_log)
    try:
        [number] = wait_for_running(storage, name, tmp_path, paused, paused_log, pid=paused.pid)
        paused.send_signal(signal.SIGSTOP)
        other = start(args, workdir, other_log)
        assert finish(other, other_log) == 0, other_log.read_text()[-3000:]
    finally:
        paused.send_signal(signal.SIGCONT)
    assert finish(paused, paused_log) == 0, paused_log.read_text()[-3000:]
    text = paused_log.read_text()
    assert f"trial {number} was taken over" in text and "not recorded" in text
    assert "Cannot tell" not in text and "Traceback" not in text
    study = load(storage, name, tmp_path)
    trials = assert_settled(study, 4)
    assert trials[number].state == TrialState.FAIL
    assert [t.user_attrs.get("retry_of") for t in trials].count(number) == 1
    retries_are_single(study)


# -- PostgreSQL stopped and started again under two workers --------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateServer:
    """A throwaway PostgreSQL server (trust auth on 127.0.0.1) that the test may stop: the
    shared test server of ``.ci/postgres.sh`` serves other tests meanwhile."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="autonorm-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture
def private_postgres():
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail("no PostgreSQL server installed (.ci/postgres.sh installs it)")
        pytest.skip("no PostgreSQL server installed under /usr/lib/postgresql")
    server = PrivateServer(found[-1].parent)
    server.start()
    yield server
    with contextlib.suppress(subprocess.CalledProcessError):
        server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


def test_two_workers_wait_for_a_restarted_postgres_and_lose_no_trial(
    private_postgres, workdir, tmp_path,  # noqa: F811
):  # fmt: skip
    name = "restart"
    args = search_args(private_postgres.url, name, tmp_path / "out", n_trials=6, sleep=0.2)
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    procs = [start(args, workdir, log) for log in logs]
    wait_for_running(private_postgres.url, name, tmp_path, procs[0], logs[0], count=2)
    private_postgres.stop()
    time.sleep(6)  # longer than the grace period: heartbeats go stale meanwhile
    private_postgres.start()
    for proc, log in zip(procs, logs, strict=True):
        assert finish(proc, log, timeout=240) == 0, log.read_text()[-3000:]
    assert any("is unreachable" in log.read_text() for log in logs)
    study = load(private_postgres.url, name, tmp_path)
    assert_settled(study, 6)
    retries_are_single(study)


# -- the bundle folder turns read-only or full during the export ---------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs (root only: mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "fs"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> None:
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 1 << 10, 1):  # to the last byte
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


def _remount(folder: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True)


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_failed_export_is_a_clear_error_and_a_rerun_writes_the_bundle(small_fs, tmp_path, fault):
    db = tmp_path / "db"
    db.mkdir()
    storage = f"sqlite:///{db / 'study.db'}"
    out = small_fs / "bundle"

    def break_the_disk(study, trial):
        if len([t for t in study.trials if t.state.is_finished()]) == 2:
            _remount(small_fs, "ro") if fault == "read-only" else _fill(small_fs)

    options = dict(
        n_trials=2, space="minimal", trainer_kwargs={"max_epochs": 1}, out_dir=out, seed=0,
        warm_start=False, study_name="s", storage=storage,
    )  # fmt: skip
    try:
        with pytest.raises(AutoNormError, match="cannot write the bundle of study 's'") as err:
            autonorm.search(TinyConvNet, TinyDataModule(), callbacks=[break_the_disk], **options)
    finally:
        _remount(small_fs, "rw")
        (small_fs / "filler").unlink(missing_ok=True)
    assert ("Read-only" if fault == "read-only" else "No space") in str(err.value)
    assert "\n" not in str(err.value)
    before = [
        (t.number, t.state, t.values)
        for t in optuna.load_study(study_name="s", storage=storage).trials
    ]
    assert len(before) == 2 and all(t[1] == TrialState.COMPLETE for t in before)
    result = autonorm.search(TinyConvNet, TinyDataModule(), **options)  # the rerun
    assert [(t.number, t.state, t.values) for t in result.study.trials] == before
    for name in ("best_config.yaml", "summary.json", "report.html"):
        assert (out / name).is_file(), name
