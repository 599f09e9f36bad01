"""File writing shared by configs, reports and bundles, and the masking of what they show."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path``, then rename it over ``path``.

    A reader (or a crash) never sees a half-written file. The file gets the usual permissions
    (0666 less the umask), not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def mask_password(text: str) -> str:
    """Every URL password in ``text`` masked: ``postgresql://u:secret@h/db`` ->
    ``postgresql://u:***@h/db`` (storage URLs are never printed or written in clear)."""
    return re.sub(r"(://[^:/@\s]+:)[^@\s]*@", r"\1***@", text)
