"""The Lancelot question/answer protocol as a pure byte-stream parser (docs/PROTOCOL.md).

No sockets here: a worker feeds whatever recv() returned and sends what comes
back.  Keeping it pure lets the tests check every framing rule, and
hypothesis check that any split of a stream gives the same answers.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from itertools import accumulate, repeat

TOO_LONG = b"Error: question too long."
NOT_ASCII = b"Error: questions must be ASCII."
# The most output one feed() produces: a read of "???..." is a question per
# byte, so without a cap one read could make a worker answer 16,384 questions
# and queue hundreds of KB for a client that may never read them.
SLICE_BYTES = 16384
# (answers, the error of the first bad question or None, how many of the answers fit in the cap)
Answered = tuple[list[bytes], bytes | None, int]
FEW = 8  # questions in one read up to which a plain loop is the fastest way to answer them


class AnswerTable:
    """Questions and answers compiled for the worker's hot path.

    `exact` maps the bytes a client typically sends in one segment
    ("What is your name?") straight to the answer, so the common request
    costs one dict lookup; `by_text` maps a question stripped of white space
    around it and of its '?' for the general path.
    """

    __slots__ = ("exact", "by_text", "unknown", "max_bytes", "unknown_count", "shortest")

    def __init__(self, answers: Mapping[str, str], unknown_answer: str, max_question_bytes: int) -> None:
        self.by_text = {q.strip().encode("ascii")[:-1]: a.encode("ascii") for q, a in answers.items()}
        self.exact = {
            q.strip().encode("ascii"): a.encode("ascii")
            for q, a in answers.items()
            if len(q.strip()) <= max_question_bytes
        }
        self.unknown = unknown_answer.encode("ascii")
        self.max_bytes = max_question_bytes
        self.unknown_count = 0  # unknown questions seen, for the scoreboard
        # No answer is shorter: a slice of `cap` output bytes holds at most cap // shortest answers.
        self.shortest = max(1, min(len(a) for a in [self.unknown, *self.by_text.values()]))


class Session:
    """Protocol state of one connection: the bytes received and not yet answered.

    feed() returns (output, close): the answers for the complete questions
    in order, followed by an error line when the stream broke a rule, in which
    case close is True and nothing after the bad question is answered.

    Output is produced in slices of at most `cap` bytes (one answer at least):
    when the next answer would not fit, parsing stops there, the rest of the
    input stays in `pending` and `held` is True.  The caller then reads nothing
    more from the client and calls resume() (once the client has taken the
    answers) until `held` is False.  However the stream is split and whatever
    the cap, the concatenated output is the same.
    """

    __slots__ = ("table", "pending", "held")

    def __init__(self, table: AnswerTable, pending: bytes = b"") -> None:
        self.table = table
        self.pending = pending  # an unfinished question, or (held) input not parsed yet
        self.held = False

    def feed(self, data: bytes, cap: int = SLICE_BYTES) -> tuple[bytes, bool]:
        pending = self.pending
        if not pending:
            answer = self.table.exact.get(data)
            if answer is not None:  # the hot path: one whole, known question
                return answer, False
        elif b"?" not in data and not self.held:
            return self._extend(pending, data)
        else:
            data = bytes(pending) + data
            self.pending = b""
        return self._feed_slow(data, cap)

    def _extend(self, pending: bytes | bytearray, data: bytes) -> tuple[bytes, bool]:
        """More of an unfinished question: judge only the new bytes, and keep them in place.

        A client that sends a long question a byte at a time costs time in proportion to
        what it sends, not to the question so far (which is known to be valid: ASCII, not too
        long, no leading white space).
        """
        max_len = self.table.max_bytes - 1  # max_question_bytes counts the '?'
        size = len(pending) + len(data)
        if not data.isascii():
            first = len(pending) + next(i for i, byte in enumerate(data) if byte > 127)
            self.pending = b""
            return (NOT_ASCII if first <= max_len else TOO_LONG), True
        if size > max_len:
            self.pending = b""
            return TOO_LONG, True
        if isinstance(pending, bytearray):
            pending += data  # in place: no copy of what came before
        else:
            self.pending = bytearray(pending) + data
        return b"", False

    def resume(self, cap: int = SLICE_BYTES) -> tuple[bytes, bool]:
        """The next slice of the input a capped feed() left unparsed."""
        data, self.pending, self.held = self.pending, b"", False
        return self._feed_slow(data, cap)

    def _feed_slow(self, data: bytes, cap: int) -> tuple[bytes, bool]:
        table = self.table
        # The split does no work past what one slice can answer.
        most = cap // table.shortest + 1
        parts = data.split(b"?", most)
        rest = parts.pop()
        clean = data.isascii()
        if len(parts) > FEW:
            answers, error, fit = self._answer_many(parts, clean, cap)
        else:
            answers, error, fit = self._answer_few(parts, clean, cap)
        if fit < len(parts) and error is None or fit < len(answers):
            del answers[fit:]
            self.pending = b"?".join([*parts[fit:], rest])
            self.held = True
        elif error is None and len(parts) == most:  # the split stopped early: more may follow
            self.pending = rest
            self.held = True
        elif error is None:
            # An unfinished question fails as soon as it can no longer be valid,
            # exactly as it would had it arrived in one piece.
            rest = rest.lstrip()
            error = _check(rest, table.max_bytes - 1, clean)
            if error is None:
                self.pending = rest
        if error is not None and not self.held:
            answers.append(error)
            return b"".join(answers), True
        return b"".join(answers), False

    def _answer_few(self, parts: list[bytes], clean: bool, cap: int) -> Answered:
        """The answers to a few questions, one by one."""
        table = self.table
        answers = []
        size = 0
        for part in parts:
            question = part.lstrip()
            error = _check(question, table.max_bytes - 1, clean)  # max_bytes with its '?'
            if error:
                return answers, error, len(answers)
            answer = table.by_text.get(question)
            if answer is None:
                answer = table.unknown
            size += len(answer)
            if size > cap and answers:
                return answers, None, len(answers)
            if answer is table.unknown:
                table.unknown_count += 1
            answers.append(answer)
        return answers, None, len(answers)

    def _answer_many(self, parts: list[bytes], clean: bool, cap: int) -> Answered:
        """_answer_few with whole-list operations: a read of "???..." is a question per byte."""
        table = self.table
        by_text = table.by_text
        questions = list(map(bytes.lstrip, parts))
        error = None
        if not clean or max(map(len, questions)) >= table.max_bytes:
            error, questions = _first_error(questions, table.max_bytes - 1, clean)
        answers = list(map(by_text.get, questions, repeat(table.unknown)))
        fit = len(answers)
        if fit > 1:
            ends = list(accumulate(map(len, answers)))
            if ends[-1] > cap:  # one answer at least
                fit = bisect_right(ends, cap) or 1
        table.unknown_count += fit - sum(map(by_text.__contains__, questions[:fit]))
        return answers, error, fit


def _first_error(questions: list[bytes], max_len: int, clean: bool) -> tuple[bytes | None, list[bytes]]:
    """The first question that breaks a rule: its error, and the questions before it."""
    for i, question in enumerate(questions):
        error = _check(question, max_len, clean)
        if error:
            return error, questions[:i]
    return None, questions


def _check(question: bytes, max_len: int, clean: bool) -> bytes | None:
    """The error a question (without its '?') earns, or None.

    Bytes are judged in stream order: a non-ASCII byte within the allowed
    length wins over length, so the verdict does not depend on how the
    stream was split into reads.
    """
    if not clean and not question[: max_len + 1].isascii():
        return NOT_ASCII
    if len(question) > max_len:
        return TOO_LONG
    return None
