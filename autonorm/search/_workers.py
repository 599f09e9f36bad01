"""Several processes on one study: worker identity, trial heartbeats, stale-trial recovery,
trial claims and interrupts.

Workers cooperate through Optuna's storage only (Optuna's own distribution model): every
``autonorm search`` process given the same storage and study name joins the study.

* Every running trial carries the user attributes ``worker`` (``{"host", "pid"}``) and
  ``heartbeat`` (epoch seconds), refreshed by a daemon thread every ``heartbeat_interval``
  seconds.
* A RUNNING trial whose heartbeat is older than the grace period belongs to a dead worker.
  Storages with Optuna's heartbeat (PostgreSQL, MySQL) let Optuna fail it and retry its
  parameters once (:class:`RetryStaleTrial`); the journal file and SQLite have no Optuna
  heartbeat, and :func:`recover_stale_trials` does the same from the ``heartbeat`` attribute:
  the trial becomes FAIL with a ``fail_reason`` naming the dead worker and its parameters are
  enqueued once more with the user attribute ``retry_of``.
* Starting a trial is claimed under a lock shared by the workers (:func:`claim_lock`: a file
  lock next to a journal file or SQLite database, an advisory lock on PostgreSQL), so that the
  study ends with exactly ``n_trials`` finished trials however many workers run.
* SIGINT / SIGTERM raise :class:`Interrupted` (a ``KeyboardInterrupt``) once; ``search`` marks
  the current trial, writes the bundle and re-raises; the CLI exits with ``128 + signal``.

The local pool (:mod:`autonorm.search._pool`) starts worker processes with the environment
variable ``AUTONORM_WORKER=<index>/<count>``; a worker that sees it leaves the bundle to the parent.
The pool passes the storage in ``AUTONORM_STORAGE``, never on the workers' command lines.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autonorm._trial_keys import BASELINE, FAIL_REASON, HEARTBEAT, PLANNED, RETRY_OF, WORKER

log = logging.getLogger(__name__)

#: Environment variable naming a pool worker: ``"<index>/<count>"``.
WORKER_ENV = "AUTONORM_WORKER"
#: Environment variable holding the storage when ``--search.storage`` is not given: how a pool
#: hands its workers the storage without putting it (and its password) on their command line,
#: which any user of the host can read (``ps``, ``/proc/<pid>/cmdline``); the environment of a
#: process is readable by its owner only.
STORAGE_ENV = "AUTONORM_STORAGE"
#: User attributes a retried trial keeps from the trial it repeats.
_KEPT_ON_RETRY = (BASELINE, *PLANNED)


def worker_identity() -> dict[str, Any]:
    """``{"host": hostname, "pid": process id}`` of this process."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _worker_name(worker: Any) -> str:
    """``worker host:pid`` of a recorded ``worker`` attribute, else "an unknown worker"."""
    if isinstance(worker, dict) and worker:
        return f"worker {worker.get('host', '?')}:{worker.get('pid', '?')}"
    return "an unknown worker"


def pool_position() -> tuple[int, int] | None:
    """``(index, count)`` when this process is a worker of a local pool, else None."""
    value = os.environ.get(WORKER_ENV, "")
    index, _, count = value.partition("/")
    if index.isdigit() and count.isdigit():
        return int(index), int(count)
    return None


def given_storage(option: str | None) -> str | None:
    """The storage of this process: the ``--search.storage`` option, else ``AUTONORM_STORAGE``."""
    if option is not None:
        return option
    return os.environ.get(STORAGE_ENV) or None


# -- interrupts ------------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received: the worker stops after marking its trial and writing its
    bundle. ``exit_code`` is the shell's ``128 + signal number`` (130, 143)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        super().__init__(self.signal_name)

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []


def received_signal() -> int | None:
    """The first SIGINT/SIGTERM caught by :func:`handle_interrupts`, if any."""
    return _received[0] if _received else None


def _raise_interrupted(signum: int, frame: Any) -> None:
    if _received:  # a second Ctrl-C (or the pool forwarding one) must not cut the shutdown short
        log.warning("%s received again: still shutting down", signal.Signals(signum).name)
        return
    _received.append(signum)
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_interrupts() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into :class:`Interrupted`; ignore later ones.

    Only in the main thread (signal handlers can be set nowhere else); restores the previous
    handlers and forgets the signal on exit (the raised :class:`Interrupted` carries it on).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _received.clear()
    for signum in previous:
        signal.signal(signum, _raise_interrupted)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()  # a later search in this process must not read its errors as this


