"""The workers' claim lock (:func:`~autonorm.search._workers.claim_lock`): while one worker holds
it (deciding whether to start a trial, and asking for it), another worker waits.

Each storage with a claim lock: a file lock next to a journal file or a SQLite database, an
advisory lock on PostgreSQL (read from ``AUTONORM_TEST_POSTGRES_URL``, as in ``test_workers.py``;
skipped without it, failed under ``CI=true``). The holder and the waiter are threads, each with
its own lock object (its own file descriptor, its own database connection), as two worker
processes have. The proofs are orderings: the waiter asks for the lock, has a second to take
it and does not, and takes it only after the holder recorded its release. A second is no
timing bound the code must meet: a slower machine can only make a broken lock look sound,
never a sound one look broken.
"""

from __future__ import annotations

import contextlib
import threading
import uuid

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from autonorm.search import _loop as loop
from autonorm.search import _workers as workers
from autonorm.search._plan import Plan
from autonorm.search._storage import journal_path, make_storage
from tests.search.test_workers import postgres_url  # noqa: F401  (a fixture)

#: how long the waiter is given to take a held lock (it must not)
HELD_FOR = 1.0
#: how long a test waits for what must happen (a loaded machine is slow; nothing is timed)
PATIENCE = 60.0


@pytest.fixture(params=["journal", "sqlite", "postgres"])
def shared(request, tmp_path):
    """``(storage string, study name)`` of a storage with a claim lock."""
    name = f"claim-{uuid.uuid4().hex[:8]}"
    if request.param == "journal":
        yield str(tmp_path / "journal.log"), name
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}", name
    else:
        url = request.getfixturevalue("postgres_url")
        yield url, name
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=make_storage(url, tmp_path))


def worker_lock(given: str, name: str, tmp_path):
    """The claim lock a worker given storage ``given`` makes (as ``_SearchRun.open`` does)."""
    storage = make_storage(given, tmp_path)
    return storage, workers.claim_lock(storage, name, journal_path(given))


class Announcing:
    """A claim lock that sets ``events`` when its worker asks for it."""

    def __init__(self, lock, *events: threading.Event) -> None:
        self.lock, self.events = lock, events

    def acquire(self) -> None:
        for event in self.events:
            event.set()
        self.lock.acquire()

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_a_second_worker_waits_for_the_claim_until_the_first_releases_it(shared, tmp_path):
    given, name = shared
    _, first = worker_lock(given, name, tmp_path)
    _, second = worker_lock(given, name, tmp_path)
    order: list[str] = []
    asked, taken = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def contender() -> None:
        try:
            asked.set()
            with second:
                order.append("second took the claim")
                taken.set()
        except BaseException as err:  # reported by the test
            errors.append(err)
            taken.set()

    first.acquire()
    try:
        order.append("first took the claim")
        thread = threading.Thread(target=contender, daemon=True)
        thread.start()
        assert asked.wait(PATIENCE)
        waited = not taken.wait(HELD_FOR)
        order.append("first released the claim")
    finally:
        first.release()
    assert taken.wait(PATIENCE), "the second worker never took the released claim"
    thread.join(PATIENCE)
    assert not errors, errors
    assert waited, "the second worker took the claim while the first held it"
    assert order == ["first took the claim", "first released the claim", "second took the claim"]


def test_a_worker_starts_no_trial_while_another_holds_the_claim(shared, tmp_path):
    """The worker loop (:func:`~autonorm.search._loop.optimize`) asks for the claim before it
    looks for stale trials, asks the plan and starts a trial: while another worker holds the
    claim, this one starts nothing; once it is released, it runs its trial."""
    given, name = shared
    storage, held = worker_lock(given, name, tmp_path)
    optuna.create_study(storage=storage, study_name=name)
    mine_storage, mine = worker_lock(given, name, tmp_path)
    study = optuna.load_study(study_name=name, storage=mine_storage)
    order: list[str] = []
    asked, started = threading.Event(), threading.Event()
    moved = threading.Event()  # asked for the claim, or started a trial: whichever comes first
    ran: list[int] = []
    errors: list[BaseException] = []

    def objective(trial: optuna.Trial) -> float:
        order.append("trial started")
        started.set()
        moved.set()
        return 0.0

    def worker() -> None:
        try:
            ran.append(
                loop.optimize(
                    study,
                    objective,
                    Announcing(mine, asked, moved),
                    plan=Plan(max_epochs=1, budget_epochs=None, n_trials=1),
                    timeout=None,
                    callbacks=[],
                    grace=60.0,
                    trial_done=lambda: None,
                )
            )
        except BaseException as err:  # reported by the test
            errors.append(err)
            moved.set()

    held.acquire()
    try:
        order.append("claim held")
        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        assert moved.wait(PATIENCE), "the worker neither asked for the claim nor ran a trial"
        assert not errors, errors
        assert asked.is_set(), "the worker started a trial without asking for the claim"
        waited = not started.wait(HELD_FOR)
        order.append("claim released")
    finally:
        held.release()
    assert started.wait(PATIENCE), "the worker never ran its trial after the claim was released"
    thread.join(PATIENCE)
    assert not errors, errors
    assert waited, "the worker started a trial while another worker held the claim"
    assert order == ["claim held", "claim released", "trial started"]
    assert ran == [1]
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


# -- the schema race: two workers creating a new SQLite file at once ---------------------------


def test_two_workers_opening_a_new_sqlite_file_at_once_both_open_it(tmp_path):
    """Deterministic: the other worker creates the schema between this worker's check that the
    tables are missing and its CREATE TABLE (two threads opening a new file at once lose that
    race about 16 times in 20 here)."""
    from optuna.storages._rdb import models

    url = f"sqlite:///{tmp_path / 'study.db'}"
    raced: list[bool] = []

    def the_other_worker_creates_it_first(metadata, connection, **kw) -> None:
        if not raced:
            raced.append(True)
            optuna.storages.RDBStorage(url)

    sqlalchemy.event.listen(
        models.BaseModel.metadata, "before_create", the_other_worker_creates_it_first
    )
    try:
        storage = make_storage(url, tmp_path)
    finally:
        sqlalchemy.event.remove(
            models.BaseModel.metadata, "before_create", the_other_worker_creates_it_first
        )
    assert raced
    optuna.create_study(storage=storage, study_name="s")
