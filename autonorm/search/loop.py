"""The loop every worker runs: claim a trial under the shared lock, run it, until the study holds
its ``n_trials`` finished trials; and settling the trial an interrupt left behind."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from autonorm.search import workers

log = logging.getLogger(__name__)


def optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    claim: Any,
    *,
    n_trials: int,
    timeout: float | None,
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]],
    grace: float,
    trial_done: Callable[[], None],
) -> int:
    """Run trials until the study holds ``n_trials`` finished ones; return how many ran here.

    Under the claim lock a worker recovers lost trials, then starts a trial only while the
    finished plus running trials are fewer than ``n_trials``; otherwise it waits for the
    running ones (they finish, or are lost and retried). So the study ends with exactly
    ``n_trials`` finished trials and all workers stop together.
    """
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    started = time.time()
    ran = 0
    waiting = False
    while timeout is None or time.time() - started < timeout:
        claim.acquire()
        try:
            workers.recover_stale_trials(study, grace)
            trials = study.get_trials(deepcopy=False, states=states)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            finished = len(trials) - running
            if finished >= n_trials:
                break
            if finished + running >= n_trials:
                claim.release()
                if not waiting:
                    log.info("waiting for %d running trials of other workers", running)
                    waiting = True
                time.sleep(min(1.0, grace / 4))
                continue
            waiting = False
            study.optimize(objective, n_trials=1, callbacks=callbacks, catch=())
            trial_done()  # it finished: nothing left to settle if the next one fails
            ran += 1
            if getattr(study, "_stop_flag", False):
                break  # a callback's study.stop() ends the search, not just this one-trial loop
        finally:
            claim.release()
    return ran


def interrupt_reason(interrupt: workers.Interrupted) -> str:
    who = workers.worker_identity()
    return f"interrupted by {interrupt.signal_name} (worker {who['host']}:{who['pid']})"


def settle_interrupted_trial(
    study: optuna.Study,
    trial: optuna.Trial | None,
    interrupt: workers.Interrupted | None,
    err: BaseException,
) -> None:
    """After the search loop died: the trial it ran must not stay RUNNING; an interrupted
    trial's parameters are enqueued to run again (once)."""
    if trial is None:
        return
    try:
        frozen = workers.fresh_trial(study, trial)
        if frozen.state == TrialState.RUNNING:
            reason = interrupt_reason(interrupt) if interrupt else f"{type(err).__name__}: {err}"
            workers.fail_trial(study, frozen, reason)
            frozen = workers.fresh_trial(study, trial)
        retry = interrupt is not None and frozen.state == TrialState.FAIL
        if retry and workers.enqueue_retry(study, frozen):
            log.warning("trial %d was interrupted: its parameters run again", frozen.number)
    except Exception as follow_up:  # the storage may be what failed: keep the first error
        log.warning("could not mark trial %d after %r: %s", trial.number, err, follow_up)
