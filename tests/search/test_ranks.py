"""Trials on several devices: two CPU ranks over gloo (as two GPUs over NCCL), started by
autonorm under Lightning's DDP strategies: the API with ``ddp_spawn`` and with ``ddp`` (a user
script run again for rank 1), the CLI with ``--trainer.strategy ddp``, a pruned trial, an
out-of-memory error on rank 1 only, a killed rank, the learn pass, SyncBatchNorm trained with the
statistics of both ranks; and the settings a trial on several devices checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import autonorm
from autonorm import Budget
from autonorm.search import SearchSettings, gpus_per_training, make_storage
from autonorm.search._pool import gpu_sets
from autonorm.search._ranks import rank_layout
from tests.conftest import REPO
from tests.search.ranks_models import FAULTS_ENV, RanksData, RanksNet, Record

pytestmark = pytest.mark.slow

#: No plain batchnorm: each rank would keep running statistics of its own half of the data, and
#: the whole validation set's loss would not be one model's.
CHOICES = ["syncbatchnorm", "groupnorm", "layernorm", "instancenorm"]
SPACE = {"preset": "cnn", "choices": {"*": CHOICES}}
TRAINER = {"accelerator": "cpu", "devices": 2, "max_epochs": 2}


@pytest.fixture
def faults(tmp_path, monkeypatch) -> Path:
    """The folder the ranks read their faults from and write their records to."""
    folder = tmp_path / "faults"
    folder.mkdir()
    monkeypatch.setenv(FAULTS_ENV, str(folder))
    return folder


def _search(strategy: str, out: Path, **options):
    options.setdefault("seed", 0)
    options.setdefault("collective_timeout", 60)
    return autonorm.search(
        RanksNet,
        RanksData,
        trainer_kwargs={**TRAINER, "strategy": strategy, "callbacks": [Record()]},
        space=SPACE,
        out_dir=out,
        **options,
    )


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


def _reported(study: optuna.Study) -> list[float]:
    """Every value on the trials' curves."""
    return [
        value
        for trial in sorted(study.get_trials(), key=lambda t: t.number)
        for _, value in sorted(trial.intermediate_values.items())
    ]


def test_ddp_spawn_trials_report_the_whole_validation_sets_metric(tmp_path, faults):
    result = _search("ddp_spawn", tmp_path / "out", n_trials=6, warm_start=True)
    study = result.study
    assert len(study.get_trials()) == 6
    assert "FAIL" not in _states(study) and "PRUNED" in _states(study)  # screened at the rung
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert all("screened" in t.user_attrs["prune_reason"] for t in pruned)
    assert result.best_config is not None
    for name in ("best_config.yaml", "report.html", "summary.json", "study.db"):
        assert (result.out_dir / name).is_file(), name
    # what rank 0 computed alone over all 32 validation samples, after every validation
    lines = (faults / "whole_val_loss.jsonl").read_text().splitlines()
    whole = [json.loads(line)["loss"] for line in lines]
    reported = _reported(study)  # a promoted trial's curve starts with its screen's values
    assert len(whole) >= 6
    assert all(min(abs(r - w) for w in whole) < 1e-5 for r in reported), (reported, whole)
    assert all(min(abs(r - w) for r in reported) < 1e-5 for w in whole), (reported, whole)
    assert study.user_attrs["autonorm"]["budget"]["devices"] == 2  # taken from the trainer


def test_syncbatchnorm_trains_on_both_ranks_statistics(tmp_path, faults):
    """A trial of syncbatchnorm: after the first step both ranks hold the same running
    statistics (DDP gave them rank 0's before the step; the step added the global batch's); the
    ranks' data differ, so local batch statistics would not agree."""
    result = _search(
        "ddp_spawn",
        tmp_path / "out",
        n_trials=1,
        warm_start=False,
        default_config=autonorm.NormConfig({"net.1": "syncbatchnorm", "net.4": "syncbatchnorm"}),
    )
    (trial,) = result.study.get_trials()
    assert trial.state == TrialState.COMPLETE
    assert set(trial.params.values()) == {"syncbatchnorm"}
    ranks = [torch.load(faults / f"SyncBatchNorm-rank{r}.pt") for r in (0, 1)]
    mean0, mean1 = (r["state"]["running_mean"] for r in ranks)
    assert not torch.allclose(mean0, torch.zeros_like(mean0))  # it trained
    torch.testing.assert_close(mean0, mean1)
    torch.testing.assert_close(ranks[0]["state"]["running_var"], ranks[1]["state"]["running_var"])


def test_a_killed_rank_fails_one_trial_that_runs_again(tmp_path, faults):
    (faults / "kill-rank1").write_text("")
    result = _search("ddp_spawn", tmp_path / "out", n_trials=3, warm_start=False)
    trials = result.study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1, _states(result.study)
    assert "rank 1" in failed[0].user_attrs["fail_reason"]
    assert "SIGKILL" in failed[0].user_attrs["fail_reason"]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == failed[0].params
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and result.best_config is not None


