"""MkDocs hook: the package's docstrings cross-reference in Sphinx's roles (:func:`name`,
:class:`~module.Name`), which mkdocstrings shows as written. On the API pages each becomes the
code span alone, ``~`` keeping only the last dotted part, as Sphinx would show it."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):<code>(~?)([^<]*)</code>")


def _shown(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_page_content(html: str, **_: Any) -> str:
    return ROLE.sub(_shown, html)
