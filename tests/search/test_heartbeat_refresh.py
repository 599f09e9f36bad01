"""A live trial that runs longer than the grace period keeps its heartbeat fresh: the stale-trial
recovery another worker runs (:func:`~autonorm.search._workers.recover_stale_trials`, under the
claim lock, every time it looks for work) must not fail it and run its parameters again.

Real storages (a journal file, a SQLite file); the other worker is a thread with a storage
object of its own, reading the file as another process would. A small heartbeat interval and
grace period (0.2 s and 1.5 s) keep the tests short; the trial lasts until that worker has
checked it at an age of at least twice the grace period (an ordering, not a sleep: with the
heartbeat's refresh broken it would have been failed long before).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import autonorm
from autonorm import _trial_keys as keys
from autonorm.search import _workers as workers
from autonorm.search._storage import make_storage
from tests.lightning_models import TinyConvNet, TinyDataModule

INTERVAL, GRACE = 0.2, 1.5
#: the age (seconds since its start) at which the other worker must have checked the trial
CHECKED_AT_AGE = 2 * GRACE
#: how long a test waits for that at most (a loaded machine is slow; nothing here is timed)
PATIENCE = 60.0


def storage_url(kind: str, folder: Path) -> str:
    if kind == "journal":
        return str(folder / "journal.log")
    return f"sqlite:///{folder / 'study.db'}"


class OtherWorker(threading.Thread):
    """Another worker's stale-trial recovery, every 0.1 s, on its own storage object: stops
    at its first recovered trial, at ``stop``, or once it has checked a running trial at an
    age of :data:`CHECKED_AT_AGE` (then ``checked`` is set)."""

    def __init__(self, url: str, folder: Path, name: str) -> None:
        super().__init__(daemon=True)
        self.url, self.folder, self.study_name = url, folder, name
        self.failed: list[int] = []
        self.oldest_checked = 0.0  # the age of the oldest RUNNING trial a check ran over
        self.checked = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            study = None
            while not self.stop.is_set():
                if study is None:
                    try:
                        storage = make_storage(self.url, self.folder)
                        study = optuna.load_study(study_name=self.study_name, storage=storage)
                    except (KeyError, autonorm.AutoNormError):  # not created yet
                        time.sleep(0.1)
                        continue
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                self.failed += workers.recover_stale_trials(study, GRACE)
                if self.failed:
                    break
                ages = [time.time() - t.datetime_start.timestamp() for t in running]
                self.oldest_checked = max([self.oldest_checked, *ages])
                if self.oldest_checked >= CHECKED_AT_AGE:
                    break
                time.sleep(0.1)
        except BaseException as err:  # reported by the test
            self.error = err
        finally:
            self.checked.set()


STORAGES = pytest.mark.parametrize("kind", ["journal", "sqlite"])


@STORAGES
def test_a_live_trial_longer_than_the_grace_period_is_not_failed(kind, tmp_path):
    url = storage_url(kind, tmp_path)
    study = optuna.create_study(study_name="live", storage=make_storage(url, tmp_path))
    trial = study.ask()
    trial.suggest_categorical("bn1", ["batchnorm", "layernorm"])
    other = OtherWorker(url, tmp_path, "live")
    with workers.TrialHeartbeat(study, trial, INTERVAL):
        other.start()
        assert other.checked.wait(PATIENCE), "the other worker never checked the trial"
    other.join(PATIENCE)
    assert other.error is None, other.error
    frozen = workers.fresh_trial(study, trial)
    assert not other.failed and frozen.state == TrialState.RUNNING, (
        f"a live trial whose heartbeat runs every {INTERVAL} s was failed as stale "
        f"(grace {GRACE} s): {frozen.user_attrs.get(keys.FAIL_REASON)}"
    )
    assert other.oldest_checked >= CHECKED_AT_AGE
    assert not study.get_trials(states=(TrialState.WAITING,))  # no retry enqueued
    # the heartbeat is recent: refreshed while the trial ran, not only when it started
    assert frozen.user_attrs[keys.HEARTBEAT] - frozen.datetime_start.timestamp() >= GRACE
    study.tell(trial, 1.0)


class WaitingConvNet(TinyConvNet):
    """Its first training step waits until the other worker has checked the running trial at
    an age of twice the grace period (:data:`CHECKED`)."""

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            CHECKED.wait(PATIENCE)
        return super().training_step(batch, batch_idx)


CHECKED = threading.Event()


@STORAGES
def test_a_search_s_long_trial_survives_another_worker_s_stale_trial_recovery(kind, tmp_path):
    """The search's own trial (its heartbeat as the runner starts it) outlives the grace period
    while the other worker recovers stale trials: it completes, and nothing runs again."""
    url = storage_url(kind, tmp_path)
    # the file's schema first: two workers creating a new SQLite file at once race (see
    # test_claim_lock.py's xfail); the other worker then waits for the study to exist
    make_storage(url, tmp_path)
    other = OtherWorker(url, tmp_path, "long")
    CHECKED.clear()
    other.checked = CHECKED
    other.start()
    try:
        result = autonorm.search(
            WaitingConvNet, TinyDataModule(), n_trials=1, warm_start=False, space="minimal",
            trainer_kwargs={"max_epochs": 1}, storage=url, study_name="long", out_dir=tmp_path,
            seed=0, heartbeat_interval=INTERVAL, grace_period=GRACE, timeout=PATIENCE,
        )  # fmt: skip
    finally:
        other.stop.set()
        other.join(PATIENCE)
    assert other.error is None, other.error
    trials = result.study.get_trials()
    assert not other.failed, (
        f"the search's live trial (heartbeat every {INTERVAL} s) was failed as stale by another "
        f"worker after the {GRACE} s grace period: {trials[0].user_attrs.get(keys.FAIL_REASON)}"
    )
    assert [t.state for t in trials] == [TrialState.COMPLETE]
    assert not [t for t in trials if keys.RETRY_OF in t.user_attrs]
    assert other.oldest_checked >= CHECKED_AT_AGE  # the check ran while the trial was old
