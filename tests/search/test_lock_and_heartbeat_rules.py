"""The rules of the claim lock, the trial heartbeat and stale-trial detection
(:mod:`autonorm.search._workers`) that the worker tests take for granted: which storages get a
claim lock and what it leaves on disk, an interrupt while waiting for the claim, what a heartbeat
records, its thread and its failures, and which RUNNING trials count as stale or live.

Real storages (a journal file, SQLite, PostgreSQL from ``AUTONORM_TEST_POSTGRES_URL``: skipped
without it, failed under ``CI=true``), real threads and signals, no mocks. As in
``test_claim_lock.py`` the proofs are orderings and generous bounds: a slower machine can only
make a fault look sound, never a sound rule look broken.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import stat
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileSymlinkLock
from optuna.trial import TrialState

from autonorm import _trial_keys as keys
from autonorm.search import _workers as workers
from autonorm.search._storage import journal_path, make_storage
from tests.search.test_workers import MINIMAL_BN1, postgres_url  # noqa: F401  (a fixture)

#: how long a test waits for what must happen (a loaded machine is slow; nothing is timed)
PATIENCE = 60.0
#: a heartbeat interval that beats many times while a test looks
INTERVAL = 0.05
#: the worker of the trials made here: another host, long gone
GONE = {"host": "elsewhere", "pid": 999999}

STORAGES = pytest.mark.parametrize("kind", ["journal", "sqlite"])


@pytest.fixture
def database(request) -> str:
    """The PostgreSQL test server's URL (``postgres_url``: skipped without one)."""
    return request.getfixturevalue("postgres_url")


def storage_url(kind: str, folder: Path) -> str:
    if kind == "journal":
        return str(folder / "journal.log")
    return f"sqlite:///{folder / 'study.db'}"


def journal_study(folder: Path) -> optuna.Study:
    return optuna.create_study(
        study_name="s", storage=make_storage(str(folder / "journal.log"), folder)
    )


def running_trial(study: optuna.Study, beat_age: float | None, worker: dict | None = GONE) -> int:
    """A RUNNING trial with parameters, of ``worker``, last beating ``beat_age`` seconds ago
    (None: it never beat)."""
    trial = study.ask()
    trial.suggest_categorical("bn1", MINIMAL_BN1)
    if worker is not None:
        trial.set_user_attr(keys.WORKER, worker)
    if beat_age is not None:
        trial.set_user_attr(keys.HEARTBEAT, time.time() - beat_age)
    return trial.number


def started_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before]


def taken_meanwhile(lock) -> bool:
    """Whether another worker (a thread) takes ``lock`` while this one holds its own."""
    taken = threading.Event()

    def other_worker() -> None:
        with lock:
            taken.set()

    threading.Thread(target=other_worker, daemon=True).start()
    return taken.wait(PATIENCE)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"not within {PATIENCE} s: {what}"
        time.sleep(0.02)


# -- which storages get a claim lock, and what it leaves on disk ------------------------------


@STORAGES
def test_the_claim_lock_file_lies_next_to_the_storage_file_writable_by_its_owner_only(
    kind, tmp_path
):
    given = storage_url(kind, tmp_path)
    lock = workers.claim_lock(make_storage(given, tmp_path), "s", journal_path(given))
    umask = os.umask(0o022)
    try:
        with lock:
            pass
    finally:
        os.umask(umask)
    (path,) = [p for p in tmp_path.iterdir() if p.name.endswith(".claim.lock")]
    assert path.name.startswith(".")  # hidden
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("given", ["sqlite://", "sqlite:///", "sqlite:///:memory:", None])
def test_a_storage_held_in_memory_has_no_claim_lock_and_says_so(
    given, tmp_path, monkeypatch, caplog
):
    """An in-memory SQLite database (each spelling) or Optuna's in-memory storage serves one
    process: its claim takes nothing, never waits, writes no file (not in the working folder
    either), and the debug log names the storage."""
    monkeypatch.chdir(tmp_path)
    storage = optuna.storages.InMemoryStorage() if given is None else make_storage(given, tmp_path)
    caplog.set_level(logging.DEBUG, logger=workers.__name__)
    first, second = (workers.claim_lock(storage, "s", None) for _ in range(2))
    with first:
        assert not list(tmp_path.iterdir())
        assert taken_meanwhile(second), "a worker waited for a claim that takes nothing"
    said = [r.getMessage() for r in caplog.records if r.name == workers.__name__]
    assert said == [f"no claim lock for storage {type(storage).__name__}"] * 2


