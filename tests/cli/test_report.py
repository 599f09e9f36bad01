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


def _tiny_search(out, **kwargs):
    options = dict(
        n_trials=2,
        space="minimal",
        trainer_kwargs={"max_epochs": 1},
        out_dir=out,
        warm_start=False,
        sampler="random",
        seed=0,
    )
    return autonorm.search(TinyConvNet, TinyDataModule(), **{**options, **kwargs})


def test_report_reads_the_storage_the_bundle_records_not_a_study_db_beside_it(
    tmp_path, monkeypatch, autonorm_cli
):
    """A journal study exported into a folder that also holds another study's ``study.db``:
    ``autonorm report`` run from elsewhere rebuilds the journal study (its path was recorded
    absolute) and creates no stray journal."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    journal = _tiny_search(tmp_path / "out", storage="studies.log", n_trials=3)
    other = _tiny_search(tmp_path / "other", n_trials=1)  # its study.db, same study name
    (tmp_path / "other" / "study.db").rename(tmp_path / "out" / "study.db")
    assert journal.study.study_name == other.study.study_name
    recorded = (tmp_path / "out" / "storage.txt").read_text().splitlines()[0]
    assert recorded == str(project / "studies.log")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = autonorm_cli(["report", str(tmp_path / "out")], elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["trials"]["complete"] == 3  # the journal study's, not study.db's single one
    assert list(elsewhere.iterdir()) == []  # no stray journal where report ran
    # a recorded journal that is gone is said in one line, never recreated empty
    (project / "studies.log").rename(project / "moved.log")
    result = autonorm_cli(["report", str(tmp_path / "out")], elsewhere)
    assert result.returncode == 2
    assert "records the journal" in result.stderr and "does not exist" in result.stderr
    assert not (project / "studies.log").exists()


def test_a_bundle_keeps_only_its_own_studys_files(tmp_path, caplog):
    out = tmp_path / "out"
    first = _tiny_search(out, retrain=True)
    checkpoint = out / "best.ckpt"
    assert checkpoint.is_file()
    # the same study exported again: its retrained checkpoint still matches the best config
    autonorm.search(
        TinyConvNet, TinyDataModule(), n_trials=2, space="minimal",
        trainer_kwargs={"max_epochs": 1}, out_dir=out, warm_start=False, sampler="random",
        seed=0,
    )  # fmt: skip
    assert checkpoint.is_file()
    # a checkpoint no config vouches for, a learned config the study did not learn: removed
    checkpoint.write_bytes(b"not a checkpoint")
    (out / "learned_config.yaml").write_text("choices: {}\n")
    _tiny_search(out)
    assert not checkpoint.exists() and not (out / "learned_config.yaml").exists()
    assert "removed" in caplog.text and "best.ckpt" in caplog.text
    # another study's bundle in the same folder: its files go, the artifacts folder too
    _tiny_search(out, retrain=True)
    (out / "artifacts" / "stale.txt").parent.mkdir(exist_ok=True)
    (out / "artifacts" / "stale.txt").write_text("x")
    (out / "learned_config.yaml").write_text("choices: {}\n")
    _tiny_search(out, study_name="another")
    assert not (out / "best.ckpt").exists()
    assert not (out / "learned_config.yaml").exists()
    assert not (out / "artifacts" / "stale.txt").exists()
    assert first.study.study_name != "another"
