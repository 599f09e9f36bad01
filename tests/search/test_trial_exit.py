"""``sys.exit`` in a trial's code fails that trial with its reason: it is no interrupt and is
not retried; Lightning's own Ctrl-C is an interrupt."""

from __future__ import annotations

import signal
import sys

import optuna
import pytest

from autonorm.search import _workers as workers
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer


class ExitingNet(TinyConvNet):
    def training_step(self, batch, batch_idx):
        if self.hparams.fail_with == "exit":
            sys.exit(1)
        if self.hparams.fail_with == "ctrl-c":
            raise KeyboardInterrupt
        return super().training_step(batch, batch_idx)


def test_sys_exit_in_user_code_is_no_interrupt_but_lightnings_ctrl_c_is(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    caught = {}
    for kind in ("exit", "ctrl-c"):
        trainer = tiny_trainer(tmp_path, [], max_epochs=1)
        try:
            with pytest.raises(SystemExit) as err:
                trainer.fit(ExitingNet(fail_with=kind), datamodule=TinyDataModule())
        finally:
            signal.signal(signal.SIGINT, previous)  # Lightning ignores SIGINT after a Ctrl-C
        caught[kind] = workers.as_interrupt(err.value)
    assert caught["exit"] is None
    assert caught["ctrl-c"] is not None and caught["ctrl-c"].signum == signal.SIGINT


EXIT_MODULE = """
import sys
from usermodels import Data, Net


class ExitNet(Net):
    def training_step(self, batch, batch_idx):
        sys.exit(1)
"""


def test_a_trial_calling_sys_exit_fails_with_its_reason_and_is_not_retried(
    workdir, tmp_path, autonorm_cli
):
    (workdir / "exitmodels.py").write_text(EXIT_MODULE)
    out = tmp_path / "out"
    args = [
        "search", "--model", "exitmodels.ExitNet", "--data", "exitmodels.Data",
        "--trainer.max_epochs", "1", "--search.space", "minimal", "--search.n_trials", "2",
        "--search.warm_start", "false", "--search.out_dir", str(out),
    ]  # fmt: skip
    result = autonorm_cli(args, workdir)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "sys.exit(1)" in result.stderr and "interrupted" not in result.stderr
    study = optuna.load_study(
        study_name="autonorm-ExitNet", storage=f"sqlite:///{out / 'study.db'}"
    )
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "called sys.exit(1)" in trial.user_attrs["fail_reason"]
    assert "retry_of" not in trial.user_attrs