def test_on_windows_workers_take_no_claim_lock(tmp_path, monkeypatch):
    """Windows has no ``flock``: the claim takes nothing (two workers may then each start the
    last trial), where POSIX puts a lock file next to the journal."""
    given = str(tmp_path / "journal.log")
    storage = make_storage(given, tmp_path)
    monkeypatch.setattr(sys, "platform", "win32")
    with workers.claim_lock(storage, "s", journal_path(given)):
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".claim.lock")]


def test_on_postgresql_the_claim_is_per_study_and_leaves_no_file(database, tmp_path, monkeypatch):
    """The advisory lock lives in the database: workers of another study on the same database
    do not wait for this study's claim, and no file appears (not in the working folder either)."""
    monkeypatch.chdir(tmp_path)
    suffix = uuid.uuid4().hex[:8]
    mine = workers.claim_lock(make_storage(database, tmp_path), f"mine-{suffix}", None)
    theirs = workers.claim_lock(make_storage(database, tmp_path), f"theirs-{suffix}", None)
    with mine:
        assert not list(tmp_path.iterdir())
        assert taken_meanwhile(theirs), "a worker of another study waited for this study's claim"


def test_on_postgresql_every_study_name_gives_a_claim_lock_that_can_be_taken(database, tmp_path):
    """The advisory lock's key is a hash of the study name and must fit PostgreSQL's bigint
    (half of all names would overflow it as an unsigned number)."""
    storage = make_storage(database, tmp_path)
    for i in range(16):
        with workers.claim_lock(storage, f"study-{i}", None):
            pass


def _waits_for_flock(path: Path) -> bool:
    """Whether this process waits for an ``flock`` on ``path`` (a ``->`` line of /proc/locks)."""
    inode = str(path.stat().st_ino)
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        waiting = fields[1:2] == ["->"] and fields[5] == str(os.getpid())
        if waiting and fields[6].rsplit(":", 1)[-1] == inode:
            return True
    return False


