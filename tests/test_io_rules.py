"""The exact rules of autonorm's file handling: what an atomic write leaves on disk when it
succeeds, fails or crashes, which folder name a study gets, where each password of a text is
masked, and the one-line YAML errors with their line and column."""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
import stat
import subprocess
import sys

import pytest

from autonorm import ConfigError
from autonorm._io import atomic_write, load_yaml, mask_password, safe_folder_name

# -- atomic writes -----------------------------------------------------------------------------


def test_atomic_write_makes_missing_folders_and_writes_text_as_utf8_and_bytes_as_given(tmp_path):
    text = tmp_path / "a" / "b" / "c" / "config.yaml"
    assert atomic_write(str(text), "name: naïve ✓\n") == text
    assert text.read_bytes() == "name: naïve ✓\n".encode()
    raw = tmp_path / "d" / "e" / "blob.bin"
    assert atomic_write(raw, b"\xff\x00\xfe") == raw
    assert raw.read_bytes() == b"\xff\x00\xfe"
    assert sorted(p.name for p in raw.parent.iterdir()) == ["blob.bin"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_a_written_file_gets_0666_less_the_umask_not_the_private_0600(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "summary.yaml", "a: 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_write_the_file_system_refuses_keeps_the_old_file_and_leaves_no_temporary_file(
    tmp_path,
):
    path = atomic_write(tmp_path / "summary.yaml", "old: 1\n")
    # RLIMIT_FSIZE makes the kernel refuse a file past 64 KiB (EFBIG), as a full disk or a quota
    # would, with no root; Python ignores the SIGXFSZ that comes with it, so write() raises
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        with pytest.raises(OSError) as err:
            atomic_write(path, b"x" * (1 << 18))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert err.value.errno == errno.EFBIG
    assert path.read_text() == "old: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.yaml"]


#: A process killed by the kernel in the middle of a write (SIGXFSZ at 64 KiB, its default
#: action restored: no handler runs, as with a power cut or SIGKILL).
CRASH = """
import resource, signal, sys
from autonorm._io import atomic_write
resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
atomic_write(sys.argv[1], b"x" * (1 << 18))
"""


def test_a_crash_mid_write_keeps_the_old_file_whole_and_leaves_a_hidden_temp_file_beside_it(
    tmp_path,
):
    path = atomic_write(tmp_path / "summary.yaml", "old: 1\n")
    elsewhere = tmp_path / "TMPDIR"  # the system's temporary folder, which is not beside it
    elsewhere.mkdir()
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(elsewhere)},
    )
    assert crashed.returncode == -signal.SIGXFSZ, crashed.stderr[-2000:]
    assert path.read_text() == "old: 1\n"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p not in (path, elsewhere))
    assert len(leftovers) == 1 and re.fullmatch(r"\.summary\.yaml\.\w{8}\.tmp", leftovers[0])
    assert (tmp_path / leftovers[0]).stat().st_size == 1 << 16  # the half-written one


# -- study names as folders --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("autonorm-Net", "autonorm-Net"),
        ("Xception.v2_1", "Xception.v2_1"),
        ("../evil", "_evil-2d6afc71"),
        ("", "study-e3b0c442"),
        ("..", "study-5ec1f7e7"),
        ("x" * 100, "x" * 100),
        ("x" * 101, "x" * 100 + "-c675a2e6"),
        ("a\udcffb", "a_b-253d5eff"),  # an undecodable byte of a command line (surrogateescape)
    ],
)
def test_a_study_name_becomes_itself_or_its_safe_form_with_a_short_hash(name, folder):
    assert safe_folder_name(name) == folder


# -- passwords ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        # a user with a space: the password patterns cannot mask it, only SQLAlchemy's reading
        ("postgresql://my user:secret@h/db", "postgresql://my user:***@h/db"),
        ("postgresql://my user:se:cr:et@h/db", "postgresql://my user:***@h/db"),
        (
            "postgresql://my user:one@h and postgresql://her user:two@h",
            "postgresql://my user:***@h and postgresql://her user:***@h",
        ),
        # a URL with no password, or one SQLAlchemy cannot read, before a password with a space
        (
            "http://user@host and postgresql://u:pass word@h/db",
            "http://user@host and postgresql://u:***@h/db",
        ),
        (
            "sqlite:////tmp/a:b.db, postgresql://u:pass word@h/db",
            "sqlite:////tmp/a:b.db, postgresql://u:***@h/db",
        ),
        (
            "my-db://u:x@h and postgresql://u:pass word@h/db",
            "my-db://u:***@h and postgresql://u:***@h/db",
        ),
        # a password that holds a scheme, then another URL
        (
            "postgresql://u:pw://x@h/db postgresql://v:pass word@h",
            "postgresql://u:***@h/db postgresql://v:***@h",
        ),
        # a port is no password
        ("postgresql://host:5432/db", "postgresql://host:5432/db"),
    ],
)
def test_each_password_of_a_text_is_masked_and_nothing_else(text, masked):
    assert mask_password(text) == masked


# -- one-line YAML errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slots: [unclosed\n", "expected ',' or ']', but got '<stream end>' (line 2, column 1)"),
        (
            "slots:\n  bn1: &x layernorm\n  bn2: *x\n",
            "aliases (*x) are not allowed; write the value out (line 3, column 8)",
        ),
        ("slots:\n  bn1: layernorm\n  bn1: batchnorm\n", "duplicated key 'bn1' (line 3, column 3)"),
        # an unhashable key (SafeLoader refuses it) does not hide a duplicated key after it
        ("{[1]: a, b: 1, b: 2}", "duplicated key 'b' (line 1, column 16)"),
        # an error with no problem or position of its own: the first line of its text
        ("a: \x00", "unacceptable character #x0000: special characters are not allowed"),
    ],
)
def test_a_yaml_error_is_its_problem_and_where_it_is_on_one_line(text, message):
    with pytest.raises(ConfigError) as err:
        load_yaml(text, "cfg.yaml")
    assert str(err.value) == f"cfg.yaml is not valid YAML: {message}"
