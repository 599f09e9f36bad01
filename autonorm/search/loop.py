"""The loop every worker runs: claim a trial under the shared lock, run it, until the plan says
the study is done; and settling the trial an interrupt left behind."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from autonorm.search import workers
from autonorm.search.plan import DONE, WAIT, Plan

log = logging.getLogger(__name__)


def optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    claim: Any,
    *,
    plan: Plan,
    timeout: float | None,
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]],
    grace: float,
    trial_done: Callable[[], None],
) -> int:
    """Run trials until the plan says the study is done; return how many ran here.

    Under the claim lock a worker recovers lost trials, then asks the plan: run a trial (the
    plan enqueues its next one, or the sampler proposes), wait for other workers' running
    trials (they finish, or are lost and retried), or stop. The caps (``n_trials`` finished
    trials, the compute budget) count every worker's trials, so all workers stop together.
    """
    started = time.time()
    ran = 0
    waiting = False
    while timeout is None or time.time() - started < timeout:
        claim.acquire()
        try:
            workers.recover_stale_trials(study, grace)
            step = plan.next(study)
            if step == DONE:
                break
            if step == WAIT:
                claim.release()
                if not waiting:
                    log.info("waiting for the running trials of other workers")
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
