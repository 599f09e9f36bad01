"""A griffe extension for the API reference: the package's docstrings are Google style with
Sphinx roles (``:class:`~autonorm.Budget```) and ``Example::`` blocks, which doctest and IDEs
read; mkdocstrings renders neither, so each role becomes inline code of the name as written
(the last dotted part where Sphinx's ``~`` asks for it) and ``Example::`` an Examples section."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([^`]+)`")


def plain(text: str) -> str:
    """``text`` with its Sphinx roles as inline code and ``Example::`` as ``Examples:``."""

    def code(match: re.Match[str]) -> str:
        tilde, target = match.groups()
        return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"

    # griffe reads a plural "Examples:" as the examples section (its doctest lines as code)
    return re.sub(r"^(\s*)Examples?::\s*$", r"\1Examples:", ROLE.sub(code, text), flags=re.M)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
