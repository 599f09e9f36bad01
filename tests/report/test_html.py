"""Tests of ``autonorm.report._html``: the self-contained report page."""

from __future__ import annotations

import optuna

from autonorm._trial_keys import BASELINE, CONFIG
from autonorm.report import pareto_trials, write_report, write_summary
from tests.report.studies import CHOICES, PLOTLY_MARKER, SLOTS, make_study, params


def test_report_of_a_three_objective_study(tmp_path):
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'three.db'}", directions=["minimize"] * 3
    )
    distribution = optuna.distributions.CategoricalDistribution(CHOICES)
    for i, values in enumerate([(1, 2, 3), (3, 2, 1), (2, 2, 2), (3, 3, 3)]):
        study.add_trial(
            optuna.trial.create_trial(
                params={SLOTS[0]: CHOICES[i % 3]},
                distributions={SLOTS[0]: distribution},
                values=values,
                user_attrs={CONFIG: {SLOTS[0]: CHOICES[i % 3]}},
            )
        )
    assert [t.number for t in pareto_trials(study)] == [0, 1, 2]
    html = write_report(study, tmp_path / "report.html").read_text()
    assert '"type":"splom"' in html and html.count(PLOTLY_MARKER) == 1


def test_report_is_self_contained_and_names_the_slots(mixed_study, tmp_path):
    path = write_report(mixed_study, tmp_path / "sub" / "report.html")
    assert path == tmp_path / "sub" / "report.html"
    html = path.read_text()
    assert "plotly" in html.lower()
    assert html.count(PLOTLY_MARKER) == 1  # plotly.js inlined exactly once
    assert '<script src="http' not in html  # nothing to fetch: opens offline
    assert html.count("Plotly.newPlot(") >= 3  # history, choice map, intermediate values
    for slot in SLOTS:
        assert slot in html
    assert "Optimization history" in html and "Which choice won, per slot" in html
    assert "Choice importance" in html and "Intermediate values" in html
    assert "groupnorm(groups=4)" in html  # dict choices get a readable label
    assert "own norms" in html
    assert "max_memory=1.0 GiB, max_params=1000; rejected 2 trials" in html  # format_bytes
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_report_of_an_empty_study(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'empty.db'}", study_name="empty")
    html = write_report(study, tmp_path / "report.html").read_text()
    assert "no trials yet" in html
    assert "empty" in html


def test_report_when_every_trial_is_infeasible(tmp_path):
    plans = [
        (params("batchnorm", "batchnorm", "batchnorm"), {"plan": "over_budget_at_start"}),
        (params("layernorm", "batchnorm", "batchnorm"), {"plan": "over_budget_at_end"}),
        (params("layernorm", "layernorm", "batchnorm"), {"plan": "over_budget_at_start"}),
    ]
    study = make_study(tmp_path, plans)
    html = write_report(study, tmp_path / "report.html").read_text()
    assert "All 3 trials were over the budget" in html
    assert "Not shown: it needs at least 10 distinct configs" in html
    assert html.count(PLOTLY_MARKER) == 1
    summary = write_summary(study, tmp_path)
    assert summary["best_value"] is None and summary["trials"]["infeasible"] == 3


def test_report_when_every_trial_is_pruned(tmp_path):
    plans = [(params("batchnorm", "batchnorm", c), {"plan": "pruned"}) for c in CHOICES]
    html = write_report(make_study(tmp_path, plans), tmp_path / "report.html").read_text()
    assert "No trial completed within the budget (3 pruned)" in html


def test_report_escapes_user_strings(tmp_path):
    name = "<script>alert('study')</script>"
    plans = [(params("batchnorm", "batchnorm", "batchnorm"), {BASELINE: "<b>own</b> norms"})]
    study = make_study(tmp_path, plans, name=name)
    html = write_report(study, tmp_path / "report.html").read_text()
    assert name not in html and "<b>own</b>" not in html
    assert "&lt;script&gt;alert(&#x27;study&#x27;)&lt;/script&gt;" in html
    assert "&lt;b&gt;own&lt;/b&gt; norms" in html


def test_report_uses_the_summary_it_is_given(mixed_study, tmp_path):
    summary = write_summary(mixed_study, tmp_path)
    summary = {**summary, "written_at": "2001-02-03T04:05:06+00:00", "model_class": "given.Model"}
    html = write_report(mixed_study, tmp_path / "report.html", summary=summary).read_text()
    assert "written 2001-02-03T04:05:06+00:00 from 7 trials" in html
    assert "given.Model" in html and "tests.Toy" not in html


