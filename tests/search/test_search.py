"""autonorm.search: real Optuna studies on SQLite / journal files with tiny Lightning models."""

from __future__ import annotations

import json

import optuna
import pytest
import torch

import autonorm
from autonorm import Budget, NormChoice, NormConfig
from autonorm.search import SearchSettings, retrain_best
from autonorm.search_spaces import SearchSpace
from autonorm.surgery import CANDIDATE_CHOICES
from tests.lightning_models import TinyConvNet, TinyDataModule

FAST = {"max_epochs": 2}


def _search(tmp_path, name="run", **kwargs):
    defaults = dict(
        n_trials=4, trainer_kwargs=FAST, out_dir=tmp_path / name, seed=0, space="minimal"
    )
    defaults.update(kwargs)
    return autonorm.search(TinyConvNet, TinyDataModule(), **defaults)


def test_search_writes_a_complete_bundle(tmp_path):
    result = _search(tmp_path, sampler="random")
    out = result.out_dir
    assert {p.name for p in out.iterdir()} >= {
        "best_config.yaml",
        "study.db",
        "report.html",
        "summary.json",
        "artifacts",
    }

    study = optuna.load_study(
        study_name=result.study.study_name, storage=f"sqlite:///{out / 'study.db'}"
    )
    assert len(study.trials) == 4
    assert study.trials[0].user_attrs["baseline"] == "own norms"
    assert set(study.trials[0].params) == {"bn1", "bn2", "head_norm"}

    config = NormConfig.load(out / "best_config.yaml")
    assert config == result.best_config
    assert (
        config.metadata["metric"] == "val_loss"
        and config.metadata["trial"] == result.best_trial.number
    )
    model = autonorm.apply_config(TinyConvNet(), config)
    assert torch.isfinite(model(torch.randn(3, 2, 16))).all()

    runs: dict[str, list[float]] = {}
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            runs.setdefault(str(sorted(t.params.items())), []).append(t.value)
    means = [sum(v) / len(v) for v in runs.values()]
    assert len(means) < 4  # the leader was re-evaluated with another seed
    assert result.best_value == pytest.approx(min(means))  # the best config by its mean
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_value"] == pytest.approx(result.best_value)
    html = (out / "report.html").read_text()
    assert "plotly" in html.lower() and "bn1" in html


def test_second_call_resumes_the_study(tmp_path):
    first = _search(tmp_path, n_trials=3)
    numbers = [t.number for t in first.study.trials]
    params = [t.params for t in first.study.trials]
    second = _search(tmp_path, n_trials=5)
    assert second.study.study_name == first.study.study_name
    assert len(second.study.trials) == 5
    assert [t.params for t in second.study.trials[:3]] == params
    assert numbers == [0, 1, 2]
    # asking for no more than exists runs nothing
    third = _search(tmp_path, n_trials=5)
    assert len(third.study.trials) == 5


def test_tiny_memory_budget_leaves_no_best_config(tmp_path, caplog):
    result = _search(tmp_path, n_trials=2, budget=Budget(max_memory="2KiB"))
    assert result.best_config is None and result.best_value is None
    assert not (result.out_dir / "best_config.yaml").exists()
    assert all(t.user_attrs["feasible"] is False for t in result.study.trials)
    assert result.summary["trials"]["infeasible"] == 2
    assert "met the budget" in caplog.text


def test_batch_size_budget_sets_the_per_device_batch(tmp_path):
    seen = []

    class Recording(TinyConvNet):
        def training_step(self, batch, batch_idx):
            seen.append(len(batch[0]))
            return super().training_step(batch, batch_idx)

    autonorm.search(
        Recording,
        TinyDataModule(batch_size=16),
        n_trials=1,
        trainer_kwargs={"max_epochs": 1},
        out_dir=tmp_path / "bs",
        budget=Budget(batch_size=4),
        space="minimal",
    )
    assert set(seen) == {4}


def test_out_of_memory_is_contained(tmp_path):
    result = autonorm.search(
        TinyConvNet,
        TinyDataModule(),
        model_kwargs={"fail_with": "oom"},
        n_trials=2,
        trainer_kwargs=FAST,
        out_dir=tmp_path / "oom",
        space="minimal",
    )
    states = {t.state for t in result.study.trials}
    assert states == {optuna.trial.TrialState.PRUNED}
    assert all(t.user_attrs["feasible"] is False for t in result.study.trials)
    assert "out of memory" in result.study.trials[0].user_attrs["infeasible_reason"]
    assert result.best_config is None


