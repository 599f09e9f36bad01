"""The export bundle: ``best_config.yaml``, ``pareto.yaml``, ``summary.json``, ``report.html``,
``storage.txt`` and the dashboard artifacts, written from a study; and :class:`SearchResult`."""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
import platform
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml

from autonorm._errors import AutoNormError
from autonorm._io import atomic_write, mask_password
from autonorm._trial_keys import CONFIG, STUDY_INFO
from autonorm.callbacks import structure_from_checkpoint
from autonorm.config import PROBE_KEY, NormConfig, SlotRecord
from autonorm.report import (
    ARTIFACT_DIR,
    SUMMARY_FILE,
    Summary,
    attach_dashboard_artifacts,
    config_runs,
    deployable_runs,
    pareto_trials,
    trial_config,
    write_report,
    write_summary,
)
from autonorm.search._storage import SQLITE_FILE, journal_path, sqlite_url
from autonorm.search._training import BEST_CHECKPOINT_FILE, LEARNED_CONFIG_FILE

log = logging.getLogger(__name__)

BEST_CONFIG_FILE = "best_config.yaml"
#: When the best config keeps a SwitchableNorm: the best config of plain layers.
DEPLOY_CONFIG_FILE = "deploy_config.yaml"
PARETO_FILE = "pareto.yaml"
#: Names an external storage (its password masked) and the study, for ``autonorm report``.
STORAGE_FILE = "storage.txt"
REPORT_FILE = "report.html"


@dataclass
class SearchResult:
    """What :func:`search` found.

    Attributes:
        best_config: the best feasible config, or None when no trial met the budget.
        best_value: its metric value, the mean of its runs when re-evaluated (None without a
            best config).
        best_trial: its Optuna trial.
        study: the ``optuna.Study``.
        out_dir: the export bundle's folder.
        pareto: multi-objective only: ``[(config, values), ...]`` on the Pareto front.
        summary: the machine-readable summary also written to ``summary.json`` (None for a
            worker that leaves the bundle to another process).
    """

    best_config: NormConfig | None
    best_value: float | None
    best_trial: optuna.trial.FrozenTrial | None
    study: optuna.Study
    out_dir: Path
    pareto: list[tuple[NormConfig, list[float]]] | None = None
    summary: Summary | None = None


def _probe_records(slots: Any) -> dict[str, Any]:
    """``{slot name: probe record}`` from the study's slot list (a study written before
    records were kept, or a malformed entry, gives none for that slot)."""
    records: dict[str, Any] = {}
    for entry in slots if isinstance(slots, list) else []:
        try:
            records[str(entry["name"])] = SlotRecord.from_value(entry).to_value()
        except (KeyError, TypeError, ValueError):
            continue
    return records


def _trial_config(trial: optuna.trial.FrozenTrial, metadata: dict[str, Any]) -> NormConfig:
    return NormConfig(dict(trial.user_attrs[CONFIG]), metadata=metadata)


def _versions() -> dict[str, str]:
    from autonorm import __version__
    from autonorm._lightning import installed_namespaces

    lightning = {  # each installed namespace: pytorch_lightning, lightning
        mod.__name__.split(".")[0]: str(getattr(mod, "__version__", "?"))
        for mod in installed_namespaces()
    }
    return {
        "autonorm": __version__,
        "torch": str(torch.__version__),
        "optuna": optuna.__version__,
        **lightning,
        "python": platform.python_version(),
    }


def _best_of(
    study: optuna.Study,
) -> tuple[
    optuna.trial.FrozenTrial | None,
    NormConfig | None,
    list[tuple[NormConfig, list[float]]] | None,
]:
    """(best trial, best config, None) of a single-objective study, (None, None, Pareto
    front) of a multi-objective one; configs carry the study's metadata."""
    info = dict(study.user_attrs.get(STUDY_INFO) or {})
    base_meta = {
        "metric": info.get("monitor"),
        "mode": info.get("mode"),
        "budget": info.get("budget"),
        "space": info.get("space"),
        "model_class": info.get("model_class"),
        "study_name": study.study_name,
        "versions": _versions(),
    }
    probe = _probe_records(info.get("slots"))
    if probe:  # a fresh model without an example input is read as the search's probe read it
        base_meta[PROBE_KEY] = probe
    if len(study.directions) == 1:
        runs = config_runs(study)
        if not runs:
            return None, None, None
        best = copy.deepcopy(runs[0].trials[0])
        meta = {
            **base_meta,
            "source": "search",
            "trial": best.number,
            "value": runs[0].mean,
            "runs": len(runs[0].trials),
            "std": runs[0].std,
        }
        return best, _trial_config(best, meta), None
    pareto = []
    for trial in pareto_trials(study):
        meta = {**base_meta, "source": "search", "trial": trial.number, "values": trial.values}
        pareto.append((_trial_config(trial, meta), list(trial.values)))
    return None, None, pareto


