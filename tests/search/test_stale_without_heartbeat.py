"""A RUNNING trial that never got a heartbeat (its worker died between asking for the trial and
its first beat): stale-trial recovery (:func:`~autonorm.search._workers.recover_stale_trials`)
reads its start time instead, so it is kept within the grace period and failed after it, and its
parameters (or, popped from the queue before it suggested any, the queue's) run again once.
Real journal-file and SQLite storages; the dead worker's trial is made with Optuna's storage API,
its start time in the past."""

from __future__ import annotations

import datetime
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

import autonorm
from autonorm import _trial_keys as keys
from autonorm.search import _workers as workers
from autonorm.search._storage import make_storage
from tests.lightning_models import TinyConvNet, TinyDataModule

GRACE = 10.0
MINIMAL_BN1 = ["batchnorm", "groupnorm(groups=2)", "layernorm"]  # TinyConvNet.bn1, "minimal"
STORAGES = pytest.mark.parametrize("kind", ["journal", "sqlite"])


def _study(kind: str, folder: Path) -> optuna.Study:
    url = str(folder / "journal.log") if kind == "journal" else f"sqlite:///{folder / 'study.db'}"
    return optuna.create_study(study_name="s", storage=make_storage(url, folder))


def _never_beaten(
    study: optuna.Study,
    started_ago: float,
    *,
    params: dict | None = None,
    user_attrs: dict | None = None,
    system_attrs: dict | None = None,
) -> int:
    """A RUNNING trial started ``started_ago`` seconds ago without a ``heartbeat`` attribute."""
    params = {"bn1": "layernorm"} if params is None else params
    template = FrozenTrial(
        number=-1,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.datetime.now() - datetime.timedelta(seconds=started_ago),
        datetime_complete=None,
        params=params,
        distributions={name: CategoricalDistribution(MINIMAL_BN1) for name in params},
        user_attrs=user_attrs or {},
        system_attrs=system_attrs or {},
        intermediate_values={},
        trial_id=-1,
    )
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return study._storage.get_trial(trial_id).number


@STORAGES
def test_a_trial_that_never_beat_is_kept_within_the_grace_period(kind, tmp_path):
    study = _study(kind, tmp_path)
    number = _never_beaten(study, started_ago=1)
    assert workers.recover_stale_trials(study, grace_period=GRACE) == []
    assert study.trials[number].state == TrialState.RUNNING
    assert not study.get_trials(states=(TrialState.WAITING,))


@STORAGES
@pytest.mark.parametrize(
    ("user_attrs", "who"),
    [
        ({}, "an unknown worker"),  # died before it recorded itself
        (
            {keys.WORKER: {"host": "elsewhere", "pid": 4242}},
            "worker elsewhere:4242",
        ),  # before its beat
        (
            {keys.WORKER: {"host": "h", "pid": 7}, keys.HEARTBEAT: "garbage"},
            "worker h:7",
        ),  # unreadable
    ],
    ids=["no-worker", "worker", "unreadable-beat"],
)
def test_a_trial_that_never_beat_fails_after_the_grace_period_and_runs_again_once(
    kind, tmp_path, user_attrs, who
):
    study = _study(kind, tmp_path)
    number = _never_beaten(study, started_ago=60, user_attrs=user_attrs)
    assert workers.recover_stale_trials(study, grace_period=GRACE) == [number]
    trial = study.trials[number]
    assert trial.state == TrialState.FAIL
    reason = trial.user_attrs[keys.FAIL_REASON]
    assert f"{who} stopped sending heartbeats" in reason
    assert "the last one was 60 s ago" in reason and "grace period is 10 s" in reason
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.user_attrs == {keys.RETRY_OF: number}
    assert retry.system_attrs["fixed_params"] == {"bn1": "layernorm"}
    # a second look finds nothing more to do: failed once, retried once
    assert workers.recover_stale_trials(study, grace_period=GRACE) == []
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1


@STORAGES
def test_a_queued_trial_lost_before_it_suggested_runs_the_queue_s_parameters_again(kind, tmp_path):
    """Popped from the queue (``fixed_params``), died before suggesting any parameter: the
    retry runs the parameters the queue gave it; with neither, nothing is retried."""
    study = _study(kind, tmp_path)
    queued = _never_beaten(
        study, 60, params={}, system_attrs={"fixed_params": {"bn1": "batchnorm"}}
    )
    empty = _never_beaten(study, 60, params={})
    assert workers.recover_stale_trials(study, grace_period=GRACE) == [queued, empty]
    assert [study.trials[n].state for n in (queued, empty)] == [TrialState.FAIL] * 2
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.user_attrs == {keys.RETRY_OF: queued}
    assert retry.system_attrs["fixed_params"] == {"bn1": "batchnorm"}


def test_a_search_waits_for_a_trial_that_never_beat_then_runs_it_again(tmp_path):
    """A search that finds another worker's trial just started without a heartbeat waits for
    it (it may still beat), fails it once its start is older than the grace period, and runs
    its parameters again: the study ends with every trial settled (a search that never failed
    it would wait for it until its generous ``timeout``)."""
    out = tmp_path / "run"
    out.mkdir()
    journal = str(out / "journal.log")
    study = optuna.create_study(study_name="s", storage=make_storage(journal, out))
    study.set_user_attr("autonorm", {"monitor": "val_loss"})  # the other worker's record
    lost = _never_beaten(study, started_ago=0, params={"bn1": "layernorm"})
    result = autonorm.search(
        TinyConvNet, TinyDataModule(), n_trials=2, trainer_kwargs={"max_epochs": 1},
        out_dir=out, study_name="s", storage=journal, space="minimal", warm_start=False,
        heartbeat_interval=0.5, grace_period=2, timeout=180,
    )  # fmt: skip
    trials = result.study.get_trials()
    assert trials[lost].state == TrialState.FAIL
    assert (
        "an unknown worker stopped sending heartbeats" in trials[lost].user_attrs[keys.FAIL_REASON]
    )
    retries = [t for t in trials if t.user_attrs.get(keys.RETRY_OF) == lost]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params["bn1"] == "layernorm"
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