def as_interrupt(err: BaseException) -> Interrupted | None:
    """The :class:`Interrupted` that ``err`` stands for, or None.

    Only signals interrupt: a SIGINT/SIGTERM caught by :func:`handle_interrupts`, a
    KeyboardInterrupt, Lightning's ``SIGTERMException`` (a SystemExit), and the ``sys.exit(1)``
    Lightning raises while handling a KeyboardInterrupt inside ``Trainer.fit``. A ``sys.exit``
    of the user's own code is no interrupt (:class:`TrialExit`).
    """
    if isinstance(err, Interrupted):
        return err
    pending = received_signal()
    if pending is not None:
        return Interrupted(pending)
    if type(err).__name__ == "SIGTERMException":
        return Interrupted(signal.SIGTERM)
    if isinstance(err, KeyboardInterrupt):
        return Interrupted(signal.SIGINT)
    if isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt):
        return as_interrupt(err.__context__)
    return None


class TrialExit(RuntimeError):
    """The trial's own code called ``sys.exit``: that trial failed (it is not run again), and
    the search stops as on any other error of the user's code."""

    def __init__(self, code: object) -> None:
        self.code = code
        super().__init__(
            f"the trial's code called sys.exit({code!r}): the trial failed (not an interrupt; "
            "it is not run again)"
        )


# -- heartbeats and stale trials -------------------------------------------------------------


def _storage(study: optuna.Study) -> Any:
    # Optuna exposes no public call to update another worker's trial; its own heartbeat code
    # goes through the study's storage the same way.
    return study._storage


