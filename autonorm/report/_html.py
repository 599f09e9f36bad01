"""``report.html``: one self-contained page of tables and plotly figures that opens offline."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeAlias

import optuna
from optuna.trial import FrozenTrial

from autonorm._io import atomic_write
from autonorm._trial_keys import PERTURBED_CHOICES
from autonorm.report._choices import (
    choice_map_figure,
    importance_basis,
    importance_figure,
    importances,
    perturbation_evidence,
    perturbation_figure,
    slot_order,
)
from autonorm.report._cost import cost_table_html
from autonorm.report._figures import Figures, history_figure, intermediate_figure, pareto_figure
from autonorm.report._format import (
    budget_limit,
    choice_label,
    esc,
    fmt,
    papers,
    state_counts,
)
from autonorm.report._summary import FINISHED, objective_names, study_info, summarize
from autonorm.report._types import Config, StudyInfo, Summary, TrialCounts, slot_records
from autonorm.report._winners import feasible_complete, maximizes, pareto_trials

#: What a table cell holds.
Cell: TypeAlias = str | int | float | None

log = logging.getLogger(__name__)

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f3f3f3; padding: 0 0.2em; }
.note { background: #fff8e1; border-left: 4px solid #ffb300; padding: 0.5em 1em; }
.muted { color: #666; font-size: 0.9em; }
"""


class _Page:
    """What every section reads: the study, its trials, settings, summary, objective names and
    the figure renderer."""

    def __init__(self, study: optuna.Study, summary: Summary) -> None:
        self.study = study
        self.trials: list[FrozenTrial] = study.get_trials(deepcopy=False)
        self.info = study_info(study)
        self.summary = summary
        self.names = objective_names(study, self.info)
        self.finished = [t for t in self.trials if t.state in FINISHED]
        self.figures = Figures()


# -- building blocks ---------------------------------------------------------------------------