def _open_descriptors_on(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
        except OSError:  # closed meanwhile (the listing's own descriptor)
            pass
    return found


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")
def test_an_interrupt_while_waiting_for_the_claim_ends_the_wait_and_keeps_nothing_open(tmp_path):
    """Ctrl-C (here SIGTERM, the same to :func:`~autonorm.search._workers.handle_interrupts`)
    while another worker holds the claim: the wait ends with the interrupt itself, no descriptor
    stays open on the lock file, and the interrupted lock object takes the claim later as usual.
    The signal is sent once the kernel lists this process as waiting for the lock."""
    given = str(tmp_path / "journal.log")
    storage = make_storage(given, tmp_path)
    holder, waiter = (workers.claim_lock(storage, "s", journal_path(given)) for _ in range(2))
    main = threading.main_thread().ident
    done = threading.Event()
    sent: list[bool] = []

    def interrupter() -> None:
        deadline = time.monotonic() + PATIENCE
        while not done.is_set() and time.monotonic() < deadline:
            if _waits_for_flock(holder.path):
                sent.append(True)
                signal.pthread_kill(main, signal.SIGTERM)
                return
            time.sleep(0.01)
        holder.release()  # never saw the wait: let the test fail instead of hanging

    holder.acquire()
    try:
        with workers.handle_interrupts():
            thread = threading.Thread(target=interrupter, daemon=True)
            thread.start()
            with pytest.raises(workers.Interrupted) as err:
                waiter.acquire()
    finally:
        done.set()
        holder.release()
        with workers.handle_interrupts():  # forget the signal received (a fresh one clears it)
            pass
    thread.join(PATIENCE)
    assert sent, "the waiting worker was never seen waiting for the lock"
    assert err.value.signum == signal.SIGTERM
    assert _open_descriptors_on(holder.path) == []
    with waiter:
        assert len(_open_descriptors_on(holder.path)) == 1


# -- the heartbeat: validation, what it records, its thread, its failures ---------------------


@pytest.mark.parametrize("interval", [0, -1.0, math.nan])
def test_a_heartbeat_interval_must_be_a_positive_number_of_seconds(interval, tmp_path):
    study = journal_study(tmp_path)
    trial = study.ask()
    expected = f"`heartbeat_interval` must be > 0 seconds, got {interval!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        workers.TrialHeartbeat(study, trial, interval)
    assert workers.fresh_trial(study, trial).user_attrs == {}  # nothing recorded


def test_a_heartbeat_records_its_worker_and_beats_as_its_block_starts(tmp_path):
    study = journal_study(tmp_path)
    trial = study.ask()
    before = time.time()
    heartbeat = workers.TrialHeartbeat(study, trial, PATIENCE)  # no second beat in the block
    with heartbeat as entered:
        attrs = workers.fresh_trial(study, trial).user_attrs
    assert entered is heartbeat
    assert attrs[keys.WORKER] == {"host": socket.gethostname(), "pid": os.getpid()}
    assert attrs[keys.HEARTBEAT] >= before


def test_the_heartbeat_thread_is_a_daemon_named_after_its_trial_and_ends_with_the_block(tmp_path):
    study = journal_study(tmp_path)
    trial = study.ask()
    before = set(threading.enumerate())
    with workers.TrialHeartbeat(study, trial, INTERVAL):
        (thread,) = started_threads(before)
        assert thread.name == f"autonorm-heartbeat-{trial._trial_id}"
        assert thread.daemon  # a worker that exits never waits for it
    assert not thread.is_alive(), "the heartbeat thread outlived its trial's block"


@STORAGES
def test_a_heartbeat_stops_by_itself_once_another_worker_has_finished_its_trial(kind, tmp_path):
    """Another worker failed the trial as stale (this one was paused past the grace period):
    the heartbeat stops writing while the trial's own code still runs."""
    url = storage_url(kind, tmp_path)
    study = optuna.create_study(study_name="s", storage=make_storage(url, tmp_path))
    trial = study.ask()
    other = optuna.load_study(study_name="s", storage=make_storage(url, tmp_path))
    before = set(threading.enumerate())
    with workers.TrialHeartbeat(study, trial, INTERVAL):
        (thread,) = started_threads(before)
        assert workers.fail_trial(other, workers.fresh_trial(other, trial), "taken over")
        thread.join(PATIENCE)
        assert not thread.is_alive(), "the heartbeat kept beating on a finished trial"
    assert workers.fresh_trial(study, trial).state == TrialState.FAIL


def test_a_heartbeat_that_cannot_write_warns_once_and_beats_again_once_the_storage_is_back(
    tmp_path, caplog
):
    """The journal file is replaced by a folder for a while (under the journal's own lock, so
    that no write is cut in two): every beat fails meanwhile, one warning says so, and the
    beats resume once the file is back."""
    journal = tmp_path / "journal.log"
    aside = tmp_path / "journal.log.aside"
    study = journal_study(tmp_path)
    trial = study.ask()
    caplog.set_level(logging.WARNING, logger=workers.__name__)
    journal_lock = JournalFileSymlinkLock(str(journal))

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == workers.__name__]

    with workers.TrialHeartbeat(study, trial, INTERVAL):
        journal_lock.acquire()
        os.replace(journal, aside)
        journal.mkdir()
        journal_lock.release()
        wait_until(warned, "the failing heartbeat never warned")
        time.sleep(20 * INTERVAL)  # about 20 more failed beats: none may warn again
        journal_lock.acquire()
        journal.rmdir()
        os.replace(aside, journal)
        journal_lock.release()
        back = time.time()
        wait_until(
            lambda: workers.fresh_trial(study, trial).user_attrs[keys.HEARTBEAT] > back,
            "the heartbeat never beat again",
        )
    (message,) = warned()
    assert message.startswith(f"heartbeat of trial id {trial._trial_id} failed: ")
    assert "Is a directory" in message


