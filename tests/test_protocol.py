"""Unit tests of the pure protocol parser (docs/PROTOCOL.md)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lancelotd.checks import MAX_ANSWER_BYTES
from lancelotd.config import DEFAULT_ANSWERS
from lancelotd.protocol import NOT_ASCII, SLICE_BYTES, TOO_LONG, AnswerTable, Session

UNKNOWN = b"I don't know that."
TABLE = AnswerTable(DEFAULT_ANSWERS, UNKNOWN.decode(), 64)
NAME = b"My name is Sir Lancelot of Camelot."
QUEST = b"To seek the Holy Grail."
COLOR = b"Blue."


def feed_all(chunks: list[bytes], table: AnswerTable = TABLE, cap: int = SLICE_BYTES) -> tuple[bytes, bool]:
    """Feed chunks in order until the session asks to close; all output and whether it closed.

    Like a worker: while the session holds input back (a slice was full),
    it is resumed before anything more is fed, and no slice exceeds the cap.
    """
    session = Session(table)
    out = []
    for chunk in chunks:
        answers, close = session.feed(chunk, cap)
        while True:
            assert len(answers) <= max(cap, MAX_ANSWER_BYTES + len(TOO_LONG)), (len(answers), cap)
            out.append(answers)
            if close:
                return b"".join(out), True
            if not session.held:
                break
            answers, close = session.resume(cap)
    return b"".join(out), False


def test_known_questions() -> None:
    assert feed_all([b"What is your name?"]) == (NAME, False)
    assert feed_all([b"What is your quest?"]) == (QUEST, False)
    assert feed_all([b"What is your favorite color?"]) == (COLOR, False)


def test_white_space_around_questions_is_ignored() -> None:
    assert feed_all([b"  What is your name?\r\n\tWhat is your quest?\r\n"]) == (NAME + QUEST, False)


def test_white_space_inside_a_question_matters() -> None:
    assert feed_all([b"What  is your name?"]) == (UNKNOWN, False)


def test_pipelined_answers_in_order() -> None:
    stream = b"What is your quest?What is your name?Who?What is your favorite color?"
    assert feed_all([stream]) == (QUEST + NAME + UNKNOWN + COLOR, False)


def test_unknown_question_keeps_connection() -> None:
    assert feed_all([b"Why?", b"What is your name?"]) == (UNKNOWN + NAME, False)


def test_partial_question_waits() -> None:
    session = Session(TABLE)
    assert session.feed(b"What is ") == (b"", False)
    assert session.feed(b"your name?What") == (NAME, False)
    assert session.pending == b"What"


def test_too_long_without_question_mark() -> None:
    assert feed_all([b"x" * 63]) == (b"", False)
    assert feed_all([b"x" * 64]) == (TOO_LONG, True)


def test_too_long_complete_question() -> None:
    assert feed_all([b"x" * 63 + b"?"]) == (UNKNOWN, False)  # 64 bytes with its '?': allowed
    assert feed_all([b"x" * 64 + b"?"]) == (TOO_LONG, True)


def test_answers_before_error_then_close() -> None:
    out, closed = feed_all([b"What is your name?" + b"y" * 100 + b"?What is your quest?"])
    assert (out, closed) == (NAME + TOO_LONG, True)


def test_non_ascii_closes_after_earlier_answers() -> None:
    assert feed_all([b"What is your name?Wh\xc3\xa0t?"]) == (NAME + NOT_ASCII, True)
    assert feed_all([b"What is your name?\xff"]) == (NAME + NOT_ASCII, True)


def test_leading_white_space_does_not_count_toward_length() -> None:
    assert feed_all([b"\r\n" * 100 + b"What is your name?"]) == (NAME, False)


def test_custom_table_and_unknown_answer() -> None:
    table = AnswerTable({"Ni?": "Ekke ekke."}, "Go away.", 1024)
    assert feed_all([b"Ni?What is your name?"], table) == (b"Ekke ekke.Go away.", False)


# --- properties ----------------------------------------------------------

QUESTIONS = list(DEFAULT_ANSWERS) + ["Who?", "What is the airspeed velocity of an unladen swallow?"]
question = st.builds(
    lambda ws1, q, ws2: ws1 + q.encode() + ws2,
    st.sampled_from(["", " ", "\r\n", "\t \n"]).map(str.encode),
    st.sampled_from(QUESTIONS),
    st.sampled_from(["", " ", "\r\n"]).map(str.encode),
)


def expected_answers(stream: list[bytes]) -> bytes:
    return b"".join(DEFAULT_ANSWERS.get(q.strip().decode(), UNKNOWN.decode()).encode() for q in stream)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(st.lists(question, max_size=20), st.lists(st.integers(min_value=0), max_size=30))
def test_any_split_gives_the_same_answers(stream: list[bytes], cuts: list[int]) -> None:
    data = b"".join(stream)
    assert feed_all(split_at(data, cuts)) == (expected_answers(stream), False)


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=30))
def test_verdict_does_not_depend_on_splits(data: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes, errors included: the same output however the stream is split."""
    assert feed_all(split_at(data, cuts)) == feed_all([data])


@given(st.lists(question, max_size=20), st.lists(st.integers(min_value=0), max_size=30),
       st.integers(min_value=1, max_value=200))
def test_any_output_cap_gives_the_same_answers(stream: list[bytes], cuts: list[int], cap: int) -> None:
    data = b"".join(stream)
    assert feed_all(split_at(data, cuts), cap=cap) == (expected_answers(stream), False)


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=30),
       st.integers(min_value=1, max_value=200))
def test_verdict_does_not_depend_on_the_output_cap(data: bytes, cuts: list[int], cap: int) -> None:
    assert feed_all(split_at(data, cuts), cap=cap) == feed_all([data])


def test_a_flood_of_empty_questions_is_answered_a_slice_at_a_time() -> None:
    session = Session(TABLE)
    flood = b"?" * 65536
    out, close = session.feed(flood)
    assert not close and session.held
    assert len(out) <= SLICE_BYTES and out == UNKNOWN * (len(out) // len(UNKNOWN))
    slices = [out]
    while session.held:
        out, close = session.resume()
        assert not close and len(out) <= SLICE_BYTES
        slices.append(out)
    assert b"".join(slices) == UNKNOWN * 65536
    assert session.pending == b""
    assert len(slices) == -(-65536 * len(UNKNOWN) // (SLICE_BYTES // len(UNKNOWN) * len(UNKNOWN)))


def test_unknown_questions_are_counted_once_across_slices() -> None:
    table = AnswerTable(DEFAULT_ANSWERS, UNKNOWN.decode(), 64)
    assert feed_all([b"Who?" * 1000], table, cap=100) == (UNKNOWN * 1000, False)
    assert table.unknown_count == 1000


def test_a_long_answer_to_a_repeated_short_question_is_capped() -> None:
    long_answer = "x" * (MAX_ANSWER_BYTES - 1) + "."
    table = AnswerTable({"Q?": long_answer}, UNKNOWN.decode(), 64)
    session = Session(table)
    out, close = session.feed(b"Q?" * 30000)  # one 60 kB read: 30 MB of answers uncapped
    assert len(out) <= SLICE_BYTES and session.held and not close
    assert len(session.pending) < 60000