def _deploy_config(study: optuna.Study, best: NormConfig | None) -> NormConfig | None:
    """The best config of plain layers, when ``best`` keeps a SwitchableNorm (None else)."""
    if best is None or len(study.directions) != 1:
        return None
    plain = deployable_runs(config_runs(study), trial_config)
    if plain is None:
        return None
    meta = {
        **{k: v for k, v in best.metadata.items() if k not in ("trial", "value", "runs", "std")},
        "source": "search (plain layers)",
        "trial": plain.trials[0].number,
        "value": plain.mean,
        "runs": len(plain.trials),
        "std": plain.std,
    }
    return _trial_config(plain.trials[0], meta)


def worker_result(study: optuna.Study, out_dir: Path) -> SearchResult:
    """The result of a worker that leaves the bundle to another process."""
    best, best_config, pareto = _best_of(study)
    value = best_config.metadata["value"] if best_config is not None else None
    return SearchResult(best_config, value, best, study, Path(out_dir), pareto, None)


@contextlib.contextmanager
def _export_lock(out_dir: Path) -> Iterator[None]:
    """Workers finishing together write one bundle folder in turn, not at once."""
    try:
        import fcntl
    except ImportError:  # Windows: no file locks; the writes themselves are atomic
        yield
        return
    fd = os.open(out_dir / ".export.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def export_bundle(
    study: optuna.Study,
    out_dir: Path,
    *,
    storage: Any = None,
    elapsed: float | None = None,
    retrain: Callable[[NormConfig], Path] | None = None,
) -> SearchResult:
    """Write ``best_config.yaml``, ``summary.json``, ``report.html``, ``pareto.yaml`` (multi-
    objective), ``storage.txt`` (external storage, its password masked) and the dashboard
    artifacts into ``out_dir``."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with _export_lock(out_dir):
            _replace_other_bundle(out_dir, study.study_name)
            return _export(study, out_dir, storage=storage, elapsed=elapsed, retrain=retrain)
    except OSError as err:
        if err.errno not in _FULL_OR_READ_ONLY:
            raise
        where = err.filename or out_dir
        raise AutoNormError(
            f"cannot write the bundle of study {study.study_name!r} in {str(out_dir)!r}: "
            f"{err.strerror} ({where}); the study keeps its trials: free space or make the "
            "folder writable and rerun the same command (or `autonorm report`) to write it"
        ) from None


#: Why writing a bundle may fail with the study intact: a full disk, a read-only filesystem,
#: no permission.
_FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _bundle_study(out_dir: Path) -> str | None:
    """The study whose bundle ``out_dir`` holds (its ``summary.json``), or None."""
    try:
        name = json.loads((out_dir / SUMMARY_FILE).read_text()).get("study_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _replace_other_bundle(out_dir: Path, study_name: str) -> None:
    """A bundle folder reused by another study: say so, and remove the files of the old study
    that this export may not write (a best config, a Pareto front), never leaving study A's
    config next to study B's report."""
    other = _bundle_study(out_dir)
    if other is None or other == study_name:
        return
    log.warning(
        "out_dir %s held the bundle of study %r: replaced by the bundle of study %r (the old "
        "study keeps its trials in its storage, where `autonorm report` reads them)",
        out_dir,
        other,
        study_name,
    )
    for name in (
        BEST_CONFIG_FILE,
        DEPLOY_CONFIG_FILE,
        PARETO_FILE,
        STORAGE_FILE,
        BEST_CHECKPOINT_FILE,
        LEARNED_CONFIG_FILE,
    ):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / ARTIFACT_DIR, ignore_errors=True)


def _drop_stale_files(study: optuna.Study, out_dir: Path, best: NormConfig | None) -> None:
    """Remove what an earlier export or run of this folder left that this study's answer no
    longer vouches for: a learned config the study did not learn, a checkpoint of another
    config than the best (a retraining cost a training: said in the log)."""
    info = study.user_attrs.get(STUDY_INFO) or {}
    if not info.get("learned_config"):
        (out_dir / LEARNED_CONFIG_FILE).unlink(missing_ok=True)
    checkpoint = out_dir / BEST_CHECKPOINT_FILE
    if not checkpoint.is_file():
        return
    try:
        entry = structure_from_checkpoint(checkpoint)
    except Exception:  # unreadable: no config vouches for it
        entry = None
    trained = None if entry is None else entry[1]
    if best is not None and trained is not None and trained == best:
        return
    checkpoint.unlink()
    log.warning(
        "removed %s: it trained %s, not the best config of study %r (retrain to get one)",
        checkpoint,
        "an unknown config" if trained is None else "another config",
        study.study_name,
    )