def test_leaving_the_block_waits_for_a_hung_beat_only_so_long(tmp_path):
    """A beat stuck in the storage (the journal's lock held elsewhere) does not hold the worker
    forever: leaving the block waits ``interval + 10`` s for the heartbeat thread, then goes on
    (the thread is a daemon and ends once its beat gets through)."""
    study = journal_study(tmp_path)
    trial = study.ask()
    journal_lock = JournalFileSymlinkLock(str(tmp_path / "journal.log"))
    heartbeat = workers.TrialHeartbeat(study, trial, INTERVAL)
    before = set(threading.enumerate())
    heartbeat.__enter__()
    (thread,) = started_threads(before)
    left = threading.Event()
    journal_lock.acquire()
    try:
        time.sleep(20 * INTERVAL)  # the next beat now waits for the lock
        threading.Thread(
            target=lambda: (heartbeat.__exit__(None, None, None), left.set()), daemon=True
        ).start()
        # within Optuna's 30 s before it takes a held journal lock for stale
        assert left.wait(25), "leaving the block waited for a beat that cannot get through"
        assert thread.is_alive()
    finally:
        journal_lock.release()
    thread.join(PATIENCE)
    assert not thread.is_alive(), "the heartbeat thread never ended once its beat got through"


# -- stale and live trials --------------------------------------------------------------------


def test_a_running_trial_that_never_sent_a_heartbeat_is_judged_by_its_start_time(tmp_path):
    study = journal_study(tmp_path)
    silent = running_trial(study, beat_age=None, worker=None)
    started = study.trials[silent].datetime_start.timestamp()
    assert workers.recover_stale_trials(study, grace_period=3600) == []
    wait_until(lambda: time.time() > started, "the clock never passed the trial's start")
    assert workers.recover_stale_trials(study, grace_period=0) == [silent]
    failed = study.trials[silent]
    assert failed.state == TrialState.FAIL
    assert "an unknown worker stopped sending heartbeats" in failed.user_attrs[keys.FAIL_REASON]


def test_each_recovered_trial_is_logged_with_its_reason_and_whether_it_runs_again(tmp_path, caplog):
    """The reason names the worker, the age of its last heartbeat and the grace period; the
    log adds whether the parameters run again (not for a retry lost in turn)."""
    study = journal_study(tmp_path)
    caplog.set_level(logging.WARNING, logger=workers.__name__)
    lost = running_trial(study, beat_age=600)
    assert workers.recover_stale_trials(study, grace_period=10) == [lost]
    retry = study.ask()  # the retry, lost in turn
    retry.set_user_attr(keys.WORKER, GONE)
    retry.set_user_attr(keys.HEARTBEAT, time.time() - 600)
    assert workers.recover_stale_trials(study, grace_period=10) == [retry.number]
    reasons = [study.trials[n].user_attrs[keys.FAIL_REASON] for n in (lost, retry.number)]
    for reason in reasons:
        said = re.fullmatch(
            r"worker elsewhere:999999 stopped sending heartbeats: the last one was (\d+) s ago, "
            r"the grace period is 10 s",
            reason,
        )
        assert said and 600 <= int(said[1]) <= 600 + PATIENCE, reason
    assert [r.getMessage() for r in caplog.records if r.name == workers.__name__] == [
        f"trial {lost} failed: {reasons[0]}; its parameters run again",
        f"trial {retry.number} failed: {reasons[1]}",
    ]


