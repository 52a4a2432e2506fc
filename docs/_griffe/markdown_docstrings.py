"""A griffe extension for the docs build: make the code's docstrings read well as Markdown.

Three rewrites, applied to each docstring before griffe parses it, and one to signatures:

- A module attribute without a docstring takes the comment block right above it (``#:``, Sphinx's doc-comment
  marker, or plain ``#``) as its docstring: the code documents constants such as ``SOLVERS`` that way, and the
  pages list only documented names.
- Sphinx roles (``:class:`Solution```, ``:func:`~fixedpoint_diffusion.sampling.sample```) become code spans
  (``Solution``, ``sample``): Markdown has no roles and would print the role's name.
- Grouped entries are split. The code documents parameters that share a meaning on one line
  (``rtol, atol: convergence tolerances``). Griffe's Google parser reads that as one parameter named
  ``"rtol, atol"``, with no annotation and absent from the signature: the strict build fails on it, and the page
  would show one untyped row for several parameters. Written as one entry per name (each with the shared
  description), every name gets its annotation and default from the signature, and the strict checks stay on for
  everything else: a documented name that is not in the signature still fails the build.
- A parameter default that names a module constant shows the constant's value. The code writes shared defaults
  once (``max_steps: int = MAX_STEPS`` in ``solve``, ``DEQ`` and their helpers); the page shows ``50``.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import AliasResolutionError, CyclicAliasError, Docstring, ExprName, Extension, Object

# ``:role:`target``` or ``:role:`~dotted.target``` (the tilde shows only the last component, as in Sphinx).
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc):`(~?)([^`]+)`")
# Sections whose entries are ``name: description`` items.
_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Attributes|Other Parameters|Keyword Args):\s*$")
# ``a, b, c: description``: two or more plain identifiers, comma separated, then a colon.
_GROUPED = re.compile(r"^([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)\s*:(.*)$")


def comment_above(lines: list[str], lineno: int) -> str | None:
    """The comment block directly above line ``lineno`` (1-based) of ``lines``, without its ``#:``/``#`` markers.

    Args:
        lines: a source file's lines.
        lineno: the line where a definition starts.

    Returns:
        The comment's text, or ``None`` when the line above is not a comment.
    """
    block: list[str] = []
    i = lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#"):
        block.insert(0, re.sub(r"^#:? ?", "", lines[i].strip()))
        i -= 1
    return "\n".join(block) if block else None


def strip_roles(text: str) -> str:
    """Return ``text`` with every Sphinx cross-reference role written as a Markdown code span."""
    return _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


def split_grouped_entries(text: str) -> str:
    """Return ``text`` with every grouped ``a, b: description`` section entry written as one entry per name.

    Args:
        text: a Google-style docstring.

    Returns:
        The docstring with grouped entries expanded (continuation lines are repeated under each name); any other
        line is unchanged.
    """
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    section_indent: int | None = None  # indentation of the current section header
    item_indent: int | None = None  # indentation of that section's entries
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        header = _SECTION.match(line)
        if header:
            section_indent, item_indent = len(header.group(1)), None
            out.append(line)
            i += 1
            continue
        if section_indent is not None and line.strip():
            if indent <= section_indent:
                section_indent = item_indent = None  # the section ended
            elif item_indent is None:
                item_indent = indent
        grouped = _GROUPED.match(line.strip()) if item_indent is not None and indent == item_indent else None
        if not grouped:
            out.append(line)
            i += 1
            continue
        # The entry's continuation: the following lines indented deeper than the entry (blank lines inside it too).
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > item_indent):
            j += 1
        while j > i + 1 and not lines[j - 1].strip():
            j -= 1  # trailing blank lines belong to what follows
        names = [name.strip() for name in grouped.group(1).split(",")]
        for name in names:
            out.append(f"{' ' * item_indent}{name}:{grouped.group(2)}")
            out.extend(lines[i + 1:j])
        i = j
    return "\n".join(out)


class MarkdownDocstrings(Extension):
    """Rewrite the docstring of every object griffe loads (see ``strip_roles`` and ``split_grouped_entries``)."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring in place before it is parsed."""
        undocumented_constant = (obj.docstring is None and obj.is_attribute and obj.parent is not None
                                 and obj.parent.is_module and obj.lineno is not None)
        if undocumented_constant and obj.filepath in obj.lines_collection:
            text = comment_above(obj.lines_collection[obj.filepath], obj.lineno)
            if text:
                obj.docstring = Docstring(text, lineno=obj.lineno - 1, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = split_grouped_entries(strip_roles(obj.docstring.value))

    def on_package(self, *, pkg: Object, **kwargs: Any) -> None:
        """Show the value of every parameter default that names a module constant (see the module docstring)."""
        _inline_constant_defaults(pkg, set())


def _inline_constant_defaults(obj: Object, seen: set[str]) -> None:
    if obj.is_alias or obj.path in seen:
        return
    seen.add(obj.path)
    if obj.is_function:
        for parameter in obj.parameters:
            default = parameter.default
            if isinstance(default, ExprName):
                try:
                    target = obj.modules_collection[default.canonical_path]
                    while target.is_alias:
                        target = target.target
                except (KeyError, AliasResolutionError, CyclicAliasError):
                    target = None  # not a constant of the package (a builtin, a name griffe cannot resolve)
                if target is not None and target.is_attribute and target.value is not None:
                    parameter.default = target.value
    for member in obj.members.values():
        _inline_constant_defaults(member, seen)