def has_optuna_heartbeat(study: optuna.Study) -> bool:
    """Whether the study's storage runs Optuna's heartbeat (RDB storages built with one)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(_storage(study))


class TrialHeartbeat:
    """Context manager: record ``worker`` and refresh ``heartbeat`` on a running trial.

    Args:
        study: the trial's study.
        trial: the running trial.
        interval: seconds between heartbeats.
    """

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: float) -> None:
        if not interval > 0:
            raise ValueError(f"`heartbeat_interval` must be > 0 seconds, got {interval!r}")
        self._storage = _storage(study)
        self._trial_id = trial._trial_id
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        trial.set_user_attr(WORKER, worker_identity())

    def __enter__(self) -> TrialHeartbeat:
        self._beat()
        self._thread = threading.Thread(
            target=self._run, name=f"autonorm-heartbeat-{self._trial_id}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 10)

    def _beat(self) -> bool:
        try:
            self._storage.set_trial_user_attr(self._trial_id, HEARTBEAT, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            return False  # finished, or failed as stale by another worker
        return True

    def _run(self) -> None:
        warned = False
        while not self._stop.wait(self.interval):
            try:
                if not self._beat():
                    return
            except Exception as err:  # a storage hiccup: try again at the next beat
                if not warned:
                    log.warning("heartbeat of trial id %d failed: %s", self._trial_id, err)
                    warned = True


def fresh_trial(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> FrozenTrial:
    """The trial as the storage holds it now."""
    return _storage(study).get_trial(trial._trial_id)


def _params_of(trial: FrozenTrial) -> dict[str, Any]:
    if trial.params:
        return dict(trial.params)
    # popped from the queue but died before suggesting: the queue's parameters
    return dict(trial.system_attrs.get("fixed_params") or {})


def enqueue_retry(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Enqueue ``trial``'s parameters once more with ``retry_of``; never a retry of a retry,
    never a second retry of one trial.

    Returns:
        Whether a retry was enqueued.
    """
    params = _params_of(trial)
    if RETRY_OF in trial.user_attrs or not params:
        return False
    if any(t.user_attrs.get(RETRY_OF) == trial.number for t in study.get_trials(deepcopy=False)):
        return False  # another worker (or Optuna's stale-trial callback) retried it already
    attrs = {k: trial.user_attrs[k] for k in _KEPT_ON_RETRY if k in trial.user_attrs}
    study.enqueue_trial(params, user_attrs={**attrs, RETRY_OF: trial.number})
    return True


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING (or queued) trial FAIL with ``fail_reason``; False when it has finished
    meanwhile."""
    storage = _storage(study)
    try:
        storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


def recover_stale_trials(study: optuna.Study, grace_period: float) -> list[int]:
    """Fail the trials of dead workers and enqueue their parameters once more.

    With Optuna's heartbeat (RDB storages) this is Optuna's ``fail_stale_trials`` with the
    storage's retry callback. Otherwise a RUNNING trial whose ``heartbeat`` attribute (or start
    time, before its first beat) is older than ``grace_period`` seconds is marked FAIL with a
    ``fail_reason`` naming its worker, and its parameters are enqueued with ``retry_of``. Two
    workers recovering the same trial cannot both succeed: the storage refuses to finish a
    trial twice, and only the worker that failed it enqueues the retry.

    Returns:
        The numbers of the trials this call failed (empty with Optuna's heartbeat).
    """
    if has_optuna_heartbeat(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return []
    now = time.time()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.user_attrs.get(HEARTBEAT)
        if not isinstance(beat, (int, float)):
            beat = trial.datetime_start.timestamp() if trial.datetime_start else None
        if beat is None or now - beat <= grace_period:
            continue
        worker = _worker_name(trial.user_attrs.get(WORKER))
        reason = (
            f"{worker} stopped sending heartbeats: the last one was {now - beat:.0f} s "
            f"ago, the grace period is {grace_period:g} s"
        )
        if not fail_trial(study, trial, reason):
            continue
        failed.append(trial.number)
        retried = enqueue_retry(study, trial)
        log.warning(
            "trial %d failed: %s%s",
            trial.number,
            reason,
            "; its parameters run again" if retried else "",
        )
    return failed


def live_foreign_trials(study: optuna.Study, grace_period: float) -> list[FrozenTrial]:
    """RUNNING trials of other processes whose heartbeat is recent."""
    me = worker_identity()
    now = time.time()
    out = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER)
        beat = trial.user_attrs.get(HEARTBEAT)
        fresh = isinstance(beat, (int, float)) and now - beat <= grace_period
        if worker and worker != me and fresh:
            out.append(trial)
    return out


class RetryStaleTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of heartbeat-stale trials (``max_retry=1``) that also records
    ``retry_of`` and drops the dead worker's ``worker``/``heartbeat`` attributes."""

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=1)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        log.warning(
            "trial %d failed: %s stopped sending heartbeats",
            trial.number,
            _worker_name(trial.user_attrs.get(WORKER)),
        )
        retry = copy.copy(trial)
        attrs = {k: trial.user_attrs[k] for k in _KEPT_ON_RETRY if k in trial.user_attrs}
        original = trial.system_attrs.get("failed_trial", trial.number)
        retry.user_attrs = {**attrs, RETRY_OF: original}
        super().__call__(study, retry)


# -- claiming trials -------------------------------------------------------------------------


class _Lock:
    """A claim lock: ``acquire``/``release``, or ``with lock:`` for a block."""

    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _NoLock(_Lock):
    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


class _FileLock(_Lock):
    """``flock`` on a file: shared by the processes of one host (journal file, SQLite)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


class _PostgresLock(_Lock):
    """A transaction-level advisory lock: released at commit/rollback, also when the worker
    dies (its connection closes)."""

    def __init__(self, engine: Any, name: str) -> None:
        self.engine = engine
        digest = hashlib.sha256(f"autonorm-claim:{name}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self._conn: Any = None

    def acquire(self) -> None:
        from sqlalchemy import text

        if self._conn is not None:
            return
        conn = self.engine.connect()
        try:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": self.key})
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.rollback()
            finally:
                conn.close()


def claim_lock(storage: Any, study_name: str, journal_path: Path | None = None) -> Any:
    """The lock under which a worker decides whether to start a trial and asks for it.

    A file lock next to a journal file or a SQLite database, an advisory lock on PostgreSQL;
    no lock for other storages (then two workers may each start the last trial).
    """
    if sys.platform == "win32":
        return _NoLock()
    if journal_path is not None:
        return _FileLock(journal_path.with_name(f".{journal_path.name}.claim.lock"))
    url = getattr(storage, "url", None)
    if isinstance(url, str):
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            db = Path(parsed.database)
            return _FileLock(db.with_name(f".{db.name}.claim.lock"))
        if parsed.get_backend_name() == "postgresql":
            return _PostgresLock(storage.engine, study_name)
    log.debug("no claim lock for storage %s", type(storage).__name__)
    return _NoLock()
