"""Bad input across the Python API and the CLI: each case fails with a clear error and leaves an
existing bundle and its study exactly as they were (compared file by file, before and after)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

import autonorm
from autonorm import AutoNormError, Budget, ConfigError, NormConfig
from autonorm.callbacks import AutoNorm
from tests.lightning_models import NoNormNet, TinyConvNet, TinyDataModule, tiny_trainer

AUTONORM = str(Path(sys.executable).with_name("autonorm"))


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """An existing search bundle (two finished trials) that no bad input may change."""
    out = tmp_path_factory.mktemp("existing") / "bundle"
    autonorm.search(
        TinyConvNet,
        TinyDataModule(),
        n_trials=2,
        space="minimal",
        trainer_kwargs={"max_epochs": 1},
        out_dir=out,
        seed=0,
    )
    return out


def search_on(bundle: Path, **kwargs):
    options = dict(
        n_trials=3, space="minimal", trainer_kwargs={"max_epochs": 1}, out_dir=bundle, seed=0
    )
    options.update(kwargs)
    model = options.pop("model", TinyConvNet)
    return autonorm.search(model, options.pop("data", TinyDataModule()), **options)


API_CASES = {
    "non-positive n_trials": (lambda b: search_on(b, n_trials=0), ValueError, "n_trials"),
    "unknown mode": (lambda b: search_on(b, mode="up"), ValueError, "`mode`"),
    "objectives without the metric": (
        lambda b: search_on(b, objectives=["latency"]),
        ValueError,
        "objectives",
    ),
    "unknown sampler": (lambda b: search_on(b, sampler="grid"), ValueError, "`sampler`"),
    "unknown pruner": (lambda b: search_on(b, pruner="sometimes"), ValueError, "`pruner`"),
    "unknown preset": (
        lambda b: search_on(b, space="nonsense"),
        ValueError,
        "unknown search space",
    ),
    "unknown norm in a space": (
        lambda b: search_on(b, space={"choices": ["fancynorm"]}),
        ConfigError,
        "fancynorm",
    ),
    "space changed against the study": (
        lambda b: search_on(b, space="cnn"),
        AutoNormError,
        r"recorded with other settings: space\.",
    ),
    "bad memory string": (
        lambda b: search_on(b, budget=Budget(max_memory="lots")),
        ValueError,
        "max_memory",
    ),
    "zero batch size": (lambda b: search_on(b, budget={"batch_size": 0}), ValueError, "batch_size"),
    "a model instance instead of a class": (
        lambda b: search_on(b, model=TinyConvNet()),
        ValueError,
        "fresh model",
    ),
    "model without norm slots": (
        lambda b: search_on(b, model=NoNormNet),
        AutoNormError,
        "no normalization slot",
    ),
    "include matching no slot": (
        lambda b: search_on(b, include="nothing.*"),
        AutoNormError,
        "no normalization slot",
    ),
    "unknown warm start": (lambda b: search_on(b, warm_start="maybe"), ValueError, "warm_start"),
    "other data on the same study": (
        lambda b: search_on(b, data=TinyDataModule(n=48)),
        AutoNormError,
        r"data\.arguments\.n 96 -> 48",
    ),
    "another model argument on the same study": (
        lambda b: search_on(b, model_kwargs={"lr": 0.2}),
        AutoNormError,
        r"model\.arguments\.lr 0\.05 -> 0\.2",
    ),
    "a storage path that is a folder": (
        lambda b: search_on(b, storage=str(b)),
        AutoNormError,
        "is a folder",
    ),
    "a default config the space cannot give": (
        lambda b: search_on(b, default_config=NormConfig({"bn1": "dyt"})),
        AutoNormError,
        "default_config",
    ),
    "a budget the retraining uses up": (
        lambda b: search_on(b, budget={"trainings": 1.5}, retrain=True),
        ValueError,
        "leaves 0.5 trainings for the trials",
    ),
    "device in a norm choice": (
        lambda b: autonorm.NormChoice.parse("layernorm(device=cpu)"),
        ValueError,
        "not choice parameters",
    ),
    "a file that is no checkpoint": (
        lambda b: autonorm.load_from_checkpoint(TinyConvNet, b / "best_config.yaml"),
        AutoNormError,
        "is not a checkpoint torch can read",
    ),
    "unreachable PostgreSQL": (
        lambda b: search_on(b, storage="postgresql+psycopg://u:secret@127.0.0.1:9/db"),
        AutoNormError,
        "cannot open storage",
    ),
    "journal file in a missing folder": (
        lambda b: search_on(b, storage=str(b / "missing" / "journal.log")),
        AutoNormError,
        "does not exist",
    ),
    "out_dir under a file": (
        lambda b: search_on(b, out_dir=b / "best_config.yaml" / "sub"),
        AutoNormError,
        "cannot be written",
    ),
    "config for another model": (
        lambda b: autonorm.apply_config(
            TinyConvNet(), NormConfig({"layer1.0.bn1": "groupnorm", "fc_norm": "layernorm"})
        ),
        ConfigError,
        "not norm slots",
    ),
    "groups not dividing the channels": (
        lambda b: autonorm.apply_config(
            TinyConvNet(), {"bn1": {"name": "groupnorm", "groups": 3}}, partial=True
        ),
        ConfigError,
        "must divide",
    ),
    "fixed mode with a missing config file": (
        lambda b: AutoNorm(config=b / "missing.yaml"),
        ConfigError,
        "cannot read",
    ),
    "example input of the wrong shape": (
        lambda b: autonorm.find_slots(TinyConvNet(), torch.zeros(2, 5, 16)),
        RuntimeError,
        "channels",
    ),
    # passwords and choice parameters (more in tests/test_io.py, tests/test_config_choices.py)
    "password in a query parameter": (
        lambda b: search_on(b, storage="postgresql+psycopg://u@127.0.0.1:9/db?password=secret"),
        AutoNormError,
        r"cannot open storage .*password=\*\*\*",
    ),
    "password of an empty user": (
        lambda b: search_on(b, storage="postgresql://:secret@127.0.0.1:9/db"),
        AutoNormError,
        r"cannot open storage 'postgresql://:\*\*\*@",
    ),
    "infinite eps": (
        lambda b: autonorm.apply_config(TinyConvNet(), {"bn1": "batchnorm(eps=inf)"}, partial=True),
        ConfigError,
        "`eps` must be a finite number > 0",
    ),
    "affine given as a string": (
        lambda b: NormConfig({"bn1": {"name": "layernorm", "affine": "false"}}),
        ConfigError,
        "`affine` must be true or false",
    ),
    "negative momentum in a space": (
        lambda b: search_on(b, space={"choices": ["batchnorm(momentum=-1)"]}),
        ConfigError,
        r"`momentum` must be a number in \[0, 1\]",
    ),
    "duplicated key in a space file": (
        lambda b: search_on(b, space=_write(b.parent / "dup-space.yaml", DUPLICATED_SPACE)),
        ConfigError,
        "duplicated key",
    ),
    "config recorded for another model class": (
        lambda b: autonorm.apply_config(
            TinyConvNet(),
            NormConfig({"bn1": "groupnorm"}, metadata={"model_class": "tests.models.FusedNormNet"}),
            partial=True,
        ),
        ConfigError,
        "check_model=False",
    ),
    "rerun with another monitor": (
        lambda b: search_on(b, monitor="train_loss"),
        AutoNormError,
        "monitor 'val_loss' -> 'train_loss'.*--search.study_name",
    ),
    "rerun with another batch size": (
        lambda b: search_on(b, budget={"batch_size": 8}),
        AutoNormError,
        "budget.batch_size None -> 8",
    ),
    "rerun with another model class": (
        lambda b: search_on(b, model=OtherConvNet, study_name="autonorm-TinyConvNet"),
        AutoNormError,
        "model_class '.*TinyConvNet' -> '.*OtherConvNet'",
    ),
    "loaders ignoring budget.batch_size": (
        lambda b: search_on(
            b.parent / "ignoring", data=IgnoringData(), budget={"batch_size": 4}, n_trials=1
        ),
        AutoNormError,
        "budget.batch_size=4 but the first training batch holds 16 samples",
    ),
}


class OtherConvNet(TinyConvNet):
    """The same slots as TinyConvNet, another model class."""


class IgnoringData(TinyDataModule):
    """Has the `batch_size` attribute autonorm sets, but its loader trains at 16."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=16, drop_last=True)


