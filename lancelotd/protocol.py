"""The Lancelot question/answer protocol as a pure byte-stream parser (SPEC §1).

No sockets here: a worker feeds whatever recv() returned and sends what comes
back.  Keeping it pure lets the tests check every framing rule, and
hypothesis check that any split of a stream gives the same answers.
"""

from __future__ import annotations

from collections.abc import Mapping

TOO_LONG = b"Error: question too long."
NOT_ASCII = b"Error: questions must be ASCII."


class AnswerTable:
    """Questions and answers compiled for the worker's hot path.

    `exact` maps the bytes a client typically sends in one segment
    ("What is your name?") straight to the answer, so the common request
    costs one dict lookup; `by_text` maps a question stripped of white space
    around it and of its '?' for the general path.
    """

    __slots__ = ("exact", "by_text", "unknown", "max_bytes", "unknown_count")

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


class Session:
    """Protocol state of one connection: the bytes of an unfinished question.

    feed() returns (output, close): the answers for every complete question
    in order, followed by an error line when the stream broke a rule, in which
    case close is True and nothing after the bad question is answered.
    """

    __slots__ = ("table", "pending")

    def __init__(self, table: AnswerTable, pending: bytes = b"") -> None:
        self.table = table
        self.pending = pending

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        if not self.pending:
            answer = self.table.exact.get(data)
            if answer is not None:  # the hot path: one whole, known question
                return answer, False
        else:
            data = self.pending + data
            self.pending = b""
        return self._feed_slow(data)

    def _feed_slow(self, data: bytes) -> tuple[bytes, bool]:
        table = self.table
        limit = table.max_bytes
        parts = data.split(b"?")
        rest = parts.pop().lstrip()
        clean = data.isascii()
        out = []
        for part in parts:
            question = part.lstrip()
            # A question may hold limit bytes, its '?' included.
            error = _check(question, limit - 1, clean)
            if error:
                out.append(error)
                return b"".join(out), True
            answer = table.by_text.get(question)
            if answer is None:
                answer = table.unknown
                table.unknown_count += 1
            out.append(answer)
        # An unfinished question fails as soon as it can no longer be valid,
        # exactly as it would had it arrived in one piece.
        error = _check(rest, limit - 1, clean)
        if error:
            out.append(error)
            return b"".join(out), True
        self.pending = rest
        return b"".join(out), False


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
