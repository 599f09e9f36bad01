"""What ``autonorm search`` writes when its output is not a terminal (CI logs, ``nohup``, a job
scheduler): one plain line per finished trial, a summary, no Lightning banner; the user's own
prints and warnings still show."""

from __future__ import annotations

import re
import textwrap

import optuna

#: Lightning's per-Trainer banners, tips and notices, any of which a quiet trial must not print.
LIGHTNING_BANNERS = (
    "GPU available",
    "TPU available",
    "HPU available",
    "💡 Tip",
    "litlogger",
    "LOCAL_RANK",
    "`Trainer.fit` stopped",
    "`weights_only` was not set",
    "| Name",  # the model summary table
)

NOISY_USER_MODEL = '''
import warnings

from usermodels import Net


class Noisy(Net):
    """The user's own output: a print and a warning from their module."""

    def on_train_end(self):
        print("user print: training ended")
        warnings.warn("user warning: from my module")
'''


def test_piped_search_prints_a_line_per_trial_and_no_lightning_banner(workdir, installed_cli):
    """The staged search (budget in epochs) with its retraining, stderr piped: a line per
    finished trial with its stage, state, epochs, config and the budget left; a summary line;
    Lightning's banners of every training (trials, continued promotions, retraining) gone."""
    (workdir / "noisy.py").write_text(textwrap.dedent(NOISY_USER_MODEL))
    args = ["search", "--model", "noisy.Noisy", "--data", "usermodels.Data"]
    args += ["--trainer.max_epochs", "2", "--search.space", "minimal", "--search.seed", "0"]
    args += ["--search.retrain", "true", "--search.out_dir", "piped"]
    result = installed_cli(args, workdir, PYTHONWARNINGS="default")
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    for banner in LIGHTNING_BANNERS:
        assert banner not in err, f"{banner!r} in the piped output:\n{err[-3000:]}"
    study = optuna.load_study(
        study_name="autonorm-Noisy", storage=f"sqlite:///{workdir / 'piped' / 'study.db'}"
    )
    ran = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = [t for t in study.trials if t.state in ran]  # not those the budget skipped
    lines = [line for line in err.splitlines() if line.startswith("trial ")]
    assert len(finished) >= 2 and len(lines) == len(finished)
    line = re.compile(
        r"trial (\d+)  (screen|promote|refine|confirm|[a-z]+)  (complete|pruned|infeasible|failed)"
        r"  value \S+  \d+ epochs  \[.+\].*  \d:\d\d:\d\d elapsed, ~(\d:\d\d:\d\d|-) left, "
        r"budget: \d+ of \d+ epochs left$"
    )
    assert sorted(int(line.match(x).group(1)) for x in lines) == [t.number for t in finished]
    assert "[own norms]" in err  # the config's label
    assert "\x1b[" not in err  # no terminal escapes in a log
    summary = [x for x in err.splitlines() if x.startswith("autonorm search: ")]
    assert len(summary) == 1 and "best " in summary[0] and "epochs" in summary[0]
    # the user's own output is not silenced: one print and one warning per training
    assert "user print: training ended" in result.stdout
    assert "user warning: from my module" in err
    assert (workdir / "piped" / "best.ckpt").exists()
