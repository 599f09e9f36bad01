"""``autonorm report``: it rebuilds a bundle's report, and keeps any study name, even a hostile
one, inside one folder of the default output folder."""

from __future__ import annotations

import json

import optuna

import autonorm
from tests.lightning_models import TinyConvNet, TinyDataModule


def test_report_rebuilds_the_bundle(bundle, workdir, installed_cli):
    out, _ = bundle
    (out / "report.html").unlink()
    (out / "summary.json").unlink()
    result = installed_cli(["report", str(out)], workdir)
    assert result.returncode == 0, result.stderr
    assert (out / "report.html").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["trials"]["complete"] >= 1


def test_report_keeps_hostile_study_names_inside_the_default_folder(tmp_path, autonorm_cli):
    db = tmp_path / "shared" / "studies.db"
    db.parent.mkdir()
    storage = f"sqlite:///{db}"
    autonorm.search(
        TinyConvNet,
        TinyDataModule(),
        n_trials=1,
        space="minimal",
        trainer_kwargs={"max_epochs": 1},
        storage=storage,
        study_name="../evil",
        out_dir=tmp_path / "first",
        warm_start=False,
        seed=0,
    )
    outside = tmp_path / "outside"
    optuna.copy_study(
        from_study_name="../evil",
        from_storage=storage,
        to_storage=storage,
        to_study_name=str(outside),
    )
    work = tmp_path / "work"
    work.mkdir()
    for name in ("../evil", str(outside)):
        result = autonorm_cli(["report", storage, "--study-name", name], work)
        assert result.returncode == 0, result.stderr[-2000:]
    assert not (work / "evil").exists() and not outside.exists()
    folders = sorted(p.name for p in (work / "autonorm-runs").iterdir())
    assert len(folders) == 2 and all("/" not in f and not f.startswith(".") for f in folders)
    for folder in folders:
        assert (work / "autonorm-runs" / folder / "report.html").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["autonorm-runs"]