def test_report_spells_choices_as_norm_choice_labels(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'labels.db'}")
    choice = {"name": "groupnorm", "groups": 4, "affine": True}
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={CONFIG: {"a": choice}}))
    html = write_report(study, tmp_path / "report.html").read_text()
    assert "groupnorm(affine=true, groups=4)" in html and "affine=True" not in html


def test_report_names_the_papers_of_the_chosen_norms(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'papers.db'}")
    config = {"a": "frn", "b": {"name": "batchrenorm", "r_max": 2.0}, "c": "frn"}
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={CONFIG: config}))
    html = write_report(study, tmp_path / "report.html").read_text()
    start = html.index("The chosen norms' papers")
    section = html[start : html.index("</table>", start)]
    assert section.index("Ioffe, Batch Renormalization") < section.index("Singh &amp; Krishnan")
    assert section.count("Singh &amp; Krishnan") == 1 and "groupnorm" not in section


def test_the_choice_map_stars_the_chosen_config_not_the_best_single_run(tmp_path):
    """The own norms' two runs against a challenger's single run a hair above the better one:
    no paired evidence, the own norms are chosen, and their cells carry the star although the
    challenger's cell holds the best single value."""
    from autonorm._trial_keys import INCUMBENT, RUN_INDEX
    from autonorm.report._choices import choice_map
    from autonorm.report._summary import summarize

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    distribution = optuna.distributions.CategoricalDistribution(CHOICES)
    own = {SLOTS[0]: "batchnorm", SLOTS[1]: "batchnorm"}
    challenger = {SLOTS[0]: "layernorm", SLOTS[1]: "batchnorm"}
    for config, index, value, attrs in [
        (own, 0, 0.70, {INCUMBENT: True, BASELINE: "own norms"}),
        (own, 1, 0.80, {INCUMBENT: True, BASELINE: "own norms"}),
        (challenger, 1, 0.805, {}),
    ]:
        study.add_trial(
            optuna.trial.create_trial(
                params=config,
                distributions=dict.fromkeys(config, distribution),
                value=value,
                user_attrs={CONFIG: config, RUN_INDEX: index, **attrs},
            )
        )
    chosen = summarize(study)["best_config"]
    assert chosen == own
    columns, _, text, _ = choice_map(study, study.trials, SLOTS[:2], chosen)
    first = dict(zip(columns, text[0], strict=True))
    assert first == {"batchnorm": "0.8 ★", "layernorm": "0.805"}
    html = write_report(study, tmp_path / "report.html").read_text()
    assert "marks the chosen config&#x27;s choice" in html or "marks the chosen config's" in html


IMPORTANCE_BARS = "(sums to 1)"  # the importance figure's axis title


def test_importance_from_two_complete_trials_is_not_shown_and_says_why(tmp_path):
    """Optuna's importance over two trials is noise presented as a finding: no bars, a line
    with the count it needs and the count the study has."""
    plans = [(params("batchnorm", "batchnorm", c), {}) for c in CHOICES[:2]]
    html = write_report(make_study(tmp_path, plans), tmp_path / "report.html").read_text()
    assert "Choice importance" in html and IMPORTANCE_BARS not in html
    assert "Not shown: it needs at least 10 distinct configs" in html
    assert "this study has 2 in 2 trial(s)" in html


def test_repeated_runs_of_few_configs_do_not_make_an_importance_estimate(tmp_path):
    """Twelve complete trials of three configs: runs of one config say nothing about which
    slot matters, so the count is of distinct configs."""
    plans = [(params("batchnorm", "batchnorm", CHOICES[i % 3]), {}) for i in range(12)]
    html = write_report(make_study(tmp_path, plans), tmp_path / "report.html").read_text()
    assert IMPORTANCE_BARS not in html and "this study has 3 in 12 trial(s)" in html


def test_importance_from_enough_configs_is_shown_with_its_count(tmp_path):
    configs = [(a, b, c) for a in CHOICES for b in CHOICES for c in CHOICES][:12]
    plans = [(params(*config), {}) for config in configs]
    html = write_report(make_study(tmp_path, plans), tmp_path / "report.html").read_text()
    assert IMPORTANCE_BARS in html and "Not shown" not in html
    assert "across the 12 feasible complete trials" in html
