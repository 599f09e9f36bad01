"""The local worker pool behind ``autonorm search --search.n_workers K``: K processes of the same
command on one shared study, one progress display, and the bundle written by the parent once all
of them have exited."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import optuna

from autonorm._errors import USAGE_ERROR, UsageError
from autonorm.config import NormConfig
from autonorm.search._export import SearchResult, export_bundle
from autonorm.search._progress import SearchProgress
from autonorm.search._storage import make_storage
from autonorm.search._workers import STORAGE_ENV, WORKER_ENV

log = logging.getLogger(__name__)


@dataclass
class PoolWorker:
    """One worker process of :func:`run_worker_pool`."""

    index: int
    process: subprocess.Popen
    log_path: Path
    log_file: IO[bytes] = field(repr=False)

    @property
    def returncode(self) -> int | None:
        return self.process.poll()


def visible_gpus() -> list[str]:
    """The GPUs a pool can hand out: ``CUDA_VISIBLE_DEVICES`` entries, else ``0..n-1``."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no CUDA runtime: CPU workers
        return []


def gpu_sets(gpus: Sequence[str], count: int, per_worker: int) -> list[str]:
    """Each worker's ``CUDA_VISIBLE_DEVICES``: one GPU each, round-robin (workers may share
    one); with ``per_worker`` > 1 (a trial on several devices) a set of its own each.

    Raises:
        UsageError: the sets need more GPUs than are visible.
    """
    if per_worker <= 1:
        return [gpus[index % len(gpus)] for index in range(count)]
    if count * per_worker > len(gpus):
        raise UsageError(
            f"{count} workers x {per_worker} devices per trial need {count * per_worker} GPUs, "
            f"{len(gpus)} visible (CUDA_VISIBLE_DEVICES); use fewer workers or devices"
        )
    return [",".join(gpus[i * per_worker : (i + 1) * per_worker]) for i in range(count)]


def _worker_env(
    index: int, count: int, gpus: Sequence[str], extra: dict[str, str]
) -> dict[str, str]:
    env = {**os.environ, **extra}
    env[WORKER_ENV] = f"{index}/{count}"
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index]
    elif "OMP_NUM_THREADS" not in env:
        # CPU workers share the cores instead of each spawning one thread per core
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // count))
    return env


