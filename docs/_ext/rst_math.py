"""A griffe extension for the API reference: the docstrings write their formulas in
reStructuredText (``.. math::`` blocks, ``:math:`…``` roles); this rewrites them as the
``$$…$$`` and ``\\(…\\)`` that ``pymdownx.arithmatex`` hands to MathJax."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":math:`([^`]*)`")
DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")


def convert(text: str) -> str:
    """``text`` with every ``.. math::`` block (its first line and the lines indented below
    it) as a ``$$`` block, and every ``:math:`` role as inline math."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        match = DIRECTIVE.match(lines[i])
        if not match:
            out.append(ROLE.sub(r"\\(\1\\)", lines[i]))
            i += 1
            continue
        indent, first = match.groups()
        body = [first] if first else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or
                                  len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        out += ["", f"{indent}$$", *(f"{indent}{line}" for line in body if line),
                f"{indent}$$", ""]
    return "\n".join(out)


class RstMath(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