def test_a_recovery_pass_that_finds_no_stale_trial_writes_nothing(tmp_path):
    """Finished trials keep their last, old heartbeat and queued trials have none: only RUNNING
    trials are looked at, so a pass over a quiet study leaves the journal as it was."""
    study = journal_study(tmp_path)
    for state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED):
        number = running_trial(study, beat_age=600)
        study.tell(number, 1.0 if state == TrialState.COMPLETE else None, state=state)
    running_trial(study, beat_age=0)  # alive
    study.enqueue_trial({"bn1": "layernorm"})
    before = (tmp_path / "journal.log").read_bytes()
    assert workers.recover_stale_trials(study, grace_period=10) == []
    assert (tmp_path / "journal.log").read_bytes() == before


class AnotherWorkerFinishes(logging.Handler):
    """Another worker (its own storage object) that completes trial ``number`` the moment this
    worker logs its first recovered trial: a deterministic interleaving of two workers."""

    def __init__(self, other: optuna.Study, number: int) -> None:
        super().__init__(logging.WARNING)
        self.other, self.number, self.done = other, number, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.done:
            self.done = True
            self.other.tell(self.number, 1.0)


def test_a_stale_trial_another_worker_finishes_meanwhile_is_left_to_it_and_the_next_is_recovered(
    tmp_path,
):
    study = journal_study(tmp_path)
    first, second, third = (running_trial(study, beat_age=600) for _ in range(3))
    other = optuna.load_study(
        study_name="s", storage=make_storage(str(tmp_path / "journal.log"), tmp_path)
    )
    handler = AnotherWorkerFinishes(other, second)
    logging.getLogger(workers.__name__).addHandler(handler)
    try:
        assert workers.recover_stale_trials(study, grace_period=10) == [first, third]
    finally:
        logging.getLogger(workers.__name__).removeHandler(handler)
    trials = study.get_trials()
    assert handler.done
    assert trials[second].state == TrialState.COMPLETE
    assert keys.FAIL_REASON not in trials[second].user_attrs
    retried = [t.user_attrs[keys.RETRY_OF] for t in trials if keys.RETRY_OF in t.user_attrs]
    assert retried == [first, third]


@pytest.mark.parametrize(
    ("worker", "named"),
    [
        ({"host": "gpu-3", "pid": 41}, "worker gpu-3:41"),
        ({"host": "gpu-3"}, "worker gpu-3:?"),
        ({"pid": 41}, "worker ?:41"),
        ({}, "an unknown worker"),
        ("gpu-3:41", "an unknown worker"),  # not the {"host", "pid"} record
        (None, "an unknown worker"),  # never recorded
    ],
)
def test_the_fail_reason_names_the_lost_worker_by_host_and_pid(worker, named, tmp_path):
    study = journal_study(tmp_path)
    lost = running_trial(study, beat_age=600, worker=worker)
    assert workers.recover_stale_trials(study, grace_period=10) == [lost]
    reason = study.trials[lost].user_attrs[keys.FAIL_REASON]
    assert reason.startswith(f"{named} stopped sending heartbeats: "), reason


def test_a_trial_lost_before_suggesting_runs_its_queued_parameters_again(tmp_path):
    """Popped from the queue (with an attribute a retry keeps) and lost before its first
    suggestion: the retry repeats the queued parameters. A lost trial with no parameters at
    all is failed and not run again."""
    study = journal_study(tmp_path)
    study.enqueue_trial({"bn1": "layernorm"}, user_attrs={keys.BASELINE: "uniform:layernorm"})
    queued, bare = study.ask(), study.ask()
    for trial in (queued, bare):
        trial.set_user_attr(keys.WORKER, GONE)
        trial.set_user_attr(keys.HEARTBEAT, time.time() - 600)
    assert workers.recover_stale_trials(study, grace_period=10) == [queued.number, bare.number]
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.system_attrs["fixed_params"] == {"bn1": "layernorm"}
    assert retry.user_attrs == {keys.BASELINE: "uniform:layernorm", keys.RETRY_OF: queued.number}


