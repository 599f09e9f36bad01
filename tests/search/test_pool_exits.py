"""How a local worker pool (``--search.n_workers``) ends: its exit code when workers fail, the
failed worker's log tail in the user's terminal, a second Ctrl-C that kills workers ignoring the
first, and the CPU threads its workers share. Real processes (``sh`` workers where a real
``autonorm`` worker is not the point), real signals."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from autonorm.search._pool import PoolResult, PoolWorker, log_tail, run_pool, run_worker_pool

#: The pool appends its own options to the worker command: ``sh -c SCRIPT`` takes them as $0...
BY_INDEX = 'case "$AUTONORM_WORKER" in 0/*) {first};; *) {others};; esac'


def _pool_of_sh(tmp_path: Path, first: str, others: str, n_workers: int) -> PoolResult:
    return run_pool(
        ["sh", "-c", BY_INDEX.format(first=first, others=others)],
        n_workers=n_workers,
        n_trials=2,
        study_name="s",
        out=tmp_path / "bundle",
        storage=None,
        say=lambda message: None,
        devices_per_worker=0,
    )


@pytest.mark.parametrize(
    ("first", "others", "code", "failed"),
    [
        ("exit 0", "exit 0", 0, []),
        ("exit 2", "exit 2", 2, [0, 1, 2]),  # every failed worker had bad input: a usage error
        ("exit 0", "exit 2", 2, [1, 2]),
        ("exit 2", "exit 1", 1, [0, 1, 2]),  # bad input and a crash: a failure
        ("exit 0", "exit 3", 1, [1, 2]),  # a worker's own code is not passed on: 1
        ("exit 0", "kill -KILL $$", 1, [1, 2]),  # killed by a signal (returncode -9)
    ],
    ids=["all-ok", "all-usage", "some-usage", "usage-and-crash", "other-code", "killed"],
)
def test_the_pool_exit_code_says_how_its_workers_failed(tmp_path, first, others, code, failed):
    outcome = _pool_of_sh(tmp_path, first, others, n_workers=3)
    assert [w.index for w in outcome.failed] == failed
    assert outcome.signum is None
    assert outcome.exit_code == code
    assert outcome.result is None  # no study was created: no bundle to write


def test_log_tail_is_the_last_non_empty_lines_of_a_worker_log(tmp_path):
    log = tmp_path / "worker-0.log"
    log.write_text("".join(f"line {i}\n\n   \n" for i in range(12)))
    assert log_tail(log, 3) == ["line 9", "line 10", "line 11"]
    assert log_tail(log) == [f"line {i}" for i in range(4, 12)]  # 8 by default
    assert log_tail(tmp_path / "missing.log") == []  # a worker that never wrote one


FAILS_IN_WORKER_ONE = '''
import os

from usermodels import Data, Net  # noqa: F401


class FailsInWorkerOne(Net):
    """Worker 1 of a pool cannot build the model; worker 0 (and the parent) can."""

    def __init__(self, **kwargs):
        if os.environ.get("AUTONORM_WORKER", "").startswith("1/"):
            raise RuntimeError("worker one cannot build its model")
        super().__init__(**kwargs)
'''


@pytest.mark.slow
def test_a_failed_worker_is_reported_with_its_log_and_the_pool_exits_1(
    workdir, tmp_path, autonorm_cli
):
    """Worker 1 fails, worker 0 runs the trials: the bundle is written from them, the user
    sees which worker failed, where its log is and the error line of that log, the command
    exits 1, and the retraining (asked for) is skipped: one worker's failure leaves the
    study's answer in doubt."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "usermodels.py").write_text((workdir / "usermodels.py").read_text())
    (project / "failing.py").write_text(FAILS_IN_WORKER_ONE)
    args = [
        "search", "--model", "failing.FailsInWorkerOne", "--data", "usermodels.Data",
        "--trainer.max_epochs", "1", "--search.space", "minimal", "--search.n_trials", "2",
        "--search.n_workers", "2", "--search.out_dir", "out", "--search.warm_start", "false",
        "--search.retrain", "true",
    ]  # fmt: skip
    done = autonorm_cli(args, project, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    out = project / "out"
    log = out / "workers" / "worker-1.log"
    lines = done.stderr.splitlines()
    header = f"autonorm: worker 1 exited 1 (log {log.relative_to(project)})"
    assert header in lines, done.stderr[-3000:]
    tail = lines[lines.index(header) + 1 :]
    assert tail and tail[0].startswith("  autonorm: failed: RuntimeError: worker one cannot")
    assert "worker 0 exited" not in done.stderr
    assert "worker one cannot build its model" in log.read_text()
    # worker 0's trials still make a bundle; no retraining after a failed worker
    assert {"best_config.yaml", "summary.json", "report.html"} <= {p.name for p in out.iterdir()}
    assert not (out / "best.ckpt").exists()


# -- signals -----------------------------------------------------------------------------------

#: A worker that survives SIGINT: it notes each one in its log and goes on sleeping.
STUBBORN = "trap 'echo got SIGINT' INT; echo ready; while :; do sleep 0.1; done"


def _log_has(worker: PoolWorker, text: str) -> bool:
    return worker.log_path.exists() and text in worker.log_path.read_text()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_second_ctrl_c_kills_workers_that_ignored_the_first(tmp_path):
    """The first SIGINT to the pool reaches every worker (each logs it and goes on); the
    second kills them: the pool returns at once, its workers gone by SIGKILL."""
    sent: list[str] = []
    before = signal.getsignal(signal.SIGINT)
    started = time.time()

    def press_ctrl_c(pool: list[PoolWorker]) -> None:
        if not sent and len(pool) == 2 and all(_log_has(w, "ready") for w in pool):
            sent.append("first")
            os.kill(os.getpid(), signal.SIGINT)  # the pool's handler forwards it
        elif sent == ["first"] and all(_log_has(w, "got SIGINT") for w in pool):
            assert all(w.returncode is None for w in pool)  # the first one did not stop them
            sent.append("second")
            os.kill(os.getpid(), signal.SIGINT)
        elif time.time() - started > 60:  # generous: the workers react in milliseconds
            logs = [w.log_path.read_text() for w in pool]
            raise AssertionError(f"workers still running after the Ctrl-Cs {sent}: {logs}")

    workers, received = run_worker_pool(
        ["sh", "-c", STUBBORN], 2, tmp_path / "logs", poll=press_ctrl_c, poll_interval=0.05
    )
    assert sent == ["first", "second"]
    assert received == signal.SIGINT
    assert [w.returncode for w in workers] == [-signal.SIGKILL, -signal.SIGKILL]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_first_ctrl_c_is_only_forwarded_and_the_pool_waits_for_its_workers(tmp_path):
    """Workers that stop on SIGINT in their own time (here: after a short clean-up) are
    waited for, not killed: they end with their own exit code."""
    cleanup = (
        "trap 'sleep 0.5; echo cleaned; exit 130' INT; echo ready; while :; do sleep 0.1; done"
    )

    pressed: list[bool] = []
    started = time.time()

    def press_ctrl_c_once(pool: list[PoolWorker]) -> None:
        if not pressed and len(pool) == 2 and all(_log_has(w, "ready") for w in pool):
            pressed.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        elif time.time() - started > 60:  # generous: the workers react in milliseconds
            raise AssertionError(f"workers still running: {[w.log_path.read_text() for w in pool]}")

    workers, received = run_worker_pool(
        ["sh", "-c", cleanup], 2, tmp_path / "logs", poll=press_ctrl_c_once, poll_interval=0.05
    )
    assert pressed and received == signal.SIGINT
    assert [w.returncode for w in workers] == [130, 130]
    assert all("cleaned" in w.log_path.read_text() for w in workers)


# -- thread sharing ------------------------------------------------------------------------------

PRINT_THREADS = (
    "import os, torch; print(os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads(), "
    "os.environ.get('CUDA_VISIBLE_DEVICES'))"
)


def _printed(workers: list[PoolWorker]) -> list[list[str]]:
    return [w.log_path.read_text().split()[-3:] for w in workers]


def test_cpu_workers_share_the_cores_instead_of_each_taking_all(tmp_path, monkeypatch):
    """CPU workers (no GPU to hand out) each get ``cpu_count // workers`` threads (at least
    one): torch in the worker runs with that many."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    count = 2
    share = str(max(1, (os.cpu_count() or 1) // count))
    workers, received = run_worker_pool(
        [sys.executable, "-c", PRINT_THREADS], count, tmp_path / "logs", gpus=[], poll_interval=0.1
    )
    assert received is None and [w.returncode for w in workers] == [0] * count
    assert _printed(workers) == [[share, share, "None"]] * count


def test_more_cpu_workers_than_cores_get_one_thread_each(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    count = (os.cpu_count() or 1) + 1
    workers, _ = run_worker_pool(
        ["sh", "-c", "echo $OMP_NUM_THREADS"], count, tmp_path / "logs", gpus=[], poll_interval=0.1
    )
    assert [w.log_path.read_text().split() for w in workers] == [["1"]] * count


def test_the_user_s_omp_num_threads_wins_over_the_pool_s_share(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    workers, _ = run_worker_pool(
        ["sh", "-c", "echo $OMP_NUM_THREADS"], 2, tmp_path / "a", gpus=[], poll_interval=0.1
    )
    assert [w.log_path.read_text().split() for w in workers] == [["3"], ["3"]]
    monkeypatch.delenv("OMP_NUM_THREADS")
    workers, _ = run_worker_pool(  # given through the pool's env: the same
        ["sh", "-c", "echo $OMP_NUM_THREADS"],
        2,
        tmp_path / "b",
        gpus=[],
        env={"OMP_NUM_THREADS": "5"},
        poll_interval=0.1,
    )
    assert [w.log_path.read_text().split() for w in workers] == [["5"], ["5"]]


def test_cpu_trials_on_a_gpu_machine_share_threads_and_get_no_gpu_set(tmp_path, monkeypatch):
    """``devices_per_worker=0`` (CPU trials): the GPUs are not handed out (each worker keeps
    the parent's CUDA_VISIBLE_DEVICES) and the workers share the cores; with GPU trials each
    worker gets its GPU and the thread count is left alone."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    script = "echo ${OMP_NUM_THREADS:-unset} $CUDA_VISIBLE_DEVICES"
    share = str(max(1, (os.cpu_count() or 1) // 2))
    cpu, _ = run_worker_pool(
        ["sh", "-c", script],
        2,
        tmp_path / "cpu",
        gpus=["0", "1"],
        devices_per_worker=0,
        poll_interval=0.1,
    )
    assert [w.log_path.read_text().split() for w in cpu] == [[share, "0,1"]] * 2
    gpu, _ = run_worker_pool(
        ["sh", "-c", script], 2, tmp_path / "gpu", gpus=["0", "1"], poll_interval=0.1
    )
    assert [w.log_path.read_text().split() for w in gpu] == [["unset", "0"], ["unset", "1"]]