DUPLICATED_SPACE = "choices:\n  '*': [batchnorm]\n  '*': [layernorm]\n"
ALIASED_CONFIG = "slots:\n  bn1: &n layernorm\n  bn2: *n\n"
DUPLICATED_CONFIG = "slots:\n  bn1: layernorm\n  bn1: batchnorm\n"


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_bad_input(bundle, case):
    call, error, message = API_CASES[case]
    before = snapshot(bundle)
    with pytest.raises(error, match=message) as err:
        call(bundle)
    assert snapshot(bundle) == before
    assert "secret" not in "".join(before) and "secret" not in str(err.value)


def test_a_monitor_never_logged_fails_the_trial_and_keeps_the_earlier_ones(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    storage = f"sqlite:///{copy / 'study.db'}"
    study = optuna.load_study(study_name="autonorm-TinyConvNet", storage=storage)
    before = [(t.number, t.state, t.params, t.values) for t in study.trials]
    with pytest.raises(AutoNormError, match=r"'val_accuracy' was never logged.*val_acc"):
        search_on(copy, monitor="val_accuracy", study_name="other")  # another monitor: a new study
    after = optuna.load_study(study_name="autonorm-TinyConvNet", storage=storage).trials
    assert [(t.number, t.state, t.params, t.values) for t in after[: len(before)]] == before
    assert (copy / "best_config.yaml").read_bytes() == (bundle / "best_config.yaml").read_bytes()


def test_a_corrupted_study_file_is_reported_and_left_alone(bundle, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "study.db").write_bytes(b"this is not a database" * 100)
    before = snapshot(broken)
    with pytest.raises(AutoNormError, match="cannot open storage"):
        search_on(broken)
    assert snapshot(broken) == before


def test_a_malformed_config_file_names_the_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("slots: [unclosed\n")
    with pytest.raises(ConfigError, match="cfg.yaml"):
        NormConfig.load(path)
    assert path.read_text() == "slots: [unclosed\n"


def test_a_plain_checkpoint_is_refused_by_load_from_checkpoint(tmp_path):
    trainer = tiny_trainer(tmp_path, [], max_epochs=1)
    trainer.fit(TinyConvNet(), datamodule=TinyDataModule())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(AutoNormError, match="load_from_checkpoint"):
        autonorm.load_from_checkpoint(TinyConvNet, tmp_path / "plain.ckpt")


CLI_CASES = {
    "report on a folder that is no bundle": (["report", "{tmp}"], "not an autonorm bundle"),
    "show a malformed config": (["show", "{tmp}/bad.yaml"], "not valid YAML"),
    "dashboard on a missing target": (["dashboard", "{tmp}/nowhere"], "neither"),
    "report with an unknown study name": (
        ["report", "{bundle}", "--study-name", "other"],
        "no study 'other'",
    ),
    "show a config with YAML aliases": (["show", "{tmp}/aliased.yaml"], "aliases (*n)"),
    "show a config with a duplicated key": (["show", "{tmp}/dup.yaml"], "duplicated key 'bn1'"),
    "recommend with a duplicated --model-args key": (
        [
            "recommend",
            "tests.lightning_models.TinyConvNet",
            "--model-args",
            "{{width: 8, width: 4}}",
        ],
        "duplicated key 'width'",
    ),
    "recommend with a bad input shape": (
        ["recommend", "tests.lightning_models.TinyConvNet", "--input-shape", "2", "5", "16"],
        "channels",
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input(bundle, tmp_path, case):
    args, message = CLI_CASES[case]
    (tmp_path / "bad.yaml").write_text("slots: [unclosed\n")
    (tmp_path / "aliased.yaml").write_text(ALIASED_CONFIG)
    (tmp_path / "dup.yaml").write_text(DUPLICATED_CONFIG)
    args = [a.format(tmp=tmp_path, bundle=bundle) for a in args]
    before = snapshot(bundle)
    result = subprocess.run(
        [AUTONORM, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2, (result.stdout[-500:], result.stderr[-1500:])
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(bundle) == before
