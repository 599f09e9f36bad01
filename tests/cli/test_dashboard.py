"""``autonorm dashboard``: it serves the study, and warns when bound to a host others can reach
(the dashboard has no authentication)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from autonorm.cli._commands import is_loopback
from tests.ports import free_port


def test_dashboard_serves_the_study(bundle, workdir, installed_cli):
    out, _ = bundle
    port = free_port()
    proc = subprocess.Popen(
        [installed_cli.path, "dashboard", str(out), "--port", str(port)],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 60
        body = None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.5)
        assert body is not None, "the dashboard did not answer"
        assert [s["study_name"] for s in body["study_summaries"]] == ["autonorm-Net"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _dashboard_output(target: str, host: str, tmp_path: Path, autonorm_cli) -> str:
    port = free_port()
    log = tmp_path / f"dashboard-{host}.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [autonorm_cli.path, "dashboard", target, "--host", host, "--port", str(port)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=autonorm_cli.env(),
            cwd=tmp_path,
        )
    try:
        deadline = time.time() + 60
        while "optuna-dashboard on" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return log.read_text()


def test_dashboard_warns_on_a_host_others_can_reach(tmp_path, autonorm_cli):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(storage=storage, study_name="s")
    printed = _dashboard_output(storage, "0.0.0.0", tmp_path, autonorm_cli)
    assert "warning: the dashboard has no authentication" in printed, printed
    local = _dashboard_output(storage, "127.0.0.1", tmp_path, autonorm_cli)
    assert "no authentication" not in local


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("192.168.1.5", False),
     ("myhost.example", False)],
)  # fmt: skip
def test_only_loopback_hosts_count_as_local(host, loopback):
    assert is_loopback(host) is loopback
