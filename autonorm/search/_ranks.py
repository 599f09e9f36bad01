"""Several devices per trial: one trial trained by several ranks under a Lightning distributed
strategy (DDP, FSDP).

autonorm starts the ranks itself, once per search process, and keeps them for every training
of the search: rank 0 is the search's own process and owns the Optuna trial; ranks 1..D-1 are
follower processes that train whatever rank 0 hands them (a :class:`RankJob`: the callback of
the training, its seed, the checkpoint it continues) and never touch the study's storage.
Lightning sees processes created outside it (``LOCAL_RANK`` and the main address in the
environment) and joins them in one process group; inside a training the callbacks broadcast
rank 0's config and decisions (:mod:`autonorm.callbacks`).

How the followers start follows the strategy's start method: ``popen`` (``ddp``, Lightning's
default) runs the entry point again (the ``autonorm`` command or the user's script, whose call
of :func:`autonorm.search` then follows rank 0); ``spawn``/``fork`` (``ddp_spawn``,
``ddp_fork``) start a process that runs the follower loop on a pickled copy of the search's
training setup. A rank that dies or stops answering fails the training with a
:class:`RankFailed`; the group is then started afresh for the next training.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import optuna
import torch

from autonorm._errors import AutoNormError
from autonorm._lightning import quiet_lightning, submodule
from autonorm.callbacks import AutoNorm, infeasible_reason

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``"<rank>/<world>/<fd>"`` in a follower's environment: its rank, the group's size, and the
#: file descriptor of its connection to rank 0 (inherited).
RANK_ENV = "AUTONORM_RANK"
#: What Lightning reads to join processes created outside it (its ``LightningEnvironment``).
_LIGHTNING_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK")
#: Seconds a follower may take to start (import torch and the user's code) and say hello.
START_TIMEOUT_S = 300.0
#: Seconds rank 0 waits for the other ranks' word after its own training failed (a dead rank's
#: exit, a rank's error) before it stops them.
_AFTERMATH_S = 5.0


class RankFailed(AutoNormError):
    """A rank other than 0 failed the training: its code raised (the search stops, as on
    rank 0, unless it ran out of memory: the trial is then infeasible).

    Attributes:
        rank: the rank.
        infeasible: why the training is over the budget (out of memory on that rank), or None.
    """

    def __init__(self, rank: int, reason: str, *, infeasible: str | None = None) -> None:
        super().__init__(f"rank {rank} of the training {reason}")
        self.rank = rank
        self.infeasible = infeasible


class RankLost(RankFailed):
    """A rank other than 0 died or stopped answering: the trial fails and runs again once, and
    the search goes on (as for a lost worker)."""


@dataclass(frozen=True)
class RankLayout:
    """How each training of a search runs on several ranks.

    Attributes:
        world: number of ranks (processes) of a training.
        start_method: how the followers start: ``popen`` (run the entry point again) or a
            ``multiprocessing`` start method.
        strategy_class: the Lightning strategy class every rank builds, afresh for each training.
        strategy_params: its arguments (the registry's for a strategy given by name).
        timeout: seconds a collective (or a rank's answer) may take before the training fails.
        cpu_threads: torch threads of each rank on CPU (the process's threads shared), or None.
    """

    world: int
    start_method: str
    strategy_class: type
    strategy_params: Mapping[str, Any]
    timeout: float
    cpu_threads: int | None = None

    def strategy(self) -> Any:
        """A fresh strategy for one training of one rank: it starts no processes (autonorm
        did), and its collectives time out after :attr:`timeout`."""
        params = dict(self.strategy_params)
        params["timeout"] = timedelta(seconds=self.timeout)
        if "start_method" in inspect.signature(self.strategy_class).parameters:
            params["start_method"] = "popen"  # the ranks exist: Lightning must not spawn
        return self.strategy_class(**params)


def _resolved(namespace: Any, trainer_kwargs: Mapping[str, Any]) -> Any:
    """A Trainer that never trains: how Lightning resolves the accelerator, devices, nodes and
    strategy of ``trainer_kwargs``."""
    given = ("accelerator", "devices", "num_nodes", "strategy")
    with quiet_lightning(True):
        return namespace.Trainer(
            **{k: trainer_kwargs[k] for k in given if k in trainer_kwargs},
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )


def gpus_per_training(namespace: Any, trainer_kwargs: Mapping[str, Any]) -> int:
    """The GPUs one training takes with ``trainer_kwargs`` (0: it trains on the CPU): what a
    worker of a pool needs to itself."""
    trainer = _resolved(namespace, trainer_kwargs)
    return 0 if trainer.strategy.root_device.type == "cpu" else int(trainer.num_devices)


def rank_layout(
    namespace: Any, trainer_kwargs: Mapping[str, Any], timeout: float
) -> RankLayout | None:
    """The layout of a search's trainings with ``trainer_kwargs`` (None: one process), as
    Lightning resolves the accelerator, devices and strategy.

    Raises:
        AutoNormError: several nodes, a strategy that is no DDP or FSDP, a strategy instance
            (each training needs a fresh one: give its name), or a process already started by
            a distributed launcher.
    """
    strategy = trainer_kwargs.get("strategy", "auto")
    trainer = _resolved(namespace, trainer_kwargs)
    if trainer.num_nodes > 1:
        raise AutoNormError(
            f"num_nodes={trainer.num_nodes}: a trial runs on the devices of one machine; for "
            "several machines run one search worker on each, sharing a PostgreSQL storage"
        )
    if trainer.world_size <= 1:
        return None
    if "LOCAL_RANK" in os.environ and RANK_ENV not in os.environ:
        raise AutoNormError(
            "this process was started by a distributed launcher (LOCAL_RANK is set): autonorm "
            "starts the ranks of a trial itself; run the search as one process with "
            "--trainer.devices N"
        )
    strategies = submodule(namespace, "strategies")
    chosen = trainer.strategy
    if not isinstance(chosen, (strategies.DDPStrategy, strategies.FSDPStrategy)):
        raise AutoNormError(
            f"strategy {type(chosen).__name__} cannot train a trial on {trainer.world_size} "
            "devices here: autonorm starts the ranks itself and runs DDP (ddp, ddp_spawn, "
            "ddp_fork, ddp_find_unused_parameters_true) or FSDP (fsdp)"
        )
    if not isinstance(strategy, str):
        raise AutoNormError(
            f"give the strategy by name (strategy='ddp', ...), not a {type(strategy).__name__} "
            "instance: every rank of every training builds a fresh one"
        )
    params: dict[str, Any] = {}
    if strategy != "auto":
        params = dict(strategies.StrategyRegistry[strategy]["init_params"])
    params.pop("start_method", None)
    cpu = trainer.strategy.root_device.type == "cpu"
    return RankLayout(
        world=trainer.world_size,
        start_method=getattr(chosen, "_start_method", "popen"),
        strategy_class=type(chosen),
        strategy_params=params,
        timeout=timeout,
        cpu_threads=max(1, torch.get_num_threads() // trainer.world_size) if cpu else None,
    )


@dataclass(frozen=True)
class RankJob:
    """One training, as every rank runs it: the callback (for the followers, one without the
    trial: :meth:`~autonorm.callbacks.AutoNorm.for_ranks`), the folder of the Trainer, the seed,
    the checkpoint it continues and where its checkpoint is saved after the fit."""

    callback: AutoNorm
    root: Path
    seed: int | None
    ckpt_path: Path | None = None
    save_to: Path | None = None


def _lightning_variables(rank: int, world: int, port: int) -> dict[str, str]:
    """What Lightning reads to join ranks it did not start (one node, on this host)."""
    values = ("127.0.0.1", str(port), str(world), "0", str(rank))
    return dict(zip(_LIGHTNING_ENV, values, strict=True))


@contextlib.contextmanager
def rank_environment(rank: int, world: int, port: int) -> Iterator[None]:
    """:func:`_lightning_variables` in the environment for the time of one training (the
    process's own values come back after it)."""
    saved = {name: os.environ.get(name) for name in _LIGHTNING_ENV}
    os.environ.update(_lightning_variables(rank, world, port))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Each rank's share of the CPU threads while it trains."""
    if count is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry_command() -> list[str]:
    """The command line that started this process (what ``popen`` followers run again)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    argv0 = sys.argv[0] if sys.argv else ""
    module = spec.name.removesuffix(".__main__") if spec is not None and spec.name else None
    entry = module or Path(argv0).name
    runners = ("pytest", "py.test", "ipykernel_launcher", "ipykernel_launcher.py")
    if entry in runners or (module is None and (argv0 in ("", "-c") or not Path(argv0).exists())):
        raise AutoNormError(
            "the 'ddp' strategy runs the program again for each rank, and this one cannot be "
            f"({entry or 'an interactive session'}): use strategy='ddp_spawn'"
        )
    if module is not None:
        return [sys.executable, "-m", module, *sys.argv[1:]]
    return [sys.executable, os.path.abspath(argv0), *sys.argv[1:]]


def _describe(err: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


#: What torch's process groups say when a peer is gone or silent (older errors are plain
#: RuntimeErrors).
_GROUP_FAILURES = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout")


def _from_the_process_group(err: BaseException) -> bool:
    """Whether ``err`` (or an error it came from) is the process group's: a collective that
    failed or timed out, not the training's own code."""
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, torch.distributed.DistError):
            return True
        text = str(seen).lower()
        if isinstance(seen, RuntimeError) and any(m in text for m in _GROUP_FAILURES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"died (killed by {signal.Signals(-code).name})"
    return f"exited with code {code}"


@dataclass
class _Follower:
    rank: int
    conn: Connection
    process: Any  # subprocess.Popen or multiprocessing.Process

    def exit_code(self) -> int | None:
        if isinstance(self.process, subprocess.Popen):
            return self.process.poll()
        return self.process.exitcode

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
        with contextlib.suppress(Exception):
            if isinstance(self.process, subprocess.Popen):
                self.process.wait(timeout=10)
            else:
                self.process.join(timeout=10)
        self.conn.close()


@dataclass
class RankGroup:
    """Rank 0's side: starts the followers at the first training, hands each training to
    them, maps a rank's death or error to :class:`RankFailed`, and stops them at :meth:`close`.

    Args:
        layout: the trainings' layout.
        spawn_payload: what a ``spawn``/``fork`` follower trains with (pickled for it), and the
            function it serves jobs with.
    """

    layout: RankLayout
    spawn_payload: tuple[Callable[[Any, RankJob], Any], Any] | None = None
    followers: list[_Follower] = field(default_factory=list)
    port: int = 0

    def run(self, job: RankJob, train_here: Callable[[], T]) -> T:
        """Train ``job`` on every rank (this process is rank 0, ``train_here`` its part);
        return what ``train_here`` returns.

        Raises:
            RankFailed: another rank died, stopped answering or raised.
            optuna.TrialPruned: the trial was pruned (every rank stopped together).
        """
        self._start()
        shared = RankJob(job.callback.for_ranks(), job.root, job.seed, job.ckpt_path, job.save_to)
        message = pickle.dumps(("job", shared))
        for follower in self.followers:
            follower.conn.send_bytes(message)
        layout = self.layout
        try:
            with rank_environment(0, layout.world, self.port), _threads(layout.cpu_threads):
                result = train_here()
        except optuna.TrialPruned:
            self._collect(expected="pruned")
            raise
        except BaseException as err:
            failure = self._aftermath(err)
            self.reset()
            if failure is not None:
                raise failure from err
            raise
        self._collect(expected="done")
        return result

    def _start(self) -> None:
        if self.followers and all(f.exit_code() is None for f in self.followers):
            return
        self.reset()
        self.port = _free_port()
        hello = {"threads": self.layout.cpu_threads}
        for rank in range(1, self.layout.world):
            mine, theirs = socket.socketpair()
            process = self._launch(rank, theirs)
            theirs.close()
            follower = _Follower(rank, Connection(mine.detach()), process)
            self.followers.append(follower)
            follower.conn.send(("hello", hello))
        log.info("started %d more rank(s) for the trials (%s)", self.layout.world - 1, self.layout)
        for follower in self.followers:  # each says it is up before the first training
            try:
                self._receive(follower, START_TIMEOUT_S, expected="ready")
            except RankFailed as err:  # would fail every trial alike: the search stops
                self.reset()
                reason = str(err).removeprefix(f"rank {follower.rank} of the training ")
                raise RankFailed(
                    follower.rank, f"did not start: it {reason} (its output is above)"
                ) from None

    def _launch(self, rank: int, end: socket.socket) -> Any:
        environment = _lightning_variables(rank, self.layout.world, self.port)
        if self.layout.start_method == "popen":
            environment[RANK_ENV] = f"{rank}/{self.layout.world}/{end.fileno()}"
            return subprocess.Popen(
                _entry_command(),
                env={**os.environ, **environment},
                pass_fds=(end.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        if self.spawn_payload is None:
            raise AutoNormError(f"start method {self.layout.start_method!r} needs a payload")
        context: Any = multiprocessing.get_context(self.layout.start_method)
        conn = Connection(os.dup(end.fileno()))
        process = context.Process(
            target=_serve_spawned,
            args=(self.spawn_payload, environment, conn),
            daemon=True,
        )
        try:
            process.start()
        except (pickle.PicklingError, TypeError, AttributeError) as err:
            raise AutoNormError(
                f"strategy start method {self.layout.start_method!r} sends the model and data "
                f"factories to each rank, and they cannot be pickled ({err}); use strategy='ddp' "
                "(it runs the entry point again) or module-level classes"
            ) from None
        finally:
            conn.close()
        return process

    @staticmethod
    def _poll(follower: _Follower, timeout: float) -> tuple[str, Any]:
        """The follower's next message ``(kind, payload)``; ``("gone", exit code)`` when it
        exited (or closed its end), ``("silent", None)`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if follower.conn.poll(0.2):
                    kind, payload = follower.conn.recv()
                    return str(kind), payload
            except (EOFError, OSError):
                break
            if follower.exit_code() is not None:
                break
            if time.monotonic() > deadline:
                return "silent", None
        exit_deadline = time.monotonic() + 2.0  # closed its end: its exit code follows
        while follower.exit_code() is None and time.monotonic() < exit_deadline:
            time.sleep(0.05)
        return "gone", follower.exit_code()

    def _receive(self, follower: _Follower, timeout: float, *, expected: str) -> Any:
        """The follower's next message, which must be ``expected``.

        Raises:
            RankFailed: it died, stayed silent for ``timeout`` seconds, raised, or is out of
                step.
        """
        kind, payload = self._poll(follower, timeout)
        if kind == expected:
            return payload
        raise self._failure(follower, kind, payload, timeout)

    @staticmethod
    def _failure(follower: _Follower, kind: str, payload: Any, timeout: float) -> RankFailed:
        if kind == "error":
            text, infeasible = payload
            return RankFailed(follower.rank, f"failed: {text}", infeasible=infeasible)
        if kind == "gone":
            reason = "closed its connection" if payload is None else _exit_description(payload)
            return RankLost(follower.rank, reason)
        if kind == "silent":
            return RankLost(follower.rank, f"did not answer within {timeout:g} s")
        return RankLost(follower.rank, f"was out of step (it said {kind!r})")

    def _collect(self, *, expected: str) -> None:
        """Every follower's word on the training rank 0 finished; a failure stops them all."""
        try:
            for follower in self.followers:
                self._receive(follower, self.layout.timeout, expected=expected)
        except RankFailed:
            self.reset()
            raise

    def _aftermath(self, err: BaseException) -> RankFailed | None:
        """After rank 0's own training failed with ``err``: the failure of another rank that
        caused it (a dead rank breaks rank 0's collectives; an out-of-memory error on one rank
        only), or None when ``err`` tells the story (the same error on every rank; a rank still
        waiting in a collective)."""
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            return None
        mine = _describe(err)
        for follower in self.followers:
            kind, payload = self._poll(follower, _AFTERMATH_S)
            if kind == "gone" or (kind == "error" and payload[0] != mine):
                return self._failure(follower, kind, payload, _AFTERMATH_S)
            if kind == "silent" and _from_the_process_group(err):  # it hangs: rank 0 timed out
                return RankLost(follower.rank, f"stopped answering (rank 0: {mine})")
        return None

    def reset(self) -> None:
        """Stop the followers and leave the process group (the next training starts afresh)."""
        for follower in self.followers:
            follower.kill()
        self.followers = []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()

    def close(self) -> None:
        """The search is over: the followers are told to stop, then stopped."""
        for follower in self.followers:
            with contextlib.suppress(Exception):
                follower.conn.send(("stop", None))
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(f.exit_code() is None for f in self.followers):
            time.sleep(0.05)
        self.reset()


def is_follower() -> bool:
    """Whether this process is a rank autonorm started (by running the entry point again)."""
    return bool(os.environ.get(RANK_ENV))


def follow(train: Callable[[RankJob], Any]) -> NoReturn:
    """The whole life of a rank started by running the entry point again: serve rank 0's
    trainings with ``train``, then exit (code after :func:`autonorm.search` runs on rank 0
    only)."""
    _, _, fd = os.environ[RANK_ENV].split("/")
    serve(Connection(int(fd)), train)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no teardown: Lightning's exit handler would wait on a process group


def serve(conn: Connection, train: Callable[[RankJob], Any]) -> None:
    """A follower's loop: train each job rank 0 hands over with ``train``, say how it ended,
    until rank 0 says stop or goes away. After an error of its own the follower exits (rank 0's
    collectives then fail at once instead of waiting for the timeout)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's: it stops the ranks
    kind, hello = conn.recv()
    if hello.get("threads"):
        torch.set_num_threads(int(hello["threads"]))
    conn.send(("ready", None))
    while True:
        try:
            kind, job = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # rank 0 is gone
        if kind != "job":
            return
        try:
            train(job)
        except optuna.TrialPruned:
            conn.send(("pruned", None))
            continue
        except BaseException as err:
            with contextlib.suppress(Exception):
                conn.send(("error", (_describe(err), infeasible_reason(err))))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        conn.send(("done", None))


def _serve_spawned(
    payload: tuple[Callable[[Any, RankJob], Any], Any],
    environment: dict[str, str],
    conn: Connection,
) -> None:
    """A ``spawn``/``fork`` follower's entry point."""
    os.environ.update(environment)
    run, training = payload
    serve(conn, lambda job: run(training, job))
