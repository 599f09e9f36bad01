"""The installed ``autonorm`` command, driven in subprocesses with user code outside the package."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

import autonorm
from tests.ports import free_port

AUTONORM = str(Path(sys.executable).with_name("autonorm"))

USER_MODULE = (Path(__file__).parent / "user_project" / "usermodels.py").read_text()

SEARCH_ARGS = [
    "--model", "usermodels.Net",
    "--data", "usermodels.Data",
    "--trainer.max_epochs", "1",
    "--search.n_trials", "2",
    "--search.space", "minimal",
    "--search.seed", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder outside the package holding the user's module, as a user's project would."""
    folder = tmp_path_factory.mktemp("project")
    (folder / "usermodels.py").write_text(USER_MODULE)
    return folder


def run(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [AUTONORM, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def bundle(workdir):
    """One real search through the command, shared by the tests that read its bundle."""
    result = run(["search", *SEARCH_ARGS, "--search.out_dir", "out"], workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir / "out", result


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_help(workdir):
    result = run(["--help"], workdir)
    assert result.returncode == 0
    for command in ("search", "report", "show", "dashboard"):
        assert command in result.stdout
    search_help = run(["search", "--help"], workdir)
    assert search_help.returncode == 0 and "--search.n_trials" in search_help.stdout


def test_search_on_user_classes_writes_the_bundle(bundle):
    out, result = bundle
    assert {"best_config.yaml", "report.html", "summary.json", "study.db"} <= {
        p.name for p in out.iterdir()
    }
    assert "bundle:" in result.stdout and "best config" in result.stdout
    config = autonorm.NormConfig.load(out / "best_config.yaml")
    assert set(config.choices) == {"bn", "norm"}
    study = optuna.load_study(study_name="autonorm-Net", storage=f"sqlite:///{out / 'study.db'}")
    assert len([t for t in study.trials if t.state.is_finished()]) == 2


def test_search_from_a_yaml_config(workdir):
    (workdir / "search.yaml").write_text(
        textwrap.dedent(
            """
            model:
              class_path: usermodels.Net
              init_args: {width: 4}
            data:
              class_path: usermodels.Data
            trainer:
              max_epochs: 1
            search:
              n_trials: 1
              space: minimal
              out_dir: yaml-out
              budget:
                batch_size: 8
            """
        )
    )
    printed = run(["search", "--config", "search.yaml", "--print_config"], workdir)
    assert printed.returncode == 0 and "usermodels.Net" in printed.stdout
    result = run(["search", "--config", "search.yaml"], workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((workdir / "yaml-out" / "summary.json").read_text())
    assert summary["budget"]["batch_size"] == 8


def test_report_rebuilds_the_bundle(bundle, workdir):
    out, _ = bundle
    (out / "report.html").unlink()
    (out / "summary.json").unlink()
    result = run(["report", str(out)], workdir)
    assert result.returncode == 0, result.stderr
    assert (out / "report.html").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["trials"]["complete"] >= 1


def test_show_prints_the_slot_table(bundle, workdir):
    out, _ = bundle
    result = run(["show", str(out / "best_config.yaml")], workdir)
    assert result.returncode == 0
    assert "bn" in result.stdout and "norm" in result.stdout


def test_recommend_prints_choices_with_reasons_and_writes_the_config(workdir):
    result = run(["recommend", "usermodels.Net", "--batch-size", "2", "-o", "rec.yaml"], workdir)
    assert result.returncode == 0, result.stderr
    assert "why" in result.stdout and "GroupNorm" in result.stdout
    config = autonorm.NormConfig.load(workdir / "rec.yaml")
    assert config["bn"].name == "groupnorm" and config["norm"].name == "layernorm"
    assert set(config.metadata["reasons"]) == {"bn", "norm"}


def test_dashboard_serves_the_study(bundle, workdir):
    out, _ = bundle
    port = free_port()
    proc = subprocess.Popen(
        [AUTONORM, "dashboard", str(out), "--port", str(port)],
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["search", "--model", "nowhere.Net", "--data", "usermodels.Data"],
            "cannot import --model",
        ),
        (["search", "--config", "missing.yaml"], "does not exist"),
        (["search", "--config", "broken.yaml"], "config"),
        (["search", *SEARCH_ARGS, "--search.budget.max_memory", "lots"], "max_memory"),
        (["search", *SEARCH_ARGS, "--search.n_trials", "0"], "n_trials"),
        (["search", *SEARCH_ARGS, "--search.choices", "[batchnorm,fancynorm]"], "fancynorm"),
        (["search", *SEARCH_ARGS, "--search.monitor", "val_acc"], "never logged"),
        (
            ["search", *SEARCH_ARGS, "--search.storage", "postgresql://u:secret@127.0.0.1:9/db"],
            "cannot open storage",
        ),
        (["search", *SEARCH_ARGS, "--search.out_dir", "usermodels.py/out"], "cannot be written"),
        (["search", *SEARCH_ARGS, "--search.mode", "up"], "mode"),
        (["show", "missing.yaml"], "cannot read"),
        (["report", "nowhere"], "neither"),
        (["recommend", "nowhere.Net"], "cannot import"),
        (["recommend", "usermodels.Net", "--model-args", "[1, 2]"], "YAML mapping"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(workdir, args, message):
    (workdir / "broken.yaml").write_text("model: [unclosed\n")
    out = workdir / "bad-input-out"
    if "--search.out_dir" not in args and args[0] == "search" and "--config" not in args:
        args = [*args, "--search.out_dir", str(out)]
    result = run(args, workdir)
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-2000:])
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "secret" not in result.stderr + result.stdout


def test_failed_invocations_leave_an_existing_study_intact(bundle, workdir):
    out, _ = bundle
    before = {p.name: digest(p) for p in out.iterdir() if p.is_file()}
    changed_space = run(
        ["search", *SEARCH_ARGS, "--search.out_dir", "out", "--search.space", "cnn"], workdir
    )
    bad_budget = run(
        ["search", *SEARCH_ARGS, "--search.out_dir", "out", "--search.budget.max_memory", "-1"],
        workdir,
    )
    for result in (changed_space, bad_budget):
        assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "search space changed" in changed_space.stderr
    after = {p.name: digest(p) for p in out.iterdir() if p.is_file()}
    assert after == before