def run_worker_pool(
    command: Sequence[str],
    count: int,
    log_dir: Path,
    *,
    poll: Callable[[list[PoolWorker]], None] | None = None,
    poll_interval: float = 1.0,
    gpus: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    devices_per_worker: int = 1,
) -> tuple[list[PoolWorker], int | None]:
    """Run ``count`` copies of ``command`` and wait for all of them.

    Each worker gets ``AUTONORM_WORKER=i/count``, its GPUs through ``CUDA_VISIBLE_DEVICES``
    when there are GPUs (:func:`gpu_sets`; else an even share of the CPU threads), and
    its output in ``log_dir/worker-<i>.log``. The first SIGINT/SIGTERM to this process is
    forwarded to the workers (which mark their trials and stop); a second one kills them.

    Args:
        command: the worker's command line.
        count: number of workers.
        log_dir: folder of the workers' logs (created).
        poll: called with the workers every ``poll_interval`` seconds while they run.
        poll_interval: seconds.
        gpus: GPU ids to hand out (default :func:`visible_gpus`).
        env: more environment variables of the workers (values kept off their command line).
        devices_per_worker: GPUs each worker's trials train on (0: CPU trials, no GPU).

    Returns:
        The workers (exited) and the signal that interrupted the pool, if any.
    """
    gpus = visible_gpus() if gpus is None else list(gpus)
    gpus = gpu_sets(gpus, count, devices_per_worker) if gpus and devices_per_worker else []
    log_dir.mkdir(parents=True, exist_ok=True)
    workers: list[PoolWorker] = []
    received: list[int] = []
    reached: set[int] = set()  # the workers a forwarded signal reached

    def pass_on(worker: PoolWorker) -> None:
        reached.add(worker.index)
        if worker.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if len(received) == 1:
                    worker.process.send_signal(received[0])
                else:
                    worker.process.kill()

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for worker in workers:
            pass_on(worker)

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    for signum in previous:
        signal.signal(signum, forward)
    try:
        for index in range(count):
            if received:  # interrupted while starting: no more workers
                break
            path = log_dir / f"worker-{index}.log"
            handle = path.open("wb")
            process = subprocess.Popen(
                list(command),
                env=_worker_env(index, count, gpus, env or {}),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
            workers.append(PoolWorker(index, process, path, handle))
            if received and index not in reached:  # the signal came while it started
                pass_on(workers[-1])
        while any(w.process.poll() is None for w in workers):
            if poll is not None:
                poll(workers)
            time.sleep(poll_interval)
        if poll is not None:
            poll(workers)
    finally:
        for worker in workers:
            if worker.process.poll() is None:  # this process is failing: do not leave orphans
                worker.process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.process.wait(timeout=30)
                if worker.process.poll() is None:
                    worker.process.kill()
            worker.log_file.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return workers, (received[0] if received else None)


def log_tail(path: Path, lines: int = 8) -> list[str]:
    """The last ``lines`` non-empty lines of a worker log."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


@dataclass
class PoolResult:
    """What a pool did: the bundle's result (None when no trial finished), the workers that
    exited with an error, and the signal that interrupted the pool."""

    result: SearchResult | None
    failed: list[PoolWorker]
    signum: int | None

    @property
    def exit_code(self) -> int:
        """``128 + signal`` when interrupted; 2 when every failed worker had bad input; 1 when
        some worker failed otherwise; 0."""
        if self.signum is not None:
            return 128 + self.signum
        if self.failed:
            return USAGE_ERROR if all(w.returncode == USAGE_ERROR for w in self.failed) else 1
        return 0


def pool_storage(storage: str | None, out: Path, n_workers: int, say: Callable[[str], None]) -> str:
    """The storage the workers share: a journal file in the bundle folder unless one is given."""
    if storage is None:
        storage = str((out / "journal.log").resolve())
        say(
            f"{n_workers} workers share the journal file {storage} "
            "(--search.storage: a PostgreSQL URL for workers on several machines)"
        )
    elif storage.startswith("sqlite"):
        say(
            "[yellow]warning:[/] several workers on one SQLite file wait on its locks; a journal "
            "file (--search.storage path/journal.log) or PostgreSQL serves them better"
        )
    return storage


def run_pool(
    worker_command: Sequence[str],
    *,
    n_workers: int,
    n_trials: int | None,
    study_name: str,
    out: Path,
    storage: str | None,
    retrain: Callable[[NormConfig], Path] | None = None,
    say: Callable[[str], None] = print,
    devices_per_worker: int = 1,
) -> PoolResult:
    """Run ``n_workers`` copies of ``worker_command`` (each an ``autonorm search`` joining the
    study), show their common progress, then export the bundle here.

    Args:
        worker_command: the worker's command line; this function drops its storage option and
            adds the study and out_dir ones (the workers find the storage in
            ``AUTONORM_STORAGE``, off their command lines).
        n_workers, n_trials: the pool's size and the study's total number of trials.
        study_name, out: the shared study and the bundle folder.
        storage: the shared storage (default: a journal file in ``out``).
        retrain: trains the best config once more when every worker succeeded.
        say: prints a message for the user.
        devices_per_worker: GPUs each worker's trials train on (0: CPU trials).
    """
    out.mkdir(parents=True, exist_ok=True)
    storage = pool_storage(storage, out, n_workers, say)
    study_storage = make_storage(storage, out)  # fails here, once, on an unusable storage
    command = [*_without_storage(worker_command), "--search.n_workers", "1"]
    command += ["--search.out_dir", str(out), "--search.study_name", study_name]
    log_dir = out / "workers"
    progress = SearchProgress(n_trials)
    found: list[optuna.Study] = []

    def poll(pool: list[PoolWorker]) -> None:
        alive = sum(w.returncode is None for w in pool)
        try:
            if not found:
                found.append(optuna.load_study(study_name=study_name, storage=study_storage))
            progress.update(found[0], note=f"{alive} of {len(pool)} running, logs in {log_dir}")
        except KeyError:  # not created yet
            pass
        except Exception as err:  # a display must not stop the workers
            log.debug("progress poll failed: %s", err)

    started = time.time()
    with progress:
        # the storage URL (with its password) goes through the environment: `ps` shows command lines
        pool, signum = run_worker_pool(
            command,
            n_workers,
            log_dir,
            poll=poll,
            env={STORAGE_ENV: storage},
            devices_per_worker=devices_per_worker,
        )
    failed = [w for w in pool if w.returncode != 0]
    try:
        study = optuna.load_study(study_name=study_name, storage=study_storage)
    except KeyError:
        return PoolResult(None, failed, signum)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    # an interrupted pool keeps a record of what it did; failed workers alone leave nothing to show
    if signum is None and not study.get_trials(deepcopy=False, states=finished):
        return PoolResult(None, failed, signum)
    result = export_bundle(
        study,
        out,
        storage=storage,
        elapsed=time.time() - started,
        retrain=retrain if not failed and signum is None else None,
    )
    return PoolResult(result, failed, signum)


def _without_storage(command: Sequence[str]) -> list[str]:
    """``command`` less its ``--search.storage URL`` / ``--search.storage=URL``."""
    out: list[str] = []
    skip = False
    for arg in command:
        if skip:
            skip = False
        elif arg == "--search.storage":
            skip = True
        elif not arg.startswith("--search.storage="):
            out.append(arg)
    return out


def worker_command(argv: Sequence[str], *, debug: bool) -> list[str]:
    """The command line of one pool worker: this same ``autonorm search`` in a new process."""
    return [sys.executable, "-m", "autonorm.cli", *(["--debug"] if debug else []), "search", *argv]
