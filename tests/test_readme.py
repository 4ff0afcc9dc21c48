"""The README's generated sections match the code they were generated from."""

from __future__ import annotations

import re

import pytest
from tools.docs import SECTIONS
from tools.readme import section


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_generated_section_is_current(name: str) -> None:
    expected = SECTIONS[name]().strip()
    assert section(name).strip() == expected, f"README.md is stale: run `make docs` ({name})"


def test_every_public_name_is_in_the_api_reference() -> None:
    import punch
    import punch.testing
    import punch.transfer

    text = section("api")
    for module in (punch, punch.testing, punch.transfer):
        prefix = module.__name__ + "."
        for name in module.__all__:
            assert re.search(rf"[` ]{re.escape(prefix + name)}\b", text), name
