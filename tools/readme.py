"""Generated sections of README.md: between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def section(name: str, text: str | None = None) -> str:
    """The current body of section ``name`` (of ``text``, default README.md).

    Raises:
        RuntimeError: the README has no such section.
    """
    text = README.read_text() if text is None else text
    begin, end = markers(name)
    if text.count(begin) != 1 or text.count(end) != 1:
        raise RuntimeError(f"README.md needs exactly one {begin} ... {end} section")
    return text.split(begin, 1)[1].split(end, 1)[0]


def replace_section(name: str, body: str) -> None:
    """Write ``body`` (newlines at both ends added) as section ``name`` of README.md."""
    text = README.read_text()
    old = section(name, text)
    begin, end = markers(name)
    README.write_text(text.replace(begin + old + end, f"{begin}\n{body.strip()}\n{end}"))
