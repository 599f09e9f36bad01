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


#: ``scheme://user:password@`` (the user may be empty); the password runs to the token's last ``@``
#: so that a password with a raw ``@`` is masked whole.
_URL_PASSWORD = re.compile(r"""(://[^:/@\s'"]*:)[^\s'"]*@""")
#: ``password=...`` as a URL query parameter (``?password=``, ``&password=``) or a libpq keyword.
_KEY_PASSWORD = re.compile(r"""(?i)(\b(?:password|passwd|pwd)=)[^&;\s'"#]*""")


def mask_password(text: str) -> str:
    """Every password in ``text`` masked: ``postgresql://u:secret@h/db`` ->
    ``postgresql://u:***@h/db``, ``postgresql://:secret@h/db`` -> ``postgresql://:***@h/db``,
    ``...?sslmode=require&Password=secret`` -> ``...&Password=***`` (storage URLs are never
    printed or written in clear)."""
    return _KEY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))
