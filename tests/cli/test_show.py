"""``autonorm show``: a config's slot table, and one line at once for a YAML alias bomb."""

from __future__ import annotations

import time


def test_show_prints_the_slot_table(bundle, workdir, installed_cli):
    out, _ = bundle
    result = installed_cli(["show", str(out / "best_config.yaml")], workdir)
    assert result.returncode == 0
    assert "bn" in result.stdout and "norm" in result.stdout


def test_show_on_an_alias_bomb_ends_at_once_with_one_line(tmp_path, alias_bomb, autonorm_cli):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb)
    started = time.perf_counter()
    result = autonorm_cli(["show", str(path)], tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "aliases (*a) are not allowed" in lines[0], lines
    assert time.perf_counter() - started < 30  # the interpreter's start; the load is instant


def test_show_prints_user_text_as_written_never_as_markup_or_escapes(tmp_path, autonorm_cli):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        'slots:\n  "[bold]head[/bold]": layernorm\n'
        'metadata:\n  note: "[red]danger[/red] \\e[2J\\e[31mred"\n'
    )
    result = autonorm_cli(["show", str(path)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[bold]head[/bold]" in result.stdout  # the slot's own name, not bold markup
    assert "[red]danger[/red]" in result.stdout
    assert "\x1b" not in result.stdout  # the escape shown, not sent to the terminal
    assert "\\x1b[2J" in result.stdout