def test_a_lost_trial_already_run_again_is_not_enqueued_a_second_time(tmp_path):
    study = journal_study(tmp_path)
    lost = running_trial(study, beat_age=600)
    assert workers.recover_stale_trials(study, grace_period=10) == [lost]
    assert not workers.enqueue_retry(study, study.trials[lost])
    assert [t.user_attrs.get(keys.RETRY_OF) for t in study.trials].count(lost) == 1


def recover_until_failed(study: optuna.Study, trial: optuna.Trial) -> None:
    """Recovery passes until Optuna's heartbeat fails ``trial`` (silent past its grace period);
    with Optuna's heartbeat a pass returns no numbers."""
    deadline = time.monotonic() + PATIENCE
    while workers.fresh_trial(study, trial).state == TrialState.RUNNING:
        assert time.monotonic() < deadline, f"Optuna never failed stale trial {trial.number}"
        assert workers.recover_stale_trials(study, grace_period=2) == []
        time.sleep(0.2)


def test_with_optuna_s_heartbeat_a_stale_trial_is_retried_once_without_warnings(
    database, tmp_path, caplog
):
    """PostgreSQL runs Optuna's own heartbeat, and recovery is Optuna's, its experimental
    warnings kept quiet. The retry keeps what a retry keeps and records ``retry_of``, not the
    dead worker; a retry lost in turn is failed, not run again; each is logged."""
    name = f"stale-{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.WARNING, logger=workers.__name__)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        storage = make_storage(database, tmp_path, heartbeat_interval=1, grace_period=2)
        study = optuna.create_study(study_name=name, storage=storage)
        try:
            assert workers.has_optuna_heartbeat(study)
            lost = study.ask()
            lost.suggest_categorical("bn1", MINIMAL_BN1)
            lost.set_user_attr(keys.BASELINE, "own norms")
            lost.set_user_attr(keys.WORKER, GONE)
            storage.record_heartbeat(lost._trial_id)  # its worker beat once, then died
            recover_until_failed(study, lost)
            (retry,) = study.get_trials(states=(TrialState.WAITING,))
            assert retry.user_attrs == {keys.BASELINE: "own norms", keys.RETRY_OF: lost.number}
            again = study.ask()
            assert again.number == retry.number
            storage.record_heartbeat(again._trial_id)
            recover_until_failed(study, again)
            assert not study.get_trials(states=(TrialState.WAITING,))
        finally:
            optuna.delete_study(study_name=name, storage=storage)
    experimental = optuna.exceptions.ExperimentalWarning
    assert not [w.message for w in seen if issubclass(w.category, experimental)]
    assert [r.getMessage() for r in caplog.records if r.name == workers.__name__] == [
        f"trial {lost.number} failed: worker elsewhere:999999 stopped sending heartbeats",
        f"trial {again.number} failed: an unknown worker stopped sending heartbeats",
    ]


def test_only_other_workers_running_trials_with_a_recent_heartbeat_count_as_live(tmp_path):
    study = journal_study(tmp_path)
    live = running_trial(study, beat_age=0)
    running_trial(study, beat_age=600)  # stale
    running_trial(study, beat_age=0, worker=workers.worker_identity())  # this process's own
    running_trial(study, beat_age=0, worker=None)  # no worker recorded
    running_trial(study, beat_age=None)  # never beat
    finished = running_trial(study, beat_age=0)
    study.tell(finished, 1.0)
    assert [t.number for t in workers.live_foreign_trials(study, grace_period=60)] == [live]
