"""Tests of ``autonorm.report._dashboard``: artifacts and the study note for optuna-dashboard."""

from __future__ import annotations

import optuna
import pytest

from autonorm.report import attach_dashboard_artifacts, write_report, write_summary


def test_attach_dashboard_artifacts_uploads_files_and_writes_a_note(mixed_study, tmp_path):
    get_note = pytest.importorskip("optuna_dashboard").get_note
    out = tmp_path / "bundle"
    out.mkdir()
    config = out / "best_config.yaml"
    config.write_text("stem.bn: batchnorm\n")
    report = write_report(mixed_study, out / "report.html")
    attach_dashboard_artifacts(mixed_study, out, [config, report])

    metas = optuna.artifacts.get_all_artifact_meta(mixed_study)
    assert sorted(m.filename for m in metas) == ["best_config.yaml", "report.html"]
    stored = {p.name for p in (out / "artifacts").iterdir()}
    assert stored == {m.artifact_id for m in metas}
    by_name = {m.filename: m for m in metas}
    assert by_name["best_config.yaml"].mimetype == "text/plain"
    assert (out / "artifacts" / by_name["best_config.yaml"].artifact_id).read_text() == (
        "stem.bn: batchnorm\n"
    )

    note = get_note(mixed_study)
    assert note.startswith("## autonorm summary")
    assert "Model `tests.Toy`, metric `val_loss` (min)." in note
    assert "**Best value:** 1 (trial 2)" in note
    assert "| `head.norm` | `groupnorm(groups=4)` |" in note
    assert "3 complete" in note and "2 infeasible" in note and "1 pruned" in note
    assert "`best_config.yaml`" in note

    # a rebuild neither duplicates unchanged files nor keeps a stale note
    config.write_text("stem.bn: layernorm\n")
    attach_dashboard_artifacts(mixed_study, out, [config, report])
    metas = optuna.artifacts.get_all_artifact_meta(mixed_study)
    assert sorted(m.filename for m in metas) == ["best_config.yaml"] * 2 + ["report.html"]
    assert get_note(mixed_study).startswith("## autonorm summary")


def test_attach_dashboard_artifacts_keeps_a_handwritten_note(mixed_study, tmp_path):
    dashboard = pytest.importorskip("optuna_dashboard")
    dashboard.save_note(mixed_study, "my own observations")
    attach_dashboard_artifacts(mixed_study, tmp_path, [])
    assert dashboard.get_note(mixed_study) == "my own observations"


def test_attach_dashboard_artifacts_without_files_creates_the_store(tmp_path):
    dashboard = pytest.importorskip("optuna_dashboard")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'empty.db'}")
    attach_dashboard_artifacts(study, tmp_path / "out", [])
    assert (tmp_path / "out" / "artifacts").is_dir()
    assert optuna.artifacts.get_all_artifact_meta(study) == []
    assert "No trial met the budget" in dashboard.get_note(study)


def test_attach_dashboard_artifacts_refuses_missing_files(mixed_study, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        attach_dashboard_artifacts(mixed_study, tmp_path, [tmp_path / "nope.yaml"])
    assert optuna.artifacts.get_all_artifact_meta(mixed_study) == []


def test_attach_dashboard_artifacts_uses_the_summary_it_is_given(mixed_study, tmp_path):
    get_note = pytest.importorskip("optuna_dashboard").get_note
    summary = {**write_summary(mixed_study, tmp_path), "model_class": "given.Model"}
    attach_dashboard_artifacts(mixed_study, tmp_path, [], summary=summary)
    assert "Model `given.Model`, metric `val_loss` (min)." in get_note(mixed_study)
