"""Text → documents, and the held-out split: pure functions."""

from hypothesis import given
from hypothesis import strategies as st

from psyche.data.corpus import clean_text, split_documents, split_validation


def test_overstrike_underline_and_bold_render_as_a_terminal_shows_them():
    assert clean_text("whiter teeth *___\b\b\band* fresher") == "whiter teeth *and* fresher"
    assert clean_text("_\bb_\bo_\bl_\bd") == "bold"
    assert clean_text("B\bBo\bol\bld\bd") == "Bold"
    assert clean_text("ring\x07 the bell\r\n") == "ring the bell\n"


def test_fortune_files_split_on_percent_lines():
    text = "first cookie\n  -- someone\n%\n\n%\nsecond\nline two\n%\nthird\n"
    assert split_documents(text) == ["first cookie\n  -- someone", "second\nline two", "third"]


def test_plain_text_splits_on_blank_lines():
    assert split_documents("para one\nstill one\n\n\npara two\n") == ["para one\nstill one", "para two"]


docs_strategy = st.lists(st.text(min_size=1, max_size=30), min_size=2, max_size=60)


@given(docs_strategy, st.floats(min_value=0.01, max_value=0.9))
def test_split_is_a_partition_with_both_sides_nonempty(docs, frac):
    train, val = split_validation(docs, frac)
    assert sorted(train + val) == list(range(len(docs)))
    assert train and val


@given(docs_strategy, st.floats(min_value=0.01, max_value=0.9))
def test_split_depends_on_each_document_alone(docs, frac):
    # Appending documents never moves an old one to the other side (unless the
    # at-least-one rule had to step in, which needs a side to have been empty).
    train, val = split_validation(docs, frac)
    train2, val2 = split_validation(docs + ["an extra document " * 3, "and another one"], frac)
    if len(val) > 1 and len(train) > 1:
        assert set(val) <= set(val2) and set(train) <= set(train2)


def test_identical_documents_fall_on_the_same_side():
    docs = ["same text"] * 3 + [f"doc {i}" for i in range(100)]
    train, val = split_validation(docs, 0.3)
    side = {i: (i in val) for i in range(3)}
    assert len(set(side.values())) == 1
