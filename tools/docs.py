"""The README's generated reference sections: the API (from docstrings) and ``punch --help``.

``python -m tools.docs`` (``make docs``) rewrites both sections of README.md;
``tests/test_readme.py`` fails when a section and the code disagree. Each API
entry is the signature and the first paragraph of the docstring; the rest
(arguments with units, every exception) is in ``help(punch.NAME)``.
"""

from __future__ import annotations

import enum
import inspect
import os
import re
import sys
from types import ModuleType
from typing import Any

import attrs

import punch
import punch._cli
import punch.pytest_plugin
import punch.reuse
import punch.testing
import punch.transfer
from tools.readme import replace_section

MODULES = (punch, punch.reuse, punch.transfer, punch.testing, punch.pytest_plugin)


def _markdown(text: str) -> str:
    """reST roles and literals to Markdown code spans."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"`\1`", text)
    return text.replace("``", "`")


def summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return _markdown(" ".join(doc.split("\n\n", 1)[0].split()))


def signature(name: str, function: Any) -> str:
    """``name(a, *, b=1) -> R``, prefixed ``await``/``async with`` as it is called."""
    params, star = [], False
    for param in inspect.signature(function).parameters.values():
        if param.name in ("self", "cls"):
            continue
        if param.kind is param.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        if param.kind is param.VAR_POSITIONAL:
            star = True
        text = {param.VAR_POSITIONAL: "*", param.VAR_KEYWORD: "**"}.get(param.kind, "")
        text += param.name
        if param.default is not param.empty:
            text += f"={param.default!r}"
        params.append(text)
    call = f"{name}({', '.join(params)})"
    wrapped = getattr(function, "__wrapped__", None)
    returns = inspect.signature(function).return_annotation
    if wrapped is not None and inspect.isasyncgenfunction(wrapped):
        item = re.fullmatch(r"AsyncIterator\[(.+)\]", str(returns))
        return f"async with {call} as {item[1] if item else 'value'}"
    arrow = "" if returns is inspect.Signature.empty else f" -> {returns}"
    if inspect.iscoroutinefunction(function):
        return f"await {call}{arrow}"
    return f"{call}{arrow}"


def _members(cls: type) -> list[str]:
    if issubclass(cls, enum.Enum):
        return ["  - members: " + ", ".join(f"`{m.name}`" for m in cls)]
    lines = []
    instance = cls.__name__.lower()
    if attrs.has(cls):
        names = [f"`{f.name}`" for f in attrs.fields(cls) if not f.name.startswith("_")]
        lines.append("  - attributes: " + ", ".join(names))
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            lines.append(f"  - `{instance}.{name}`: {summary(member)}")
        elif isinstance(member, classmethod | staticmethod):
            text = signature(f"{cls.__name__}.{name}", member.__func__)
            lines.append(f"  - `{text}`: {summary(member)}")
        elif inspect.isfunction(member) and member.__doc__:
            lines.append(f"  - `{signature(f'{instance}.{name}', member)}`: {summary(member)}")
    return lines


def entries(module: ModuleType) -> list[str]:
    """One bullet per public name of ``module`` (classes with their public methods)."""
    lines = []
    prefix = module.__name__ + "."
    for name in sorted(module.__all__, key=lambda n: (not n[0].islower(), n.lower())):
        obj = getattr(module, name)
        if inspect.isclass(obj):
            base = "exception " if issubclass(obj, BaseException) else "class "
            lines.append(f"- {base}`{prefix}{name}`: {summary(obj)}")
            if not issubclass(obj, BaseException):
                lines += _members(obj)
        elif "fixture" in type(obj).__name__.lower():
            lines.append(f"- fixture `{prefix}{name}`: {summary(obj)}")
        elif inspect.isfunction(inspect.unwrap(obj)):
            lines.append(f"- `{signature(prefix + name, obj)}`: {summary(obj)}")
        else:  # a constant or a type alias
            value = str(obj).replace("collections.abc.", "").replace("'", "")
            lines.append(f"- `{prefix}{name} = {value}`")
    return lines


def reference() -> str:
    """The whole generated section, Markdown."""
    parts = [
        "_Generated from the docstrings by `python -m tools.docs`; "
        "`help(punch.NAME)` has the arguments, units and exceptions of each._"
    ]
    for module in MODULES:
        parts.append(f"\n**`{module.__name__}`**: {summary(module)}\n")
        parts.extend(entries(module))
    return "\n".join(parts)


HELP_COLUMNS = "100"
"""Terminal width the help is rendered at (argparse reads ``$COLUMNS``)."""


def cli_help() -> str:
    """``punch --help``, as a fenced block."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        text = punch._cli._parser().format_help()
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return f"```\n$ punch --help\n{text.rstrip()}\n```"


SECTIONS = {"api": reference, "cli-help": cli_help}


def main() -> int:
    for name, generate in SECTIONS.items():
        replace_section(name, generate())
    print(f"README.md: regenerated {', '.join(SECTIONS)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
