"""A final retraining (``retrain=True``) that fails while the bundle is written: the error reaches
the user unchanged, the bundle keeps its best config, summary and report, no checkpoint is left
that the study's answer does not vouch for, and the command exits 1 with one line. Real searches
on tiny Lightning models; the model itself fails when it is trained as the retraining."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

import autonorm
from autonorm import NormConfig
from autonorm.search import SearchSettings, retrain_best
from tests.lightning_models import TinyConvNet, TinyDataModule

MESSAGE = "the retraining broke on purpose"


class FailsWhenRetrained(TinyConvNet):
    """Trains as TinyConvNet in the trials; the final retraining (run under ``out/retrain``)
    raises."""

    def on_fit_start(self) -> None:
        if Path(self.trainer.default_root_dir).name == "retrain":
            raise RuntimeError(MESSAGE)


def _search(out: Path, **kwargs):
    return autonorm.search(
        FailsWhenRetrained, TinyDataModule(), n_trials=2, trainer_kwargs={"max_epochs": 1},
        out_dir=out, seed=0, space="minimal", warm_start=False, retrain=True, **kwargs,
    )  # fmt: skip


def test_a_failed_retraining_raises_its_error_and_keeps_the_rest_of_the_bundle(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match=MESSAGE):
        _search(out)
    study = optuna.load_study(
        study_name="autonorm-FailsWhenRetrained", storage=f"sqlite:///{out / 'study.db'}"
    )
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    config = NormConfig.load(out / "best_config.yaml")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_trial"] == config.metadata["trial"]
    assert summary["trials"]["complete"] == 2
    assert (out / "report.html").stat().st_size > 0
    assert not (out / "best.ckpt").exists()


def test_a_failed_retraining_leaves_no_checkpoint_of_another_config(tmp_path, caplog):
    """An earlier run left ``best.ckpt`` of a config that is not the study's best: it goes
    before the retraining, so that a failed retraining does not leave it as the answer's."""
    out = tmp_path / "bundle"
    out.mkdir()
    other = NormConfig(
        {"bn1": "groupnorm(groups=4)", "bn2": "groupnorm(groups=4)", "head_norm": "layernorm"}
    )
    settings = SearchSettings(trainer_kwargs={"max_epochs": 1}, seed=0)
    stale = retrain_best(other, TinyConvNet, TinyDataModule, settings, out)
    assert stale == out / "best.ckpt" and stale.is_file()
    with pytest.raises(RuntimeError, match=MESSAGE):
        _search(out)
    best = NormConfig.load(out / "best_config.yaml")
    assert best.choices != other.choices  # groups=4 is no choice of the minimal space
    assert not stale.exists()
    assert any(
        "removed" in r.getMessage() and "best.ckpt" in r.getMessage() for r in caplog.records
    )


RETRAIN_FAILS_MODULE = f'''
from pathlib import Path

from usermodels import Data, Net  # noqa: F401


class FailsWhenRetrained(Net):
    def on_fit_start(self):
        if Path(self.trainer.default_root_dir).name == "retrain":
            raise RuntimeError("{MESSAGE}")
'''


def test_the_command_exits_1_with_one_line_when_the_retraining_fails(
    workdir, tmp_path, autonorm_cli
):
    project = tmp_path / "project"
    project.mkdir()
    (project / "usermodels.py").write_text((workdir / "usermodels.py").read_text())
    (project / "retrainfail.py").write_text(RETRAIN_FAILS_MODULE)
    args = [
        "search", "--model", "retrainfail.FailsWhenRetrained", "--data", "usermodels.Data",
        "--trainer.max_epochs", "1", "--search.space", "minimal", "--search.n_trials", "2",
        "--search.warm_start", "false", "--search.retrain", "true", "--search.out_dir", "out",
    ]  # fmt: skip
    done = autonorm_cli(args, project)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"autonorm: failed: RuntimeError: {MESSAGE}" in done.stderr
    assert "Traceback" not in done.stderr  # only with --debug
    out = project / "out"
    assert {"best_config.yaml", "summary.json", "report.html"} <= {p.name for p in out.iterdir()}
    assert not (out / "best.ckpt").exists()
