"""Fixtures shared by the test folders: a user's project folder outside the package, the
``autonorm`` command run there in a subprocess, and a YAML alias bomb; and loud skips in CI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _hypothesis_profile() -> None:
    """The property tests (hypothesis): the same examples on every run (CI must not draw a new
    failure at random), no example database, no deadline on 2 shared cores. `.ci/run`'s timm
    environment runs only the zoo tests and has no hypothesis."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    settings.register_profile(
        "autonorm",
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    settings.load_profile("autonorm")


_hypothesis_profile()

#: The skips CI expects: timm and torchvision do not install on torch's CPU build, so their cases
#: skip in the main environment and run in `.ci/run`'s second one.
EXPECTED_IN_CI = ("timm", "torchvision")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under ``CI=true`` (`.ci/run`) every component the tests need is installed (PostgreSQL,
    a tmpfs, optional packages): a skip there means a test did not run, so it fails instead,
    saying why it skipped; only :data:`EXPECTED_IN_CI` may skip."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
    if not any(name in reason for name in EXPECTED_IN_CI):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where it must run: {reason}"


class AutonormCommand:
    """The venv's ``autonorm`` command, run in a subprocess.

    ``checkout=True`` runs the checkout under test (put on ``PYTHONPATH``, whatever install the
    venv has) with one OpenMP thread; ``checkout=False`` runs the command as installed, as a user
    would (no ``PYTHONPATH``)."""

    path = str(Path(sys.executable).with_name("autonorm"))

    def __init__(self, *, checkout: bool, timeout: float) -> None:
        self.checkout, self.timeout = checkout, timeout

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        if self.checkout:
            env.update({"OMP_NUM_THREADS": "1", **extra})
            env["PYTHONPATH"] = str(REPO)  # the checkout under test
        else:
            env.update(extra)
            env.pop("PYTHONPATH", None)
        return env

    def __call__(
        self, args: list[str], cwd: Path, timeout: float | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.path, *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=self.timeout if timeout is None else timeout,
            env=self.env(**env),
        )


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A folder outside the package holding the user's module (``usermodels.py``), as a user's
    project would."""
    folder = tmp_path_factory.mktemp("project")
    user_module = REPO / "tests" / "user_project" / "usermodels.py"
    (folder / "usermodels.py").write_text(user_module.read_text())
    return folder


@pytest.fixture(scope="session")
def autonorm_cli() -> AutonormCommand:
    """The command on the checkout under test: ``autonorm_cli(args, cwd)`` runs it (120 s at
    most); ``autonorm_cli.path`` and ``autonorm_cli.env()`` start it any other way."""
    return AutonormCommand(checkout=True, timeout=120)


@pytest.fixture(scope="session")
def installed_cli() -> AutonormCommand:
    """The command as installed, as a user runs it: ``installed_cli(args, cwd)`` (300 s at
    most); ``installed_cli.path`` starts it any other way."""
    return AutonormCommand(checkout=False, timeout=300)


@pytest.fixture(scope="session")
def alias_bomb() -> str:
    """A ~430-byte YAML config whose aliases expand to 9**8 strings (PyYAML took 32 s and 1.3 GB
    on it in NormConfig.load)."""
    levels = 8
    lines = ["a: &a [" + ",".join(['"layernorm"'] * 9) + "]"]
    for prev, cur in zip("abcdefgh"[: levels - 1], "bcdefghi"[: levels - 1], strict=True):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "schema_version: 1\nmetadata:\n  " + "\n  ".join(lines) + "\nslots:\n  bn1: layernorm\n"


@pytest.fixture(autouse=True)
def _signal_handlers_as_they_were():
    """Each test starts with the process's SIGINT/SIGTERM handlers as the session began: a
    Lightning fit that saw a KeyboardInterrupt leaves SIGINT ignored, which would change what a
    later test's Ctrl-C does. A test that leaves them changed is named in a warning."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in before.items():
        if signal.getsignal(signum) is not handler:
            warnings.warn(
                f"the test left the {signal.Signals(signum).name} handler changed "
                f"({signal.getsignal(signum)!r}): restored",
                stacklevel=1,
            )
            signal.signal(signum, handler)
