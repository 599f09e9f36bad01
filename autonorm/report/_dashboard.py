"""optuna-dashboard: the bundle's files as study artifacts and a study note that sums up the
search (optuna-dashboard itself is optional and imported on use)."""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from autonorm.report._format import choice_label, fmt, state_counts
from autonorm.report._summary import summarize
from autonorm.report._types import Summary

if TYPE_CHECKING:
    from optuna.artifacts import FileSystemArtifactStore

log = logging.getLogger(__name__)

#: Folder of the dashboard artifact store inside a bundle folder.
ARTIFACT_DIR = "artifacts"
#: First line of the study note autonorm writes; a note without it was written by a person and
#: is left alone.
NOTE_HEADING = "## autonorm summary"

_TEXT_SUFFIXES = {".yaml", ".yml", ".txt", ".md", ".log", ".toml", ".cfg", ".ini"}


def _md(value: object) -> str:
    """Inline code for a markdown table cell."""
    text = str(value).replace("`", "'").replace("|", "\\|").replace("\n", " ")
    return f"`{text}`"


def _what_lines(summary: Summary) -> list[str]:
    """``Model `x`, metric `y` (min).`` when the summary names them."""
    what = []
    if summary["model_class"]:
        what.append(f"model {_md(summary['model_class'])}")
    if summary["monitor"]:
        what.append(f"metric {_md(summary['monitor'])} ({summary['mode'] or '?'})")
    if not what:
        return []
    sentence = ", ".join(what)
    return [sentence[0].upper() + sentence[1:] + ".", ""]


def _result_lines(summary: Summary) -> list[str]:
    """The best value and config table, or the Pareto front's values."""
    pareto = summary["pareto"]
    if pareto is None:
        best, config = summary["best_value"], summary["best_config"]
        if best is None or config is None:
            return ["**No trial met the budget**: no best config.", ""]
        return [
            f"**Best value:** {best:.6g} (trial {summary['best_trial']})",
            "",
            "| slot | choice |",
            "| --- | --- |",
            *(f"| {_md(k)} | {_md(choice_label(v))} |" for k, v in config.items()),
            "",
        ]
    names = summary["objectives"]
    lines = [f"**Pareto front:** {len(pareto)} trials", ""]
    if pareto:
        lines += ["| trial | " + " | ".join(_md(n) for n in names) + " |"]
        lines += ["| --- " * (len(names) + 1) + "|"]
        for p in pareto:
            lines.append(f"| {p['trial']} | " + " | ".join(fmt(v) for v in p["values"]) + " |")
        lines.append("")
    return lines


def _note_markdown(summary: Summary, out_dir: Path, files: Sequence[Path]) -> str:
    counts = summary["trials"]
    lines = [NOTE_HEADING, "", *_what_lines(summary), *_result_lines(summary)]
    trials = state_counts(counts, always="complete")
    if counts["infeasible"]:
        trials += " (infeasible: over the budget)"
    lines += [f"**Trials:** {trials}", ""]
    if files:
        lines += ["**Artifacts:** " + ", ".join(_md(Path(f).name) for f in files), ""]
    lines.append(
        f"Written by autonorm from bundle {_md(out_dir)}; `report.html` there has the plots."
    )
    return "\n".join(lines) + "\n"


def _same_content(store: FileSystemArtifactStore, artifact_id: str, path: Path) -> bool:
    try:
        with store.open_reader(artifact_id) as reader:
            return reader.read() == path.read_bytes()
    except Exception:  # missing from this store, unreadable: treat as different
        return False


def _upload(study: optuna.Study, artifact_dir: Path, paths: list[Path]) -> None:
    """Upload the files whose name and bytes no artifact of the study has yet."""
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact

    store = FileSystemArtifactStore(str(artifact_dir))
    existing = get_all_artifact_meta(study)
    for path in paths:
        if any(
            meta.filename == path.name and _same_content(store, meta.artifact_id, path)
            for meta in existing
        ):
            log.debug("artifact %s is already attached to study %r", path.name, study.study_name)
            continue
        mimetype = None
        if mimetypes.guess_type(path.name)[0] is None and path.suffix.lower() in _TEXT_SUFFIXES:
            mimetype = "text/plain"  # shown in the browser rather than downloaded
        artifact_id = upload_artifact(
            study_or_trial=study, file_path=str(path), artifact_store=store, mimetype=mimetype
        )
        log.info("attached %s to study %r as artifact %s", path.name, study.study_name, artifact_id)


def _write_note(study: optuna.Study, note: Callable[[], str]) -> None:
    """Save ``note()`` as the study note unless a person wrote the current one (``note`` is
    called only then)."""
    try:
        from optuna_dashboard import get_note, save_note
    except ImportError:
        log.warning(
            "optuna-dashboard is not installed: no study note written "
            "(pip install autonorm[dashboard])"
        )
        return
    current = get_note(study)
    if current.strip() and not current.startswith(NOTE_HEADING):
        log.info("study %r has a note written by hand: left as it is", study.study_name)
        return
    save_note(study, note())


def attach_dashboard_artifacts(
    study: optuna.Study,
    out_dir: Path,
    files: list[Path],
    *,
    summary: Summary | None = None,
) -> None:
    """Upload ``files`` as study artifacts and write a study note for optuna-dashboard.

    The artifact store is the folder ``out_dir/artifacts`` (always created, even without
    files). A file whose name and bytes match an artifact already attached to the study is not
    uploaded again, so rebuilding a bundle does not pile up copies. The note (markdown: best
    value, best config table, trial counts) replaces an earlier autonorm note but never a note
    a person wrote in the dashboard. Open both with::

        optuna-dashboard sqlite:///OUT_DIR/study.db --artifact-dir OUT_DIR/artifacts

    Args:
        study: the study (its storage records the artifacts and the note).
        out_dir: the bundle folder.
        files: files to attach, e.g. ``best_config.yaml``.
        summary: the study's summary as :func:`~autonorm.report.write_summary` returned it
            (computed here when not given).

    Raises:
        FileNotFoundError: a file of ``files`` does not exist (nothing is uploaded then).
    """
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"cannot attach missing files to study {study.study_name!r}: {missing}"
        )
    artifact_dir = Path(out_dir) / ARTIFACT_DIR
    artifact_dir.mkdir(parents=True, exist_ok=True)
    _upload(study, artifact_dir, paths)

    def note() -> str:
        return _note_markdown(
            summary if summary is not None else summarize(study), Path(out_dir), paths
        )

    _write_note(study, note)
