"""Using the command: its help, and bad input to any subcommand answered with one line (no
traceback, no password) and exit code 2."""

from __future__ import annotations

import optuna
import pytest

from autonorm.cli import main
from tests.cli.conftest import SEARCH_ARGS


def test_help(workdir, installed_cli):
    result = installed_cli(["--help"], workdir)
    assert result.returncode == 0
    for command in ("search", "report", "show", "dashboard"):
        assert command in result.stdout
    search_help = installed_cli(["search", "--help"], workdir)
    assert search_help.returncode == 0 and "--search.n_trials" in search_help.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["search", "--model", "nowhere.Net", "--data", "usermodels.Data"],
            "cannot import --model",
        ),
        (["search", "--config", "missing.yaml"], "does not exist"),
        (["search", "--config", "broken.yaml"], "broken.yaml' is not valid YAML"),
        (["search", *SEARCH_ARGS, "--search.budget.max_memory", "lots"], "max_memory"),
        (["search", *SEARCH_ARGS, "--search.n_trials", "0"], "n_trials"),
        (["search", *SEARCH_ARGS, "--search.choices", "[batchnorm,fancynorm]"], "fancynorm"),
        (["search", *SEARCH_ARGS, "--search.monitor", "val_acc"], "never logged"),
        (
            ["search", *SEARCH_ARGS, "--search.storage", "postgresql://u:secret@127.0.0.1:9/db"],
            "cannot open storage",
        ),
        (["search", *SEARCH_ARGS, "--search.out_dir", "usermodels.py/out"], "cannot be written"),
        (["search", *SEARCH_ARGS, "--search.mode", "up"], "mode"),
        (
            ["search", *SEARCH_ARGS, "--search.warm_start", "maybe"],
            "--search.warm_start: got 'maybe'; expected one of true, false, 'learn', 'learn-sparse'",
        ),
        (["show", "missing.yaml"], "cannot read"),
        (["report", "nowhere"], "neither"),
        (["recommend", "nowhere.Net"], "cannot import"),
        (["recommend", "usermodels.Net", "--model-args", "[1, 2]"], "YAML mapping"),
        (["show", "deep.yaml"], "'deep.yaml' is nested too deeply to be a config"),
        (["search", *SEARCH_ARGS, "--search.storage", "a-folder"], "'a-folder' is a folder"),
        (["report", "sqlite:///foreign.db"], "study 'f' was not made by autonorm"),
        (
            [
                "search",
                *SEARCH_ARGS,
                "--search.storage",
                "sqlite:///foreign.db",
                "--search.study_name",
                "f",
            ],
            "study 'f' in this storage was not made by autonorm",
        ),  # fmt: skip
        (
            ["export", "usermodels.Net", "--checkpoint", "junk.ckpt", "-o", "x.pt2"],
            "'junk.ckpt' is not a checkpoint torch can read",
        ),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(workdir, installed_cli, args, message):
    (workdir / "broken.yaml").write_text("model: [unclosed\n")
    (workdir / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    (workdir / "a-folder").mkdir(exist_ok=True)
    (workdir / "junk.ckpt").write_bytes(b"not a checkpoint")
    if not (workdir / "foreign.db").exists():  # a study another tool made
        foreign = optuna.create_study(storage=f"sqlite:///{workdir / 'foreign.db'}", study_name="f")
        foreign.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    out = workdir / "bad-input-out"
    if "--search.out_dir" not in args and args[0] == "search" and "--config" not in args:
        args = [*args, "--search.out_dir", str(out)]
    result = installed_cli(args, workdir)
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-2000:])
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "secret" not in result.stderr + result.stdout


def _search_args(choices: str) -> list[str]:
    return [
        "search", "--model", "tests.lightning_models.TinyConvNet",
        "--data", "tests.lightning_models.TinyDataModule", "--search.choices", choices,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("choices", "named"),
    [("[nonsense]", "'nonsense'"), ("nonsense", "'nonsense'"), ("[layernorm,fancy+ws]", "'fancy'")],
)
def test_unknown_norm_in_cli_choices_is_one_line_naming_it_and_the_valid_ones(
    capsys, choices, named
):
    assert main(_search_args(choices)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("autonorm: error: --search.choices: unknown norm " + named)
    assert "valid names are: batchnorm" in err and "rmsnorm" in err
    assert "NestedArg" not in err


def test_a_model_class_that_is_no_lightning_module_is_named_in_one_line(capsys):
    args = ["search", "--model", "tests.models.SmallResNet"]
    assert main([*args, "--data", "tests.lightning_models.TinyDataModule"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "autonorm: error: --model tests.models.SmallResNet is neither a LightningModule (of "
        "lightning.pytorch or pytorch_lightning) nor a config file"
    )


def test_debug_adds_the_traceback_and_keeps_the_exit_status(workdir, installed_cli):
    args = ["search", *SEARCH_ARGS, "--search.n_trials", "0", "--search.out_dir", "debug-out"]
    plain = installed_cli(args, workdir)
    debug = installed_cli(["--debug", *args], workdir)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" in debug.stderr and "Traceback" not in plain.stderr
    assert "autonorm: error: `n_trials` must be a positive int" in debug.stderr


def test_a_search_without_an_answer_exits_3(workdir, installed_cli):
    """Every trial over a parameter budget no model meets: the search ran, no best config."""
    args = ["search", *SEARCH_ARGS, "--search.budget.max_params", "1"]
    result = installed_cli([*args, "--search.out_dir", "no-answer"], workdir)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "no trial met the budget" in result.stdout
    assert (workdir / "no-answer" / "report.html").is_file()  # the bundle says why
