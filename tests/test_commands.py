"""What the commands do with their stream, apart from the CLI around them."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punch._cli import DEFAULT_MAX_SIZE, _parser, _size
from punch._commands import MAX_CHAT_LINE, Lines, LineTooLong


@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=8),
    st.lists(st.integers(min_value=1, max_value=17), min_size=1, max_size=8),
)
def test_lines_come_out_whole_however_the_bytes_are_cut(
    lines: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(line + b"\n" for line in lines)
    splitter, out, i, k = Lines(64), [], 0, 0
    while i < len(data):
        out += splitter.feed(data[i : i + cuts[k % len(cuts)]])
        i += cuts[k % len(cuts)]
        k += 1
    assert out == lines


@pytest.mark.parametrize("chunks", [[b"x" * 65], [b"x" * 40, b"x" * 25], [b"x" * 70 + b"\n"]])
def test_a_line_over_the_cap_is_an_error_not_a_growing_buffer(chunks: list[bytes]) -> None:
    splitter = Lines(64)
    *first, last = chunks
    for chunk in first:
        assert splitter.feed(chunk) == []  # under the cap so far
    with pytest.raises(LineTooLong, match="longer than 64 bytes"):
        splitter.feed(last)


def test_a_line_at_the_cap_passes() -> None:
    assert Lines(MAX_CHAT_LINE).feed(b"y" * MAX_CHAT_LINE + b"\n") == [b"y" * MAX_CHAT_LINE]


@pytest.mark.parametrize(
    ("text", "size"), [("1", 1), ("512K", 512 << 10), ("4g", 4 << 30), ("2T", 2 << 40)]
)
def test_max_size_takes_bytes_or_binary_units(text: str, size: int) -> None:
    assert _size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-1", "1.5G", "G", "4X", "four"])
def test_a_bad_max_size_is_a_usage_error(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="bytes >= 1"):
        _size(text)


def test_receive_has_a_max_size_by_default() -> None:
    args = _parser().parse_args(["receive", "--rendezvous", "127.0.0.1:7000", "--name", "bob"])
    assert args.max_size == DEFAULT_MAX_SIZE == 4 << 30