def test_nan_loss_is_pruned_with_its_reason(tmp_path):
    result = autonorm.search(
        TinyConvNet,
        TinyDataModule(),
        model_kwargs={"fail_with": "nan"},
        n_trials=1,
        trainer_kwargs=FAST,
        out_dir=tmp_path / "nan",
        space="minimal",
    )
    trial = result.study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert "nan" in trial.user_attrs["prune_reason"]


def test_seed_makes_trial_parameters_identical(tmp_path):
    a = _search(tmp_path, "a", n_trials=5, warm_start=False, space="cnn")
    b = _search(tmp_path, "b", n_trials=5, warm_start=False, space="cnn")
    assert [t.params for t in a.study.trials] == [t.params for t in b.study.trials]
    assert [t.value for t in a.study.trials] == pytest.approx([t.value for t in b.study.trials])


def test_multi_objective_returns_a_pareto_front(tmp_path):
    result = _search(tmp_path, n_trials=3, objectives=["metric", "params"])
    assert result.pareto and all(len(values) == 2 for _, values in result.pareto)
    assert (result.out_dir / "pareto.yaml").exists()
    assert len(result.study.directions) == 2


def test_changed_space_against_an_existing_study_is_refused_and_the_study_kept(tmp_path):
    _search(tmp_path, n_trials=1)
    db = (tmp_path / "run" / "study.db").read_bytes()
    with pytest.raises(
        autonorm.AutoNormError, match=r"recorded with other settings: .*space\."
    ) as err:
        _search(tmp_path, n_trials=2, space=SearchSpace("cnn"), monitor="val_acc", mode="max")
    message = str(err.value)  # every difference in one line
    assert "\n" not in message and "monitor 'val_loss' -> 'val_acc'" in message
    assert (tmp_path / "run" / "study.db").read_bytes() == db


def test_journal_file_storage(tmp_path):
    result = _search(tmp_path, n_trials=2, storage=str(tmp_path / "journal.log"))
    assert (tmp_path / "journal.log").stat().st_size > 0
    assert (result.out_dir / "storage.txt").read_text().startswith(str(tmp_path / "journal.log"))
    assert len(result.study.trials) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_trials": 0}, "n_trials"),
        ({"mode": "up"}, "`mode`"),
        ({"objectives": ["latency"]}, "objectives"),
        ({"sampler": "grid"}, "`sampler`"),
        ({"space": "nonsense"}, "unknown search space"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _search(tmp_path, **kwargs)


def test_learned_warm_start_enqueues_the_derived_config_and_narrows_the_space(tmp_path):
    result = _search(tmp_path, n_trials=3, warm_start="learn", space="cnn")
    info = result.study.user_attrs["autonorm"]
    learned = NormConfig.from_dict(info["learned_config"])
    assert set(learned.choices) == {"bn1", "bn2", "head_norm"}
    assert set(learned.metadata["weights"]["bn1"]["mean"]) == {"instance", "layer", "batch"}
    assert learned.metadata["mixing"] == "softmax"
    assert learned.metadata["derived_by"] == "perturbation"  # on the search's val_loss
    assert (result.out_dir / "learned_config.yaml").exists()
    # screened right after the own norms, or the own norms themselves (one trial per config)
    learned_params = {slot: choice.label for slot, choice in learned.choices.items()}
    screened = [t.params for t in result.study.trials[:2]]
    assert learned_params in screened
    baselines = [t.user_attrs.get("baseline") for t in result.study.trials]
    assert baselines[0] == "own norms"
    assert baselines[1] == "learned" or learned_params == screened[0]
    full = SearchSpace("cnn").choices_for(autonorm.find_slots(TinyConvNet())[0])
    offered = result.study.trials[0].distributions["bn1"].choices
    assert set(offered) <= {c.label for c in full}
    # a resumed search reuses the narrowed space instead of learning (and changing it) again
    mtime = (result.out_dir / "learned_config.yaml").stat().st_mtime_ns
    again = _search(tmp_path, n_trials=4, warm_start="learn", space="cnn")
    assert len([t for t in again.study.trials if t.state.is_finished()]) == 4
    assert (result.out_dir / "learned_config.yaml").stat().st_mtime_ns == mtime


def test_sparse_learned_warm_start_ends_each_slot_on_one_normalizer(tmp_path):
    result = _search(tmp_path, n_trials=2, warm_start="learn-sparse", space="cnn")
    learned = NormConfig.from_dict(result.study.user_attrs["autonorm"]["learned_config"])
    assert learned.metadata["mixing"] == "sparsestmax"
    for slot, weights in learned.metadata["weights"].items():
        assert sorted(weights["mean"].values())[-1] == pytest.approx(1.0), slot
        assert sum(weights["mean"].values()) == pytest.approx(1.0), slot
    # one-hot weights narrow each slot to its learned family (and what SN does not weigh)
    offered = set(result.study.trials[0].distributions["bn1"].choices)
    full = {c.label for c in SearchSpace("cnn").choices_for(autonorm.find_slots(TinyConvNet())[0])}
    assert offered < full and {"batchnorm", "switchable"} <= offered  # the own norm stays
    labels = [t.user_attrs.get("baseline") for t in result.study.trials]
    assert labels[:2] == ["own norms", "learned"]


def test_warm_start_includes_the_recommended_config(tmp_path):
    result = _search(tmp_path, n_trials=2, budget=Budget(batch_size=4), space="cnn")
    labels = [t.user_attrs.get("baseline") for t in result.study.get_trials(deepcopy=False)]
    assert labels[0] == "own norms" and "recommend" in labels


def test_study_stop_from_a_callback_ends_the_search(tmp_path):
    def stop_after_two(study, trial):
        if len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) >= 2:
            study.stop()

    result = _search(
        tmp_path, n_trials=6, warm_start=False, pruner="none", callbacks=[stop_after_two]
    )
    finished = [t for t in result.study.trials if t.state.is_finished()]
    assert len(finished) == 2