def _table(header: Sequence[str] | None, rows: Iterable[Sequence[Cell]]) -> str:
    """An HTML table; every cell is escaped, numbers are right-aligned."""
    parts = ["<table>"]
    if header:
        parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            css = ' class="num"' if numeric else ""
            cells.append(f"<td{css}>{esc(fmt(cell))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def _muted(text: str) -> str:
    """A caption (``text`` is HTML: escape what it quotes)."""
    return f'<p class="muted">{text}</p>'


# -- summary and configs -----------------------------------------------------------------------


def _study_rows(summary: Summary) -> list[tuple[str, Cell]]:
    """Summary rows from the study name to the best value (or the front's size)."""
    rows: list[tuple[str, Cell]] = [("study", summary["study_name"])]
    if summary["model_class"]:
        rows.append(("model", summary["model_class"]))
    if summary["monitor"]:
        rows.append(("metric", f"{summary['monitor']} ({summary['mode'] or '?'})"))
    rows.append(("objectives", ", ".join(summary["objectives"])))
    rows.append(("directions", ", ".join(summary["directions"])))
    if summary["slots"]:
        rows.append(("slots", len(summary["slots"])))
    pareto = summary["pareto"]
    if pareto is not None:
        rows.append(("Pareto front", f"{len(pareto)} trials"))
        return rows
    best, std = summary["best_value"], summary["best_std"]
    text = "-"
    if best is not None:
        spread = f" ± {std:.3g} over {summary['best_runs']} runs" if std is not None else ""
        text = f"{best:.6g}{spread} (trial {summary['best_trial']})"
    rows.append(("best value", text))
    certainty = summary["certainty"]
    if certainty:
        sure = certainty["p_better"]
        rows.append(
            (
                "choice",
                f"{certainty['gap']:.3g} better than {certainty['runner_up'] or 'the runner-up'}"
                + (f"; P(better) ≈ {sure:.2f}" if sure is not None else "; no repeated runs"),
            )
        )
    return rows


def _run_rows(summary: Summary) -> list[tuple[str, Cell]]:
    """Summary rows about the run: trials, budget, epochs, time."""
    counts = summary["trials"]
    rows: list[tuple[str, Cell]] = [("trials", state_counts(counts))]
    budget = summary["budget"]
    if isinstance(budget, dict) and any(v is not None for v in budget.values()):
        limits = ", ".join(f"{k}={budget_limit(k, v)}" for k, v in budget.items() if v is not None)
        rows.append(("budget", f"{limits}; rejected {counts['infeasible']} trials"))
    else:
        rows.append(("budget", f"none; {counts['infeasible']} trials marked infeasible"))
    epochs = summary["epochs"]
    if epochs["run"] or epochs["saved_by_pruning"]:
        text = f"{epochs['run']} trained"
        if epochs["saved_by_pruning"] is not None:
            text += f", {epochs['saved_by_pruning']} saved by pruning and the budget"
        if epochs["max_epochs"] is not None:
            text += f" (max_epochs={epochs['max_epochs']})"
        rows.append(("epochs", text))
    compute = summary["compute"]
    if compute["trainings"] is not None:
        text = f"{compute['trainings']:.2f} trainings ({compute['epochs']} epochs)"
        if compute["budget_trainings"]:
            text += f" of a budget of {compute['budget_trainings']:.2f}"
        if compute["reused_trials"]:
            text += f"; {compute['reused_trials']} repeated proposals reused"
        rows.append(("compute", text))
    rows.append(("trial time", f"{summary['trial_seconds'] or 0:.1f} s (sum over trials)"))
    return rows


def _summary_section(summary: Summary) -> str:
    parts = ["<h2>Summary</h2>", _table(None, _study_rows(summary) + _run_rows(summary))]
    if summary["infeasible_reasons"]:
        parts.append("<h3>Why trials were rejected</h3>")
        parts.append(_table(("reason", "trials"), summary["infeasible_reasons"].items()))
    if summary["candidates"]:
        parts.append(
            "<h3>Best configs by mean (runs with other seeds re-evaluate the leaders)</h3>"
        )
        parts.append(
            _table(
                ("config", "trials", "mean", "std", "runs"),
                (
                    (
                        c["label"],
                        ", ".join(map(str, c["trials"])),
                        c["mean"],
                        c["std"],
                        len(c["trials"]),
                    )
                    for c in summary["candidates"]
                ),
            )
        )
    if summary["baselines"]:
        parts.append("<h3>Baselines (warm start)</h3>")
        parts.append(
            _table(
                ("baseline", "trial", "state", "value"),
                ((b["label"], b["trial"], b["state"], b["value"]) for b in summary["baselines"]),
            )
        )
    return "\n".join(parts)


_CONFIG_HEADER = ("slot", "kind", "features", "layout", "choice")


def _config_rows(config: Config, info: StudyInfo) -> list[tuple[Cell, ...]]:
    """One row a slot: what the probe learned about it (when stored) and its choice."""
    details = slot_records(info.get("slots"))
    rows: list[tuple[Cell, ...]] = []
    for slot, value in config.items():
        d = details.get(slot)
        rows.append(
            (
                slot,
                d.get("kind", "") if d else "",
                d.get("num_features", "") if d else "",
                d.get("layout", "") if d else "",
                choice_label(value),
            )
        )
    return rows


def _config_section(summary: Summary, info: StudyInfo) -> str:
    pareto = summary["pareto"]
    if pareto is None:
        if summary["best_config"] is None:
            return ""
        plain = summary["deployable"]
        deploy = ""
        if plain is not None:  # SwitchableNorm won: the answer in plain layers, and its price
            value = "-" if plain["value"] is None else f"{plain['value']:.6g}"
            deploy = (
                f"<h2>Best config of plain layers (trial {esc(plain['trial'])}, "
                f"{esc(value)} over {esc(plain['runs'])} runs; deploy_config.yaml)</h2>"
                "<p>The best config keeps SwitchableNorm layers, which mix at inference (no "
                "folding, autonorm needed to run them); this one ships as plain torch layers.</p>"
                + _table(_CONFIG_HEADER, _config_rows(plain["config"], info))
                + cost_table_html(plain["inference_cost"])
            )
        chosen = [summary["best_config"]] + ([] if plain is None else [plain["config"]])
        return (
            f"<h2>Best config (trial {esc(summary['best_trial'])})</h2>"
            + _table(_CONFIG_HEADER, _config_rows(summary["best_config"], info))
            + cost_table_html(summary["inference_cost"])
            + deploy
            + "<h3>The chosen norms' papers</h3>"
            + _table(("choice", "paper"), papers(*chosen))
        )
    if not pareto:
        return ""
    parts = ["<h2>Pareto front</h2>"]
    parts.append(
        _table(("trial", *summary["objectives"]), ((p["trial"], *p["values"]) for p in pareto))
    )
    for p in pareto:
        parts.append(f"<details><summary>config of trial {esc(p['trial'])}</summary>")
        parts.append(_table(_CONFIG_HEADER, _config_rows(p["config"], info)))
        parts.append("</details>")
    return "\n".join(parts)


def _status_note(summary: Summary) -> str:
    counts: TrialCounts = summary["trials"]
    if counts["total"] == 0:
        return _note("The study holds no trials yet: nothing to report.")
    has_result = summary["best_value"] is not None or bool(summary["pareto"])
    if has_result:
        return ""
    if counts["complete"] == 0 and counts["infeasible"] == counts["total"]:
        return _note(
            f"All {counts['total']} trials were over the budget: no config met it. Loosen the "
            "budget or narrow the search space."
        )
    return _note(f"No trial completed within the budget ({state_counts(counts)}): no best config.")


# -- figure sections ---------------------------------------------------------------------------


def _history_section(page: _Page) -> list[str]:
    parts = ["<h2>Optimization history</h2>"]
    if not page.finished:
        return [*parts, _note("No finished trial yet.")]
    caption = (
        f"{esc(page.names[0])} per trial, with the best feasible value so far. Pruned and "
        "infeasible trials show their last reported value; those without one sit at the bottom."
    )
    figure = history_figure(page.study, page.trials, page.names)
    return [*parts, _muted(caption), page.figures.render(figure)]


def _pareto_section(page: _Page) -> list[str]:
    if len(page.study.directions) == 1:
        return []
    parts = ["<h2>Pareto front</h2>"]
    front = pareto_trials(page.study)
    fig = pareto_figure(page.trials, front, page.names)
    if fig is None:
        return [*parts, _note("No feasible complete trial: no Pareto front.")]
    caption = f"Feasible complete trials; {len(front)} on the front (red)."
    return [*parts, _muted(caption), page.figures.render(fig, height=520)]


def _importance_section(page: _Page) -> list[str]:
    parts = ["<h2>Choice importance</h2>"]
    try:
        found = importances(page.study, page.trials)
        if not found:
            raise ValueError("no parameter varied")
    except Exception as err:  # importance is a nicety: any failure becomes a note
        log.debug("parameter importance failed: %s", err, exc_info=True)
        return [*parts, _note(f"Not shown: {err}.")]
    basis, _ = importance_basis(page.trials)
    caption = (
        f"How much each searched parameter (a slot, or a group of tied slots) explains "
        f"{esc(page.names[0])} across the {len(basis)} feasible complete trials "
        "(optuna.importance.get_param_importances)."
    )
    height = max(300, 26 * len(found) + 120)
    figure = importance_figure(found, page.names[0])
    return [*parts, _muted(caption), page.figures.render(figure, height=height)]


def _perturbation_section(page: _Page) -> list[str]:
    found = perturbation_evidence(page.trials)
    if found is None:
        return []
    trial, evidence = found
    chosen = trial.user_attrs.get(PERTURBED_CHOICES) or {}
    maximize = maximizes(page.study)
    figure = perturbation_figure(evidence, chosen, page.names[0], maximize)
    caption = (
        f"Trial {trial.number}'s SwitchableNorm model, each slot forced onto one candidate at a "
        f"time: the cell is {esc(page.names[0])} after one validation pass (★: the slot's "
        f"choice; slots in the order they were decided, the more decided first). As trained "
        f"(every slot mixing): {fmt(evidence.get('base'))}; every slot on its choice: "
        f"{fmt(evidence.get('joint'))}. Validation passes, no training (Wang et al., ICLR "
        "2021: the mixing weight is not the candidate's strength)."
    )
    height = max(320, 30 * len(evidence.get("order", [])) + 160)
    return [
        "<h2>Per-slot evidence from the SwitchableNorm model</h2>",
        _muted(caption),
        page.figures.render(figure, height=height),
    ]


def _choice_map_section(page: _Page) -> list[str]:
    parts = ["<h2>Which choice won, per slot</h2>"]
    slots = slot_order(page.info, page.trials)
    chosen = page.summary["best_config"]
    fig = (
        choice_map_figure(page.study, page.trials, slots, page.names[0], chosen)
        if page.finished
        else None
    )
    if fig is None:
        return [*parts, _note("No finished trial with a config yet.")]
    star = (
        "★ marks the chosen config's choice, chosen on paired full runs rather than on a "
        "cell's best single value"
        if chosen
        else "no single config was chosen"
    )
    complete = len(feasible_complete(page.trials))
    caption = (
        f"Cell: the best {esc(page.names[0])} among the {complete} feasible complete trials "
        f"that gave the slot this choice (brighter is better; {star}; x: "
        "tried, but never in a feasible complete trial; empty: never tried). A cell is one "
        "run's value, not a mean: a cell that few trials tried is weak evidence (hover: how "
        "many)."
    )
    height = max(320, 30 * len(slots) + 160)
    return [*parts, _muted(caption), page.figures.render(fig, height=height)]


def _intermediate_section(page: _Page) -> list[str]:
    parts = ["<h2>Intermediate values</h2>"]
    fig = intermediate_figure(page.trials, page.names[0])
    if fig is None:
        return [*parts, _note("No trial reported intermediate values.")]
    caption = f"{esc(page.names[0])} reported after each epoch, one line per trial."
    return [*parts, _muted(caption), page.figures.render(fig)]


_FIGURE_SECTIONS: tuple[Callable[[_Page], list[str]], ...] = (
    _history_section,
    _pareto_section,
    _importance_section,
    _choice_map_section,
    _perturbation_section,
    _intermediate_section,
)


def _render_report(study: optuna.Study, summary: Summary) -> str:
    page = _Page(study, summary)
    body: list[str] = [
        f"<h1>autonorm report: {esc(study.study_name)}</h1>",
        _muted(
            f"written {esc(summary['written_at'])} from {len(page.trials)} trials; "
            "every figure is interactive (hover, zoom, click the legend)."
        ),
        _status_note(summary),
        _summary_section(summary),
        _config_section(summary, page.info),
    ]
    for section in _FIGURE_SECTIONS:
        body += section(page)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>autonorm report: {esc(study.study_name)}</title>\n<style>{_CSS}</style>\n"
        "</head>\n<body>\n" + "\n".join(part for part in body if part) + "\n</body>\n</html>\n"
    )


def write_report(study: optuna.Study, path: Path, *, summary: Summary | None = None) -> Path:
    """Write a self-contained HTML report of the study (atomically) and return its path.

    The page holds: the summary table (best value, trials by state, the budget and how many
    trials it rejected, with the reasons, epochs trained and saved, baselines); the best config
    per slot (or the Pareto front's configs); and plotly figures: the optimization history
    (value per trial, best-so-far line, pruned and infeasible trials marked), the Pareto front
    (multi-objective), the importance of each searched parameter, a slot x choice heatmap whose
    cells hold the best value reached by the feasible complete trials with that choice (the
    winner of each slot starred), and the intermediate values of each trial. plotly.js is
    inlined once, so the file opens offline. A study without trials, or without a single
    feasible one, still gets a page that says so.

    Args:
        study: the study.
        path: the HTML file to write (its folder is created when missing).
        summary: the study's summary as :func:`~autonorm.report.write_summary` returned it
            (computed here when not given).

    Returns:
        ``path``.
    """
    path = Path(path)
    atomic_write(path, _render_report(study, summary if summary is not None else summarize(study)))
    log.info("wrote %s", path)
    return path
