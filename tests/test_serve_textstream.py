"""What a completion may send yet (psyche.serve.textstream), as properties: whatever the text,
its stop sequences and the steps it grows by, the pieces sent add up to the text cut at
its first stop sequence, and no piece ever holds a stop sequence or a character that the
next token could still change."""

from hypothesis import example, given
from hypothesis import strategies as st

from psyche.serve.textstream import REPLACEMENT, TextStream, cut_at_stop

ALPHABET = "ab \n" + REPLACEMENT


@given(text=st.text(ALPHABET, max_size=60), stop=st.lists(st.text(ALPHABET, max_size=4), max_size=4),
       cuts=st.lists(st.integers(0, 60), max_size=20))
@example(text="a" + REPLACEMENT + "aa", stop=["aa"], cuts=[3])  # a final replacement character is sent
def test_pieces_add_up_to_the_text_cut_at_its_first_stop(text, stop, cuts):
    stream = TextStream(stop)
    pieces = []
    for end in sorted(set(cuts)):  # the text grows token by token: each feed holds the last one
        piece = stream.feed(text[:end])
        # The trailing replacement characters of what was decoded so far may be a character the
        # next token completes: never sent before the end (one followed by more text is final).
        assert len(stream.sent) <= len(text[:end].rstrip(REPLACEMENT)) or end >= len(text) or stream.stopped
        pieces.append(piece)
    pieces.append(stream.finish(text))
    expected, stopped = cut_at_stop(text, stop)
    assert "".join(pieces) == expected
    assert stream.stopped == stopped
    assert not any(s and s in "".join(pieces) for s in stop)
    assert stream.finish(text + "more") == ""  # nothing after the end


@given(text=st.text("ab", min_size=1, max_size=20))
def test_a_tail_that_may_start_a_stop_sequence_waits(text):
    stream = TextStream(["b" * 3])
    sent = stream.feed(text)
    if "bbb" in text:
        assert stream.stopped and sent == text[: text.find("bbb")]
    else:
        held = text[len(sent):]
        assert text.startswith(sent) and set(held) <= {"b"} and len(held) <= 2  # a possible start of "bbb" waits


def test_an_unfinished_character_waits_for_the_next_token():
    stream = TextStream()
    assert stream.feed("caf" + REPLACEMENT) == "caf"
    assert stream.feed("café") == "é"
    assert stream.finish("café" + REPLACEMENT) == REPLACEMENT  # at the end, what is there is sent
