"""Step segmentation: paragraph breaks, never inside an open code fence or display-math block."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hogwild_agents.segmentation import ends_with_blank_line, is_step_end, open_block


@pytest.mark.parametrize(
    ("text", "ends"),
    [
        ("**Alice [1]:** Let x = 2.\n\n", True),
        ("Let x = 2.\n \t\n", True),
        ("Let x = 2.\r\n\r\n", True),
        ("Let x = 2.\n\n  ", True),
        ("Let x = 2.\n", False),
        ("Let x = 2.", False),
        ("First.\n\nstill going", False),
        ("\n\n", False),
        ("", False),
        ("```python\nx = 1\n\n", False),
        ("```python\nx = 1\n```\n\n", True),
        ("````\n```\ninner\n\n", False),
        ("Inline ```code``` here.\n\n", True),
        ("$$\nx^2\n\n", False),
        ("$$\nx^2\n$$\n\n", True),
        ("\\[\n a = b\n\n", False),
        ("\\[ a = b \\]\n\n", True),
        ("Rows: a \\\\[2pt] b.\n\n", True),
        ("```\n$$ not math\n```\n\n", True),
        ("$$ ``` $$\n\n", True),
        ("Price: $5 and $6.\n\n", True),
    ],
)
def test_is_step_end(text, ends):
    assert is_step_end(text) is ends


def test_open_block_kinds():
    assert open_block("```py\nx") == "code"
    assert open_block("$$ x") == "math"
    assert open_block("\\[ x") == "math"
    assert open_block("\\[ x \\] and ``` y ```") is None
    assert open_block("\\] stray closer") is None


CHUNKS = st.sampled_from(["a", " ", "\n", "\n\n", "```", "``", "`", "$$", "$", "\\[", "\\]", "\\\\", "x=1."])
PLAIN = st.text(alphabet=st.characters(blacklist_characters="`$\\"))


@given(st.lists(CHUNKS).map("".join))
def test_never_crashes_and_needs_a_blank_line(text):
    if is_step_end(text):
        assert ends_with_blank_line(text) and open_block(text) is None


@given(st.lists(CHUNKS).map("".join), PLAIN)
def test_never_splits_inside_an_open_fence(prefix, body):
    if open_block(prefix) is None:
        assert not is_step_end(prefix + "\n```python\n" + body + "\n\n")
        assert is_step_end(prefix + "\n```python\n" + body + "\n```\nDone.\n\n")


@given(PLAIN.filter(str.strip))
def test_plain_paragraphs_end_at_a_blank_line(text):
    assert is_step_end(text + "\n\n")
    assert not is_step_end(text.rstrip() + "\n\nand more")
