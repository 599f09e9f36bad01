"""The loop every worker runs: claim a trial under the shared lock, run it, until the plan says
the study is done; and settling the trial an interrupt left behind."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from autonorm._errors import AutoNormError
from autonorm._io import mask_password
from autonorm._trial_keys import FAIL_REASON, RETRY_OF
from autonorm.search import _workers as workers
from autonorm.search._plan import DONE, WAIT, Plan
from autonorm.search._ranks import RankLost

log = logging.getLogger(__name__)


#: How long a worker waits for an unreachable storage (a restarting PostgreSQL server) before it
#: stops with an error; the study keeps its trials and the same command resumes it.
STORAGE_OUTAGE_S = 120.0


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
    outage_limit: float = STORAGE_OUTAGE_S,
) -> int:
    """Run trials until the plan says the study is done; return how many ran here.

    Under the claim lock a worker recovers lost trials, then asks the plan: run a trial (the
    plan enqueues its next one, or the sampler proposes), wait for other workers' running
    trials (they finish, or are lost and retried), or stop. The caps (``n_trials`` finished
    trials, the compute budget) count every worker's trials, so all workers stop together.

    A trial another worker took over (this one was paused past the grace period) is logged
    and the loop goes on. An unreachable storage is waited for (up to ``outage_limit``
    seconds); the trial it broke is failed and its parameters run again.
    """
    started = time.time()
    ran = 0
    waiting = False
    attempt = _Attempt(study, objective)
    while timeout is None or time.time() - started < timeout:
        try:
            claim.acquire()
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
            try:  # a trial whose other rank died fails (Optuna logs it) and runs again once
                study.optimize(attempt, n_trials=1, callbacks=callbacks, catch=(RankLost,))
            except Exception:
                if attempt.taken_over is None:
                    raise
                attempt.log_takeover()
            attempt.retry_lost()
            trial_done()  # it finished: nothing left to settle if the next one fails
            ran += 1
            if getattr(study, "_stop_flag", False):
                break  # a callback's study.stop() ends the search, not just this one-trial loop
        except Exception as err:
            if not storage_unreachable(err):
                raise
            _release_quietly(claim)
            wait_for_storage(study, err, outage_limit)
            claim.acquire()  # settled under the lock the stale-trial recovery holds
            attempt.settle_after_outage(err)
            trial_done()
        finally:
            _release_quietly(claim)
    return ran


class TrialTakenOver(optuna.TrialPruned):
    """Another worker failed this worker's trial as lost (this one was paused past the grace
    period) and runs its parameters again. A ``TrialPruned`` only so that Optuna logs it as a
    line, not with a traceback; the trial stays FAIL."""


class _Attempt:
    """The objective as the loop runs it: remembers the trial, notices a take-over."""

    def __init__(self, study: optuna.Study, objective: Callable[[optuna.Trial], Any]) -> None:
        self.study = study
        self.objective = objective
        self.trial: optuna.Trial | None = None
        self.taken_over: tuple[int, str, str] | None = None  # (number, state, what ran here)
        self.lost: optuna.Trial | None = None  # a trial another rank of died in

    def __call__(self, trial: optuna.Trial) -> Any:
        self.trial, self.taken_over, self.lost = trial, None, None
        try:
            result = self.objective(trial)
        except RankLost:
            self.lost = trial
            raise
        except Exception as err:
            self._check_taken_over(trial, f"it ended with {type(err).__name__}: {err}")
            raise
        self._check_taken_over(trial, f"it got {result!r}")
        return result

    def _check_taken_over(self, trial: optuna.Trial, outcome: str) -> None:
        try:
            state = workers.fresh_trial(self.study, trial).state
        except Exception:  # the storage is unreachable: the loop settles the trial later
            return
        if state != TrialState.RUNNING:
            self.taken_over = (trial.number, state.name, outcome)
            raise TrialTakenOver(f"trial {trial.number} was taken over by another worker")

    def log_takeover(self) -> None:
        assert self.taken_over is not None
        number, state, outcome = self.taken_over
        retries = [
            t.number
            for t in self.study.get_trials(deepcopy=False)
            if t.user_attrs.get(RETRY_OF) == number
        ]
        log.warning(
            "trial %d was taken over while this worker was stopped past the grace period: it is "
            "%s, its parameters ran again as trial %s; its result here (%s) is not recorded; "
            "going on with the next trial",
            number,
            state,
            retries[0] if retries else "(none yet)",
            outcome,
        )
        self.taken_over = None

    def retry_lost(self) -> None:
        """The trial a rank died in (FAIL): its parameters enqueued once more."""
        trial, self.lost = self.lost, None
        if trial is None:
            return
        frozen = workers.fresh_trial(self.study, trial)
        if frozen.state == TrialState.FAIL and workers.enqueue_retry(self.study, frozen):
            log.warning(
                "trial %d failed (%s): its parameters run again",
                frozen.number,
                frozen.user_attrs.get(FAIL_REASON, "a rank was lost"),
            )

    def settle_after_outage(self, err: BaseException) -> None:
        """The trial an unreachable storage broke: FAIL, its parameters enqueued once more."""
        trial, self.trial = self.trial, None
        if trial is None:
            return
        frozen = workers.fresh_trial(self.study, trial)
        reason = f"the storage was unreachable: {_first_line(err)}"
        if frozen.state == TrialState.RUNNING:
            workers.fail_trial(self.study, frozen, reason)
            frozen = workers.fresh_trial(self.study, trial)
        if frozen.state == TrialState.FAIL and workers.enqueue_retry(self.study, frozen):
            log.warning("trial %d failed (%s): its parameters run again", frozen.number, reason)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _release_quietly(claim: Any) -> None:
    try:
        claim.release()
    except Exception as err:  # the lock's connection died with the server: nothing to release
        log.debug("claim lock release failed: %s", err)


def storage_unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or an error it came from) says the storage's server cannot be reached."""
    import sqlalchemy.exc

    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def wait_for_storage(study: optuna.Study, err: BaseException, limit: float) -> None:
    """Poll the storage until it answers again.

    Raises:
        AutoNormError: it stayed unreachable for ``limit`` seconds.
    """
    name = study.study_name
    log.warning("the storage of study %r is unreachable (%s): waiting", name, _first_line(err))
    deadline = time.time() + limit
    while time.time() < deadline:
        time.sleep(min(2.0, limit / 10))
        try:
            study.get_trials(deepcopy=False)
        except Exception as again:
            if not storage_unreachable(again):
                raise
            continue
        log.warning("the storage of study %r answers again: going on", name)
        return
    raise AutoNormError(
        f"the storage of study {name!r} stayed unreachable for {limit:g} s "
        f"({mask_password(_first_line(err))}); its trials are kept: rerun the same command "
        "to resume once it is back"
    ) from None


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