def _export(
    study: optuna.Study,
    out_dir: Path,
    *,
    storage: Any,
    elapsed: float | None,
    retrain: Callable[[NormConfig], Path] | None,
) -> SearchResult:
    best, best_config, pareto = _best_of(study)
    best_value = best_config.metadata["value"] if best_config is not None else None
    written: list[Path] = []
    if best_config is not None:
        written.append(best_config.save(out_dir / BEST_CONFIG_FILE))
    else:  # no feasible trial: no config from an earlier export may stay
        (out_dir / BEST_CONFIG_FILE).unlink(missing_ok=True)
    deploy = _deploy_config(study, best_config)
    if deploy is not None:  # the best keeps a SwitchableNorm: the answer in plain layers too
        written.append(deploy.save(out_dir / DEPLOY_CONFIG_FILE))
    else:
        (out_dir / DEPLOY_CONFIG_FILE).unlink(missing_ok=True)
    if pareto is not None:
        front = [
            {"trial": c.metadata["trial"], "values": v, "config": c.to_dict()} for c, v in pareto
        ]
        written.append(atomic_write(out_dir / PARETO_FILE, yaml.safe_dump(front, sort_keys=False)))
    write_storage_file(out_dir, storage, study.study_name)
    _drop_stale_files(study, out_dir, best_config)
    if best_config is not None and retrain is not None:
        try:
            written.append(retrain(best_config))
        except BaseException:  # the bundle keeps its report and summary; the error goes on
            summary = write_summary(study, out_dir, elapsed=elapsed)
            write_report(study, out_dir / REPORT_FILE, summary=summary)
            raise
    summary = write_summary(study, out_dir, elapsed=elapsed)
    write_report(study, out_dir / REPORT_FILE, summary=summary)
    try:
        attach_dashboard_artifacts(study, out_dir, written, summary=summary)
    except Exception as err:  # artifacts are a convenience: never lose the bundle over them
        log.warning("could not attach dashboard artifacts: %s", err)
    if best is None and len(study.directions) == 1:
        log.warning(
            "no trial of study %r met the budget: no best config (see %s)",
            study.study_name,
            out_dir / REPORT_FILE,
        )
    return SearchResult(best_config, best_value, best, study, out_dir, pareto, summary)


def write_storage_file(out_dir: Path, storage: Any, study_name: str) -> None:
    """``storage.txt``: the storage of a study kept outside the bundle (its password masked, a
    file's path absolute: ``autonorm report`` may run from another folder), so that ``autonorm
    report <bundle>`` finds it; none for the bundle's own SQLite file (an earlier one goes)."""
    path = out_dir / STORAGE_FILE
    if storage is None or (
        isinstance(storage, str)
        and storage.startswith("sqlite:///")
        and Path(storage[len("sqlite:///") :]).resolve().parent == out_dir.resolve()
    ):
        path.unlink(missing_ok=True)
        return
    text = (
        mask_password(absolute_storage(os.fspath(storage)))
        if isinstance(storage, (str, os.PathLike))
        else type(storage).__name__
    )
    atomic_write(path, f"{text}\nstudy_name: {study_name}\n")


def absolute_storage(storage: str) -> str:
    """A storage with a file's path made absolute: a journal file, ``sqlite:///relative.db``;
    a server URL as given."""
    if storage.startswith("sqlite:///") and storage != "sqlite:///:memory:":
        return "sqlite:///" + os.path.abspath(storage[len("sqlite:///") :])
    journal = journal_path(storage)
    return storage if journal is None else str(journal)


def bundle_storage(folder: Path) -> tuple[str, str | None]:
    """(storage, study name or None) of a bundle folder: the storage its ``storage.txt``
    names (the study was kept outside the bundle: a ``study.db`` beside it is another study's),
    else its own SQLite file.

    Raises:
        AutoNormError: the folder is no bundle, or ``storage.txt``'s password is masked.
    """
    if not (folder / STORAGE_FILE).is_file() and (folder / SQLITE_FILE).is_file():
        return sqlite_url(folder), None
    if not (folder / STORAGE_FILE).is_file():
        raise AutoNormError(
            f"{str(folder)!r} holds neither {SQLITE_FILE} nor {STORAGE_FILE}: not an autonorm bundle"
        )
    lines = (folder / STORAGE_FILE).read_text().splitlines()
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("study_name:")), None)
    if "***" in lines[0]:
        raise AutoNormError(
            f"{folder}/{STORAGE_FILE} names a storage with a masked password; pass the storage URL"
        )
    return lines[0], name