def test_retrain_saves_a_checkpoint_of_the_best_config(tmp_path):
    result = _search(tmp_path, n_trials=2, retrain=True, pruner="hyperband")
    checkpoint = result.out_dir / "best.ckpt"
    model = autonorm.load_from_checkpoint(TinyConvNet, checkpoint)
    applied = {s.name: s.keep_choice() for s in autonorm.find_slots(model)}
    assert applied == result.best_config.choices
    assert isinstance(result.study.pruner, optuna.pruners.HyperbandPruner)


def test_retrain_best_trains_a_config_outside_a_search(tmp_path):
    """What a worker pool's parent calls for --search.retrain once its workers have ended."""
    config = NormConfig(
        {"bn1": {"name": "groupnorm", "groups": 2}, "bn2": "batchnorm", "head_norm": "rmsnorm"}
    )
    settings = SearchSettings(budget=Budget(batch_size=8), trainer_kwargs={"max_epochs": 1}, seed=0)
    path = retrain_best(config, TinyConvNet, TinyDataModule, settings, tmp_path)
    model = autonorm.load_from_checkpoint(TinyConvNet, path)
    assert {s.name: s.keep_choice() for s in autonorm.find_slots(model)} == config.choices


def test_the_search_package_imports_and_stays_callable():
    import inspect
    import subprocess
    import sys

    import autonorm.search as package

    assert callable(autonorm.search) and callable(package)
    assert "n_trials" in inspect.signature(autonorm.search).parameters
    # importing the package first (a fresh interpreter) leaves `autonorm.search(...)` callable
    code = (
        "import autonorm.search, autonorm, inspect; "
        "print(callable(autonorm.search), 'budget' in inspect.signature(autonorm.search).parameters)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_a_model_factory_names_the_study_after_the_model_class(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = autonorm.search(
        lambda: TinyConvNet(),
        TinyDataModule(),
        n_trials=1,
        trainer_kwargs={"max_epochs": 1},
        space="minimal",
        warm_start=False,
    )
    assert result.study.study_name == "autonorm-TinyConvNet"
    assert result.out_dir == tmp_path / "autonorm-runs" / "autonorm-TinyConvNet"


def test_the_default_search_is_staged_within_the_grid_compute(tmp_path):
    """No n_trials: the staged plan screens the baselines at a rung, promotes, re-evaluates,
    and spends no more than the grid of own norms and uniform families would."""
    result = _search(tmp_path, n_trials=None, trainer_kwargs={**FAST, "max_epochs": 3})
    trials = result.study.trials
    stages = [t.user_attrs.get("stage") for t in trials]
    screened = [t for t in trials if t.user_attrs.get("stage") == "screen"]
    assert screened and all(t.user_attrs["epochs"] == 1 for t in screened)
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in screened)
    assert stages.count("promote") >= 2
    summary = json.loads((result.out_dir / "summary.json").read_text())
    labels = [t.user_attrs["baseline"] for t in screened]
    grid = sum(
        label == "own norms" or (label.startswith("uniform:") and label != "uniform:switchable")
        for label in labels
    )
    assert summary["compute"]["budget_trainings"] == grid
    assert summary["compute"]["trainings"] <= grid
    assert summary["candidates"][0]["mean"] == pytest.approx(result.best_value)
    assert "Best configs by mean" in (result.out_dir / "report.html").read_text()


