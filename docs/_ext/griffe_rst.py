"""Griffe extension for the documentation site: pfa_fx's docstrings are Google-style with
reStructuredText roles and literal blocks, which Markdown does not know. This rewrites, in
the docstrings mkdocstrings renders (the source files are not touched):

- ``:func:`~pfa_fx.mirror``` and the other roles to code spans (``mirror``),
- ``>>>`` doctest lines outside a section to fenced ``pycon`` blocks,
- a paragraph ending in ``::`` (an RST literal block follows) to one ending in ``:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`([^`]+)`")


def _role_text(match: re.Match[str]) -> str:
    target = match.group(1).strip()
    explicit = re.fullmatch(r"(.+?)\s*<[^>]+>", target)
    if explicit:
        return f"`{explicit.group(1)}`"
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def _fence_doctests(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(stripped)]
        if indent:  # inside a section (Google "Examples:"): griffe parses doctests there itself
            out.append(lines[i])
            i += 1
            continue
        block = []
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            block.append(lines[i][len(indent) :])
            i += 1
        if out and out[-1].strip():
            out.append("")
        out += [f"{indent}```pycon", *(indent + b for b in block), f"{indent}```", ""]
    return out


def rewrite(text: str) -> str:
    """The docstring ``text`` with RST roles, doctests and literal-block markers made Markdown."""
    text = _ROLE.sub(_role_text, text)
    lines = _fence_doctests(text.splitlines())
    lines = [line[:-1] if line.endswith("::") and not line.lstrip().startswith(("-", "*")) else line for line in lines]
    return "\n".join(lines)


class RstToMarkdown(griffe.Extension):
    """Rewrite every loaded object's docstring (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