def test_a_rank_that_stops_answering_fails_its_trial_after_the_collective_timeout(tmp_path, faults):
    (faults / "stop-rank1").write_text("")
    started = time.monotonic()
    result = _search(
        "ddp_spawn", tmp_path / "out", n_trials=2, warm_start=False, collective_timeout=5
    )
    elapsed = time.monotonic() - started
    trials = result.study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1, _states(result.study)
    assert "rank 1 of the training stopped answering" in failed[0].user_attrs["fail_reason"]
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2
    # generous: the 5 s timeout, a fresh rank's start and three short trainings on 2 cores
    assert elapsed < 120, elapsed


def test_out_of_memory_on_rank_one_alone_makes_the_trial_infeasible(tmp_path, faults):
    (faults / "oom-rank1").write_text("")
    result = _search("ddp_spawn", tmp_path / "out", n_trials=2, warm_start=False)
    first, second = sorted(result.study.get_trials(), key=lambda t: t.number)
    assert first.state == TrialState.PRUNED
    assert first.user_attrs["feasible"] is False
    assert "out of memory" in first.user_attrs["infeasible_reason"]
    assert second.state == TrialState.COMPLETE  # the ranks started afresh
    assert result.best_config is not None


def test_a_memory_budget_stops_every_rank_together(tmp_path, faults):
    """Each rank measures its own peak; the trial stops on the highest, on both ranks at once
    (one rank stopping alone would leave the other waiting in a collective)."""
    result = _search(
        "ddp_spawn", tmp_path / "out", n_trials=2, warm_start=False, budget={"max_memory": 1}
    )
    trials = result.study.get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all("peak memory" in t.user_attrs["infeasible_reason"] for t in trials)
    assert result.best_config is None


def test_the_learn_pass_and_the_retraining_run_on_both_ranks(tmp_path, faults):
    """The learn pass trains SwitchableNorm on both ranks, its batch branch synced; the best
    config is retrained on both and its checkpoint saved."""
    result = _search(
        "ddp_spawn",
        tmp_path / "out",
        warm_start="learn",
        retrain=True,
        budget={"trainings": 4},
    )
    info = result.study.user_attrs["autonorm"]
    assert info["learned_config"] is not None
    assert (result.out_dir / "learned_config.yaml").is_file()
    assert (result.out_dir / "best.ckpt").is_file()
    # the learned SwitchableNorm's batch branch: statistics of both ranks' batches together
    learned = [torch.load(faults / f"SwitchableNorm-rank{r}.pt")["state"] for r in (0, 1)]
    assert not torch.allclose(learned[0]["running_mean"], torch.zeros(8))
    torch.testing.assert_close(learned[0]["running_mean"], learned[1]["running_mean"])
    torch.testing.assert_close(learned[0]["running_var"], learned[1]["running_var"])
    trials = result.study.get_trials()
    assert any(t.state == TrialState.COMPLETE for t in trials)
    failed = [t for t in trials if t.state == TrialState.FAIL]  # planned, never run: no budget
    assert all("compute budget ended" in t.user_attrs["fail_reason"] for t in failed)


_SCRIPT = """
import os
import sys
sys.path.insert(0, {repo!r})
import autonorm
from tests.search.ranks_models import RanksData, RanksNet

if __name__ == "__main__":
    {before}
    result = autonorm.search(
        RanksNet, RanksData,
        trainer_kwargs={{"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_epochs": 2}},
        space={space!r}, n_trials=3, warm_start=False, seed=0, out_dir={out!r},
        collective_timeout=60,
    )
    print("TRIALS", len(result.study.get_trials()), result.best_config is not None)
"""