def test_budget_trainings_bounds_the_compute_of_a_sampler_search(tmp_path):
    result = _search(
        tmp_path,
        n_trials=None,
        warm_start=False,
        pruner="none",
        budget=Budget(trainings=2.5),
        trainer_kwargs={**FAST, "max_epochs": 2},
    )
    epochs = sum(t.user_attrs.get("epochs", 0) for t in result.study.trials)
    assert epochs <= 5 and len(result.study.trials) == 2  # a third full training does not fit


@pytest.mark.parametrize("name", ["storage", "out_dir", "study_name"])
def test_an_empty_storage_out_dir_or_study_name_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match=f"`{name}` must not be empty"):
        _search(tmp_path, **{name: ""})


def test_budget_devices_none_is_refused():
    with pytest.raises(ValueError, match="devices"):
        Budget(devices=None)


def test_the_exported_config_carries_the_searchs_probe(tmp_path):
    """A fresh model given the exported config without an example input is read as the
    search's probe read it (layout, feeder, the original layer; the input shape is a batch's)."""
    result = _search(tmp_path, n_trials=1, warm_start=False)
    model = TinyConvNet()
    slots = autonorm.find_slots(model, model.example_input_array)

    def seen(records):
        return {n: (r.layout, r.num_features, r.feeder, r.original) for n, r in records.items()}

    probed = seen({s.name: s.record() for s in slots})
    assert seen(result.best_config.probe) == probed
    assert all(r.input_shape is not None for r in result.best_config.probe.values())
    assert seen(NormConfig.load(result.out_dir / "best_config.yaml").probe) == probed
    assert seen(autonorm.recommend(slots).probe) == probed


def test_the_switchable_screen_is_perturbed_and_refinement_borrows_its_choices(tmp_path):
    """A real staged search with room to refine: the screened uniform-SwitchableNorm trial
    records what its layers weighed highest and what perturbing its model chose per slot; that
    config is screened, and refinement moves carry its choices."""
    space = SearchSpace(choices=["batchnorm", "groupnorm", "switchable"])
    result = _search(
        tmp_path,
        n_trials=None,
        space=space,
        trainer_kwargs={**FAST, "max_epochs": 3},
        budget=Budget(trainings=9),
    )
    trials = result.study.trials
    screened = {
        t.user_attrs["baseline"]: t for t in trials if t.user_attrs.get("stage") == "screen"
    }
    favourites = screened["uniform:switchable"].user_attrs["switchable_choices"]
    slots = [s.name for s in autonorm.find_slots(TinyConvNet())]
    assert sorted(favourites) == sorted(slots)
    natives = {c.label for table in CANDIDATE_CHOICES.values() for c in table.values()}
    assert {NormChoice.parse(v).label for v in favourites.values()} <= natives
    for trial in trials:  # a trial records the choices of the slots it gave SwitchableNorm
        mixing = {n for n, v in trial.user_attrs["config"].items() if "switchable" in str(v)}
        assert set(trial.user_attrs.get("switchable_choices", {})) == mixing
    # the supernet's slots decided by perturbation (validation passes), that config screened
    supernet = screened["uniform:switchable"]
    perturbed = supernet.user_attrs["perturbed_choices"]
    assert sorted(perturbed) == sorted(slots)
    assert {NormChoice.parse(v).label for v in perturbed.values()} <= natives
    evidence = supernet.user_attrs["perturbation"]
    assert sorted(evidence["order"]) == sorted(slots)
    assert supernet.user_attrs["perturbation_passes"] >= 1 + 2 * len(slots)
    assert "switchable perturbation" in screened
    html = (result.out_dir / "report.html").read_text()
    assert "Per-slot evidence from the SwitchableNorm model" in html
    moves = [t for t in trials if t.user_attrs.get("stage") == "refine"]
    borrowed = [t for t in moves if t.user_attrs["baseline"].endswith("<- switchable perturbation")]
    assert borrowed, [t.user_attrs["baseline"] for t in moves]
    for move in borrowed:  # the moved slot takes what the perturbation chose there
        slot = move.user_attrs["baseline"].split("slot:")[1].split(" <-")[0]
        assert move.params[slot] == screened["switchable perturbation"].params[slot]
