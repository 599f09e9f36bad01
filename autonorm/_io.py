"""File reading and writing shared by configs, spaces, reports and bundles (atomic writes,
strict YAML), and the masking of what they show."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from autonorm._errors import ConfigError


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


def safe_folder_name(name: str) -> str:
    """``name`` as one folder name that stays inside its parent: characters other than letters,
    digits, ``.``, ``_`` and ``-`` become ``_``, leading dots go (no ``..``, no hidden folder),
    and a changed name gets a short hash of the original, so that two names never share a
    folder.

    Example::

        >>> safe_folder_name("autonorm-Net"), safe_folder_name("../evil")
        ('autonorm-Net', '_evil-2d6afc71')
    """
    safe = re.sub(r"[^\w.-]", "_", name).lstrip(".")[:100]
    if safe == name and name:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe or 'study'}-{digest}"


#: ``scheme://user:password@`` (the user may be empty); the password runs to the token's last ``@``
#: so that a password with a raw ``@`` is masked whole.
_URL_PASSWORD = re.compile(r"""(://[^:/@\s'"]*:)[^\s'"]*@""")
#: ``password=...`` as a URL query parameter (``?password=``, ``&password=``) or a libpq keyword.
_KEY_PASSWORD = re.compile(r"""(?i)(\b(?:password|passwd|pwd)=)[^&;\s'"#]*""")


#: Where a URL starts in a text: its scheme (``postgresql+psycopg://``).
_SCHEME = re.compile(r"[A-Za-z][\w+.-]*://")


def mask_password(text: str) -> str:
    """Every password in ``text`` masked: ``postgresql://u:secret@h/db`` ->
    ``postgresql://u:***@h/db``, ``postgresql://:secret@h/db`` -> ``postgresql://:***@h/db``,
    ``...?sslmode=require&Password=secret`` -> ``...&Password=***`` (storage URLs are never
    printed or written in clear).

    Each URL's password is the one SQLAlchemy's own parser (``make_url``) reads from it, with
    any character it accepts (quotes, spaces, ``:``, ``/``, ``#``, percent escapes), masked as
    written; then, for strings that are no URL SQLAlchemy reads (a raw ``@`` in a password, a
    libpq keyword string), the password patterns above.
    """
    return _KEY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", _mask_url_passwords(text)))


def _mask_url_passwords(text: str) -> str:
    """Each ``scheme://user:password@`` of ``text`` with the password SQLAlchemy parses there
    replaced by ``***``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    out, done = [], 0
    for scheme in _SCHEME.finditer(text):
        if scheme.start() < done:
            continue
        userinfo, at, _ = text[scheme.end() :].partition("@")
        if not at or ":" not in userinfo:
            continue
        try:  # SQLAlchemy decides what the user and the password are
            url = make_url(f"{scheme.group()}{userinfo}@host")
        except (ArgumentError, ValueError):
            continue
        if url.password is None or url.username is None:
            continue
        start = scheme.end() + userinfo.index(":") + 1
        end = scheme.end() + len(userinfo)
        out.append(text[done:start] + "***")
        done = end
    return "".join(out) + text[done:]


class _StrictLoader(yaml.SafeLoader):
    """Safe loading that refuses aliases and duplicated mapping keys.

    An alias expands where it is used: a few hundred bytes of nested aliases make a value of
    millions of items (the "billion laughs"), so autonorm's files may not use them. A duplicated
    key would silently keep its last value.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases (*{event.anchor}) are not allowed; write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicated = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: SafeLoader refuses it below
                    continue
                if duplicated:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicated key {key!r}", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


def _one_line(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def load_yaml(text: str, source: str) -> Any:
    """``text`` read with safe YAML loading, refusing aliases and duplicated keys.

    Raises:
        ConfigError: ``"<source> is not valid YAML: <problem> (line L, column C)"``, one line.
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {_one_line(err)}") from None
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply to be a config") from None


def load_json(text: str, source: str) -> Any:
    """``text`` read as JSON, refusing duplicated keys.

    Raises:
        ConfigError: ``"<source> is not valid JSON: <problem>"``.
    """

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) < len(pairs):  # linear: the first key seen twice is named
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise ValueError(f"duplicated key {key!r}")
                seen.add(key)
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except ValueError as err:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{source} is not valid JSON: {err}") from None
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply to be a config") from None