def _run_script(tmp_path: Path, before: str = "pass") -> subprocess.CompletedProcess[str]:
    script = tmp_path / "user_search.py"
    out = str(tmp_path / "out")
    script.write_text(
        textwrap.dedent(_SCRIPT.format(repo=str(REPO), space=SPACE, out=out, before=before))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_ddp_runs_the_users_script_again_for_rank_one(tmp_path):
    out = tmp_path / "out"
    done = _run_script(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("TRIALS 3 True") == 1  # code after search() runs on rank 0 only
    study = optuna.load_study(study_name="autonorm-RanksNet", storage=f"sqlite:///{out}/study.db")
    assert len(study.get_trials()) == 3 and "FAIL" not in _states(study)
    assert (out / "best_config.yaml").is_file()


def test_a_rank_that_cannot_start_stops_the_search_with_its_reason(tmp_path):
    """Every trial would fail alike: the search stops at once (no trial retried forever)."""
    done = _run_script(tmp_path, before='if os.environ.get("LOCAL_RANK") == "1": sys.exit(5)')
    assert done.returncode != 0
    assert "rank 1 of the training did not start: it exited with code 5" in done.stderr
    study = optuna.load_study(
        study_name="autonorm-RanksNet", storage=f"sqlite:///{tmp_path}/out/study.db"
    )
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]


def test_cli_takes_trainer_strategy_ddp(tmp_path, autonorm_cli):
    out = tmp_path / "out"
    args = [
        "search",
        "--model",
        "tests.search.ranks_models.RanksNet",
        "--data",
        "tests.search.ranks_models.RanksData",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_epochs",
        "2",
        "--search.n_trials",
        "3",
        "--search.warm_start",
        "false",
        "--search.seed",
        "0",
        "--search.collective_timeout",
        "60",
        "--search.out_dir",
        str(out),
    ]
    done = autonorm_cli(args, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="autonorm-RanksNet", storage=f"sqlite:///{out}/study.db")
    assert len(study.get_trials()) == 3 and "FAIL" not in _states(study)
    assert (out / "best_config.yaml").is_file()
    assert "GLOBAL_RANK" not in done.stderr  # Lightning's per-rank banners stay quiet


def test_a_pool_of_workers_each_trains_its_trials_on_two_ranks(tmp_path, autonorm_cli):
    """``--search.n_workers 2`` x ``--trainer.devices 2`` on CPU: each worker starts its own
    rank 1 (running the worker's command again), and the parent retrains the best config on
    two ranks of its own."""
    out = tmp_path / "out"
    args = [
        "search",
        "--model=tests.search.ranks_models.RanksNet",
        "--data=tests.search.ranks_models.RanksData",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_epochs=1",
        "--search.n_trials=4",
        "--search.warm_start=false",
        "--search.seed=0",
        "--search.retrain=true",
        "--search.n_workers=2",
        f"--search.out_dir={out}",
    ]
    done = autonorm_cli(args, cwd=tmp_path, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    storage = make_storage(str(out / "journal.log"), out)
    study = optuna.load_study(study_name="autonorm-RanksNet", storage=storage)
    assert len(study.get_trials()) == 4 and "FAIL" not in _states(study)
    assert len({t.user_attrs["worker"]["pid"] for t in study.get_trials()}) == 2
    assert (out / "best.ckpt").is_file() and (out / "best_config.yaml").is_file()


def test_cli_says_which_trainer_arguments_it_does_not_take(tmp_path, autonorm_cli):
    done = autonorm_cli(
        ["search", "--model", "x.Y", "--data", "x.Z", "--trainer.profiler", "simple"],
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "--trainer.profiler is not taken" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# -- the settings of trials on several devices -------------------------------------------------


def test_budget_devices_come_from_the_trainer_or_must_agree():
    settings = SearchSettings(trainer_kwargs=TRAINER)
    assert settings.for_devices(2).budget.devices == 2
    given = SearchSettings(budget=Budget(batch_size=4), trainer_kwargs=TRAINER).for_devices(2)
    assert (given.budget.devices, given.budget.batch_size) == (2, 4)  # per device, as given
    with pytest.raises(ValueError, match=r"budget.devices=4 but each trial trains on 2 devices"):
        SearchSettings(budget=Budget(devices=4), trainer_kwargs=TRAINER).for_devices(2)
    # a budget of more devices than the trials use: the trials emulate the final training
    assert SearchSettings(budget=Budget(devices=4)).for_devices(1).budget.devices == 4


def test_rank_layout_follows_lightning_and_refuses_what_it_cannot_run():
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy

    assert rank_layout(pl, {"accelerator": "cpu", "devices": 1}, 60) is None
    layout = rank_layout(pl, {**TRAINER, "strategy": "ddp_find_unused_parameters_true"}, 60)
    assert layout is not None and (layout.world, layout.start_method) == (2, "popen")
    strategy = layout.strategy()
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs["find_unused_parameters"] is True
    assert rank_layout(pl, {**TRAINER, "strategy": "ddp_spawn"}, 60).start_method == "spawn"
    with pytest.raises(ValueError, match="give the strategy by name"):
        rank_layout(pl, {**TRAINER, "strategy": DDPStrategy()}, 60)
    with pytest.raises(ValueError, match="num_nodes=2"):
        rank_layout(pl, {**TRAINER, "num_nodes": 2, "strategy": "ddp"}, 60)


def test_a_pool_takes_each_trainings_gpus_as_lightning_resolves_them():
    import pytorch_lightning as pl

    assert gpus_per_training(pl, TRAINER) == 0  # CPU trials: the threads are shared instead
    assert gpus_per_training(pl, {"accelerator": "cpu", "devices": 1}) == 0


def test_each_worker_gets_its_own_gpu_set():
    gpus = [str(i) for i in range(8)]
    assert gpu_sets(gpus, 2, 4) == ["0,1,2,3", "4,5,6,7"]
    assert gpu_sets(gpus, 3, 1) == ["0", "1", "2"]
    assert gpu_sets(["0", "1"], 3, 1) == ["0", "1", "0"]  # one-GPU workers may share
    with pytest.raises(ValueError, match="3 workers x 4 devices per trial need 12 GPUs, 8 visible"):
        gpu_sets(gpus, 3, 4)
