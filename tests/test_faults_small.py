"""Issue 15's small faults, each as a user meets it: passwords never shown, diverged learn runs,
choice parameters, YAML that refuses aliases and duplicated keys, report folders, a config
applied to another model class, the dashboard's host, ``sys.exit`` in user code, weight-norm
checkpoints, and the recalibration of fused slots. Real processes for the CLI cases."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

import autonorm
from autonorm import AutoNormError
from autonorm._io import mask_password
from autonorm.callbacks import AutoNorm
from autonorm.search.export import STORAGE_FILE, write_storage_file
from autonorm.search.pool import _without_storage
from autonorm.search.storage import make_storage
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer

AUTONORM = str(Path(sys.executable).with_name("autonorm"))
REPO = Path(__file__).resolve().parents[1]
USER_MODULE = (REPO / "tests" / "user_project" / "usermodels.py").read_text()


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = str(REPO)  # the checkout under test, whatever install the venv has
    return env


def cli(args: list[str], cwd: Path, timeout: float = 120, **env: str):
    return subprocess.run(
        [AUTONORM, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(**env)
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "usermodels.py").write_text(USER_MODULE)
    return folder


# -- 5. passwords ------------------------------------------------------------------------------

SECRET = "s3cr3t-Pw"

URL_SHAPES = [
    f"postgresql://user:{SECRET}@db.example.com:5432/studies",
    f"postgresql://:{SECRET}@db.example.com/studies",
    f"postgresql+psycopg://user:{SECRET}@[::1]:5432/studies?sslmode=require",
    f"postgresql://user:p@ss{SECRET}@host/studies",  # a raw '@' in the password: masked whole
    f"postgresql://user@host/studies?password={SECRET}",
    f"postgresql://user@host/studies?sslmode=require&password={SECRET}&application_name=x",
    f"postgresql://user@host/studies?PassWord={SECRET}",
    f"mysql+pymysql://user@host/studies?passwd={SECRET}",
    f"host=db.example.com password={SECRET} dbname=studies",
    f"cannot open storage 'postgresql://u:{SECRET}@h/db': refused; also \"mysql://:{SECRET}@h/x\"",
]


@pytest.mark.parametrize("text", URL_SHAPES)
def test_mask_password_hides_every_url_shape(text):
    masked = mask_password(text)
    assert SECRET not in masked and "***" in masked
    assert mask_password(masked) == masked  # idempotent: masking a masked text changes nothing
    assert masked == text.replace(f"p@ss{SECRET}", "***").replace(SECRET, "***")


@pytest.mark.parametrize(
    "text",
    ["sqlite:////tmp/a b/study.db", "/data/journal.log", "postgresql://user@host:5432/db", "x=1"],
)
def test_mask_password_leaves_text_without_password(text):
    assert mask_password(text) == text


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://:{SECRET}@127.0.0.1:9/db",
        f"postgresql://u@127.0.0.1:9/db?password={SECRET}",
        f"postgresql://u@127.0.0.1:9/db?connect_timeout=2&Password={SECRET}",
    ],
)
def test_opening_a_bad_postgres_url_never_shows_the_password(url, tmp_path, workdir):
    with pytest.raises(AutoNormError, match="cannot open storage") as err:
        make_storage(url, tmp_path)
    assert SECRET not in str(err.value)
    write_storage_file(tmp_path, url, "study")
    written = (tmp_path / STORAGE_FILE).read_text()
    assert SECRET not in written and "***" in written
    args = ["search", "--model", "usermodels.Net", "--data", "usermodels.Data"]
    result = cli([*args, "--search.storage", url, "--search.out_dir", str(tmp_path / "o")], workdir)
    assert result.returncode != 0 and "cannot open storage" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_the_pool_strips_the_storage_from_the_worker_command():
    argv = ["search", "--search.storage", "u", "--a", "1", f"--search.storage=x:{SECRET}", "--b"]
    assert _without_storage(argv) == ["search", "--a", "1", "--b"]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Query string argument")
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_pool_workers_get_the_storage_off_their_command_line(workdir, tmp_path):
    # SQLite ignores the query's password (with a warning): a real storage whose URL has one
    storage = f"sqlite:///{tmp_path / 'study.db'}?password={SECRET}"
    out = tmp_path / "bundle"
    args = [
        "search", "--model", "usermodels.Net", "--model.sleep", "0.3",
        "--data", "usermodels.Data", "--trainer.max_epochs", "1", "--search.space", "minimal",
        "--search.n_trials", "2", "--search.n_workers", "2", "--search.out_dir", str(out),
        "--search.storage", storage, "--search.warm_start", "false",
    ]  # fmt: skip
    log = (tmp_path / "pool.log").open("wb")
    parent = subprocess.Popen(
        [AUTONORM, *args], cwd=workdir, env=_env(), stdout=log, stderr=subprocess.STDOUT
    )
    seen: dict[int, tuple[bytes, bytes]] = {}
    deadline = time.time() + 150
    while parent.poll() is None and time.time() < deadline and len(seen) < 2:
        for pid in _children(parent.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if b"autonorm.cli" in cmdline:
                seen[pid] = (cmdline, environ)
        time.sleep(0.2)
    assert parent.wait(timeout=240) == 0, (tmp_path / "pool.log").read_text()[-3000:]
    assert len(seen) == 2, (tmp_path / "pool.log").read_text()[-3000:]
    for cmdline, environ in seen.values():
        assert SECRET.encode() not in cmdline and b"--search.storage" not in cmdline
        assert f"AUTONORM_STORAGE={storage}".encode() in environ.split(b"\0")
    study = optuna.load_study(study_name="autonorm-Net", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert SECRET not in (out / STORAGE_FILE).read_text()
    for path in [tmp_path / "pool.log", *(out / "workers").iterdir()]:
        assert SECRET not in path.read_text(), path


# -- 9. NaN mixing weights -----------------------------------------------------------------------


def test_derive_config_refuses_nan_mixing_weights_and_names_the_slots():
    model = autonorm.to_switchable(TinyConvNet())
    with torch.no_grad():
        model.bn2.mean_weight[0] = float("nan")
        model.head_norm.var_weight.fill_(float("inf"))
    with pytest.raises(AutoNormError, match=r"not finite.*'bn2', 'head_norm'") as err:
        autonorm.derive_config(model)
    assert "'bn1'" not in str(err.value)


def test_a_diverged_learn_run_fails_with_the_slots_named(tmp_path):
    callback = AutoNorm(mode="learn", config_path=tmp_path / "learned.yaml")
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=1)
    with pytest.raises(AutoNormError, match=r"learn run diverged.*'bn1'"):
        trainer.fit(TinyConvNet(fail_with="nan"), datamodule=TinyDataModule())
    assert not (tmp_path / "learned.yaml").exists()


def test_warm_start_learn_on_a_diverging_model_fails_with_that_error(tmp_path):
    with pytest.raises(AutoNormError, match="learn run diverged"):
        autonorm.search(
            lambda: TinyConvNet(fail_with="nan"),
            TinyDataModule(),
            n_trials=1,
            space="minimal",
            trainer_kwargs={"max_epochs": 1},
            out_dir=tmp_path / "out",
            warm_start="learn",
            seed=0,
        )
