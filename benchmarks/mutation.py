"""Mutation testing (mutmut) of the modules where a silent mistake costs most.

For each target module a scratch copy of the checkout gets a ``[tool.mutmut]`` section that
mutates that module only and selects the tests that exercise it; ``mutmut run`` then runs, for
each mutant, the selected tests that call the mutated function. A mutant the tests do not fail
*survived*. Survivors listed in ``benchmarks/mutation_equivalents.yaml`` (mutant name: why it
cannot change behaviour) count as equivalent; any other survivor is a gap in the tests.

Score = (killed + timed out) / (mutants - equivalent - not run). "No tests" mutants sit in code
that the selected tests never call in their own process (code that only runs in a worker
subprocess, for one): they are counted against the score.

Writes ``benchmarks/results/mutation/<target>.json`` (counts, survivors with their diffs) and
``benchmarks/results/mutation.md`` (the table of every target run so far, and the survivors).

Usage (outside CI; about 10-40 minutes a target on 2 cores)::

    pip install -e '.[dev,mutation]'
    python -m benchmarks.mutation                    # every target
    python -m benchmarks.mutation plan winners       # some
    python -m benchmarks.mutation --list             # the targets and their tests
    python -m benchmarks.mutation plan --recheck     # survivors, untested, timed out: again

Set ``AUTONORM_TEST_POSTGRES_URL`` (``eval "$(.ci/postgres.sh start)"``) to let the PostgreSQL
variants of the lock tests run too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EQUIVALENTS = ROOT / "benchmarks" / "mutation_equivalents.yaml"


@dataclass(frozen=True)
class Target:
    module: str  #: the file mutated, relative to the checkout
    tests: tuple[str, ...]  #: the test files (or node ids) whose calls select the tests to run


TARGETS: dict[str, Target] = {
    "plan": Target(
        "autonorm/search/_plan.py",
        (
            "tests/search/test_plan.py",
            "tests/search/test_plan_directions.py",
            "tests/search/test_plan_confirm.py",
            "tests/search/test_plan_rules.py",
            "tests/search/test_learn_budget.py",
        ),
    ),
    "winners": Target(
        "autonorm/report/_winners.py",
        (
            "tests/report/test_winners.py",
            "tests/report/test_summary.py",
            "tests/report/test_winners_rules.py",
        ),
    ),
    "workers": Target(
        "autonorm/search/_workers.py",
        (
            "tests/search/test_claim_lock.py",
            "tests/search/test_heartbeat_refresh.py",
            "tests/search/test_trial_exit.py::test_sys_exit_in_user_code_is_no_interrupt_but_lightnings_ctrl_c_is",
            "tests/search/test_workers.py::test_stale_trial_fails_once_and_runs_again_once",
            "tests/search/test_workers.py::test_search_waits_for_a_lost_trial_then_reruns_it_and_warns_about_sqlite",
            "tests/search/test_workers.py::test_bad_worker_options_are_refused",
            "tests/search/test_lock_and_heartbeat_rules.py",
            "tests/search/test_interrupt_rules.py",
            "tests/search/test_stale_without_heartbeat.py",
        ),
    ),
    "storage": Target(
        "autonorm/search/_storage.py",
        # not test_resume.py: its real searches reach the same rules in minutes per mutant
        ("tests/search/test_storage.py", "tests/search/test_storage_rules.py"),
    ),
    "fast_ops": Target(
        "autonorm/norms/_fast_ops.py",
        (
            "tests/norms/test_fast_paths.py",
            "tests/norms/test_properties.py",
            # not the torch.compile / torch.export case: neither traces mutmut's trampolines
            "tests/norms/test_traced_paths.py::test_the_traced_path_computes_what_the_fused_one_does",
            "tests/norms/test_traced_paths.py::test_half_precision_and_autocast_keep_torch_s_layers",
        ),
    ),
    "switchable_ops": Target(
        "autonorm/norms/_switchable_ops.py",
        (
            "tests/norms/test_switchable.py",
            "tests/norms/test_properties.py",
            "tests/norms/test_traced_paths.py",
        ),
    ),
    "switchable": Target(
        "autonorm/norms/_switchable.py",
        (
            "tests/norms/test_switchable.py",
            "tests/norms/test_sparsestmax.py",
            "tests/norms/test_properties.py",
            "tests/norms/test_traced_paths.py",
            "tests/surgery/test_switchable_and_derive.py",
            "tests/surgery/test_pretrained_init.py",
        ),
    ),
    "apply": Target(
        "autonorm/surgery/_apply.py",
        (
            "tests/surgery/test_apply_config.py",
            "tests/surgery/test_weight_norms.py",
            "tests/surgery/test_switchable_and_derive.py",
            "tests/surgery/test_pretrained_init.py",
            "tests/surgery/test_transformer_fast_path.py",
            "tests/surgery/test_frozen_and_settings.py",
            "tests/surgery/test_records.py",
            "tests/surgery/test_model_class_check.py",
            "tests/test_config_properties.py",
        ),
    ),
    "deploy": Target(
        "autonorm/deploy.py",
        (
            "tests/test_deploy.py",
            "tests/test_deploy_inputs.py",
            "tests/test_fold_output_comparison.py",
            "tests/test_deploy_rules.py",
        ),
    ),
    "io": Target(
        "autonorm/_io.py",
        ("tests/test_io.py", "tests/test_bad_input.py", "tests/test_io_rules.py"),
    ),
}

#: mutmut's exit codes, as its ``stats.status_by_exit_code`` reads them (a crash, which mutmut
#: calls suspicious, is a test run the mutant failed)
STATUS = {
    1: "killed",
    3: "killed",
    -11: "killed",  # the mutant crashed the test process (SIGSEGV: a kernel given wrong sizes)
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    None: "not run",
}


def mutmut_section(target: Target) -> str:
    """The ``[tool.mutmut]`` section of ``target``'s scratch checkout."""
    settings = {
        "source_paths": ["autonorm"],
        "only_mutate": [target.module],
        "pytest_add_cli_args_test_selection": list(target.tests),
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
        # torch is not fork-safe once it has run: each mutant forks from a server that only imported
        "process_isolation": "forkserver",
        # a mutant that loops forever costs multiplier x its tests' time: 15x (the default) made a
        # few loops an hour of a 2-core machine; 3x plus 10 s still never times out a real run
        "timeout_multiplier": 3.0,
        "timeout_constant": 10.0,
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def checkout_files(under: str | None = None) -> list[Path]:
    """The checkout's files (tracked and untracked, not ignored), all or those ``under`` a folder."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z", *([under] if under else [])],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    return [Path(os.fsdecode(raw)) for raw in listed if raw and (ROOT / os.fsdecode(raw)).is_file()]


def copy_files(paths: list[Path], *destinations: Path) -> None:
    for path in paths:
        for where in destinations:
            (where / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, where / path)


def scratch_checkout(name: str, target: Target, workdir: Path) -> Path:
    """A fresh copy of the checkout for ``name``, with its ``[tool.mutmut]`` section."""
    where = workdir / name
    shutil.rmtree(where, ignore_errors=True)
    copy_files(checkout_files(), where)
    with open(where / "pyproject.toml", "a") as f:
        f.write(mutmut_section(target))
    # made now, not by mutmut: a sys.path entry missing at start-up stays unsearched (tests import)
    (where / "mutants").mkdir()
    # there, not in a folder of its own: the CLI tests put the checkout alone on PYTHONPATH
    (where / "mutants" / "sitecustomize.py").write_text(SUBPROCESS_SITE)
    return where


#: ``sitecustomize`` of every Python process of a run. mutmut's stats pass records which tests
#: call each function in its own pytest process; a subprocess a test starts in another folder
#: (the CLI, a worker pool) finds no ``[tool.mutmut]`` there and would fail, so it runs the
#: original code then. Mutants themselves reach subprocesses (``MUTANT_UNDER_TEST`` is inherited).
SUBPROCESS_SITE = """import os

if os.environ.get("MUTANT_UNDER_TEST") == "stats":
    try:
        with open("pyproject.toml") as f:
            configured = "[tool.mutmut]" in f.read()
    except OSError:
        configured = False
    if not configured:
        os.environ["MUTANT_UNDER_TEST"] = ""
"""


def refreshed_tests(name: str, target: Target, workdir: Path) -> Path:
    """``name``'s scratch checkout of the last run, with the checkout's current tests (the
    mutants stay: the module must be unchanged since)."""
    where = workdir / name
    if not (where / "mutants" / f"{target.module}.meta").exists():
        raise SystemExit(f"--recheck {name}: no earlier run in {where}")
    if (where / target.module).read_bytes() != (ROOT / target.module).read_bytes():
        raise SystemExit(f"--recheck {name}: {target.module} changed since its run; run it anew")
    copy_files(checkout_files("tests"), where, where / "mutants")
    pyproject = (ROOT / "pyproject.toml").read_text() + mutmut_section(target)
    for folder in (where, where / "mutants"):
        (folder / "pyproject.toml").write_text(pyproject)
    (where / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)  # new tests: new stats
    return where


def statuses_of(where: Path, target: Target) -> dict[str, str]:
    meta = json.loads((where / "mutants" / f"{target.module}.meta").read_text())
    return {key: STATUS.get(code, "suspicious") for key, code in meta["exit_code_by_key"].items()}


def run_target(name: str, target: Target, workdir: Path, workers: int, recheck: bool) -> dict:
    """Run mutmut on ``target`` (with ``recheck``: only the last run's survivors, the mutants
    no test reached and those that timed out, against the current tests); its counts and
    survivors."""
    if recheck:
        where = refreshed_tests(name, target, workdir)
        # new tests may reach code no test called before; a timeout may be a loaded machine
        again = ("survived", "no tests", "timeout")
        names = [k for k, status in statuses_of(where, target).items() if status in again]
    else:
        where, names = scratch_checkout(name, target, workdir), []
    env = dict(os.environ)
    # the tests' subprocesses (CLI, worker pools) import the mutated copy too
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(where / "mutants"), env.get("PYTHONPATH")])
    )
    env.pop("CI", None)  # a skipped PostgreSQL test is no failure here
    started = time.monotonic()
    log = where / "mutmut.log"
    with open(log, "a" if recheck else "w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(workers), *names],
            cwd=where,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        raise SystemExit(f"mutmut failed on {name} (exit {done.returncode}); its log: {log}")
    statuses = statuses_of(where, target)
    survived = sorted(k for k, status in statuses.items() if status == "survived")
    survivors = [{"name": key, "diff": show(where, key)} for key in survived]
    minutes = (time.monotonic() - started) / 60
    if recheck:  # the run's time: the first run's and this one's
        saved = RESULTS / "mutation" / f"{name}.json"
        minutes += json.loads(saved.read_text())["minutes"] if saved.exists() else 0
    return {
        "module": target.module,
        "tests": list(target.tests),
        "counts": dict(Counter(statuses.values())),  # as mutmut has them: equivalents survived
        "minutes": round(minutes, 1),
        "survivors": survivors,
    }


def show(where: Path, key: str) -> str:
    """The diff of mutant ``key`` (``mutmut show``)."""
    shown = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", key], cwd=where, capture_output=True, text=True
    )
    return shown.stdout.strip()


def score(counts: Counter) -> float | None:
    scored = sum(counts.values()) - counts["equivalent"] - counts["not run"] - counts["skipped"]
    return round((counts["killed"] + counts["timeout"]) / scored, 4) if scored else None


def load_equivalents() -> dict[str, str]:
    if not EQUIVALENTS.exists():
        return {}
    return yaml.safe_load(EQUIVALENTS.read_text()) or {}


def write_table() -> Path:
    """``results/mutation.md`` from every target's saved result and the equivalents listed now."""
    equivalents = load_equivalents()
    rows, sections = [], []
    for name in TARGETS:
        path = RESULTS / "mutation" / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        c = Counter(r["counts"])
        why = {s["name"]: equivalents.get(s["name"]) for s in r["survivors"]}
        c["equivalent"] = sum(reason is not None for reason in why.values())
        c["survived"] -= c["equivalent"]
        scored = score(c)
        pct = "n/a" if scored is None else f"{100 * scored:.1f}%"
        rows.append(
            f"| `{r['module']}` | {sum(c.values())} | {c['killed'] + c['timeout']} | "
            f"{c['survived']} | {c['equivalent']} | {c['no tests']} | **{pct}** | {r['minutes']} |"
        )
        for s in r["survivors"]:
            label = f"equivalent: {why[s['name']]}" if why[s["name"]] else "survived"
            sections.append(f"### `{s['name']}` ({label})\n\n```diff\n{s['diff']}\n```\n")
    text = (
        "# Mutation testing\n\nWritten by `python -m benchmarks.mutation` (mutmut). Score = "
        "(killed + timed out) / (mutants - equivalent).\n\n"
        "| module | mutants | killed | survived | equivalent | no tests | score | minutes |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + "\n\n## Survivors\n\n"
        + ("\n".join(sections) or "None.\n")
    )
    out = RESULTS / "mutation.md"
    out.write_text(text)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "targets", nargs="*", metavar="TARGET", help=f"of {', '.join(TARGETS)}; default: all"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/autonorm-mutation"))
    parser.add_argument("--list", action="store_true", help="print the targets and their tests")
    parser.add_argument(
        "--recheck",
        action="store_true",
        help="run only the last run's survivors again, against the current tests (the module "
        "must be unchanged since)",
    )
    parser.add_argument("--table", action="store_true", help="only rewrite results/mutation.md")
    args = parser.parse_args(argv)
    if args.table:
        print(f"wrote {write_table()}")
        return 0
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; the targets: {', '.join(TARGETS)}")
    if args.list:
        for name, t in TARGETS.items():
            print(f"{name:15} {t.module:36} {' '.join(t.tests)}")
        return 0
    (RESULTS / "mutation").mkdir(parents=True, exist_ok=True)
    for name in args.targets or TARGETS:
        result = run_target(name, TARGETS[name], args.workdir, args.workers, args.recheck)
        (RESULTS / "mutation" / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"{name}: {result['counts']} ({result['minutes']} min)")
    print(f"wrote {write_table()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
