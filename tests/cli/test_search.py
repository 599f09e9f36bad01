"""``autonorm search`` on user classes outside the package: the bundle it writes, a YAML config
file, and failed invocations that leave an existing study as it was."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import optuna

import autonorm
from tests.cli.conftest import SEARCH_ARGS


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def test_search_from_a_yaml_config(workdir, installed_cli):
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
    printed = installed_cli(["search", "--config", "search.yaml", "--print_config"], workdir)
    assert printed.returncode == 0 and "usermodels.Net" in printed.stdout
    result = installed_cli(["search", "--config", "search.yaml"], workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((workdir / "yaml-out" / "summary.json").read_text())
    assert summary["budget"]["batch_size"] == 8
    # a duplicated key (jsonargparse's loader would keep the last): refused in one line
    duplicated = workdir / "twice.yaml"
    duplicated.write_text((workdir / "search.yaml").read_text() + "search:\n  mode: max\n")
    refused = installed_cli(["search", "--config", str(duplicated)], workdir)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "twice.yaml' is not valid YAML: duplicated key 'search'" in refused.stderr


def test_a_stray_file_named_like_a_library_does_not_shadow_it(tmp_path, workdir, installed_cli):
    """``plotly.py`` next to the user's module: the report still draws with the real plotly,
    and the user's module is still found."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "usermodels.py").write_text((workdir / "usermodels.py").read_text())
    (project / "plotly.py").write_text("raise ImportError('the stray plotly.py was imported')\n")
    result = installed_cli(["search", *SEARCH_ARGS, "--search.out_dir", "out"], project)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stray" not in result.stderr
    assert "Plotly.newPlot(" in (project / "out" / "report.html").read_text()


def test_failed_invocations_leave_an_existing_study_intact(bundle, workdir, installed_cli):
    out, _ = bundle
    before = {p.name: digest(p) for p in out.iterdir() if p.is_file()}
    changed_space = installed_cli(
        ["search", *SEARCH_ARGS, "--search.out_dir", "out", "--search.space", "cnn"], workdir
    )
    bad_budget = installed_cli(
        ["search", *SEARCH_ARGS, "--search.out_dir", "out", "--search.budget.max_memory", "-1"],
        workdir,
    )
    # another experiment on the same folder: other data, another model argument
    other_data = installed_cli(
        ["search", *SEARCH_ARGS, "--search.out_dir", "out", "--data.batch_size", "8"], workdir
    )
    other_model = installed_cli(
        ["search", *SEARCH_ARGS, "--search.out_dir", "out", "--model.lr", "0.1"], workdir
    )
    for result in (changed_space, bad_budget, other_data, other_model):
        assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "recorded with other settings: space." in changed_space.stderr
    assert "data.arguments.batch_size 16 -> 8" in other_data.stderr
    assert "model.arguments.lr 0.05 -> 0.1" in other_model.stderr
    after = {p.name: digest(p) for p in out.iterdir() if p.is_file()}
    assert after == before
