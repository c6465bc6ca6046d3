"""The scoreboard: shared memory where every process publishes what it is doing.

Like Apache's scoreboard: the master creates one file-backed shared mapping
before it forks (next to the PID file, so `lancelotd status` finds it from
the PID file's location alone), with a header for the master and one slot
per worker.  A worker writes its own slot once per loop tick, never per
request, so the hot path pays nothing; the master reads slots to learn that
a worker is ready, to check its heartbeat, and to keep the totals of
workers that have exited.

Each slot is written by one process only.  Readers may see a slot half
updated, but never a field half written: every field is a naturally aligned
8-byte word, stored with one aligned store (see _store), and counters only
grow, which is all a status display and the master's checks need.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, fields

MAGIC = b"LNCLTSB1"
SLOTS = 512

# Worker states
FREE, STARTING, SERVING, DRAINING, STOPPING = range(5)
STATE_NAMES = {FREE: "free", STARTING: "starting", SERVING: "serving", DRAINING: "draining",
               STOPPING: "stopping"}


@dataclass
class Counters:
    """What a worker counts; the master keeps the sum of the retired ones."""

    accepted: int = 0
    answered: int = 0
    unknown: int = 0
    too_long: int = 0
    not_ascii: int = 0
    timeouts: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def add(self, other: Counters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


COUNTER_NAMES = tuple(f.name for f in fields(Counters))


@dataclass
class Slot:
    pid: int = 0
    number: int = 0
    generation: int = 0
    state: int = FREE
    started: float = 0.0  # wall-clock time.time()
    heartbeat: float = 0.0  # time.monotonic() of the last loop tick
    connections: int = 0
    rate: float = 0.0  # questions answered per second over the last tick
    counters: Counters | None = None


@dataclass
class Header:
    master_pid: int = 0
    started: float = 0.0
    generation: int = 0
    workers_target: int = 0
    reloads: int = 0
    reload_failures: int = 0
    last_reload: float = 0.0  # wall clock; 0 = never
    last_reload_ok: int = 1
    replaced_crashed: int = 0
    replaced_hung: int = 0
    recycled: int = 0
    reload_pending: int = 0  # 1 while a reload runs or waits: `lancelotd reload` waits for 0
    metrics_port: int = 0  # so `status` can tell the metrics listener from the service's
    retired: Counters | None = None  # totals of workers that have exited


# q = 8-byte words throughout, d for times.
SLOT_FMT = "<qqqqddqd" + "q" * len(COUNTER_NAMES)
SLOT_SIZE = 128
HEADER_FMT = "<8sqdqqqqdqqqqqq" + "q" * len(COUNTER_NAMES)
HEADER_SIZE = 256
MESSAGE_SIZE = 1024  # the last reload's result, for `lancelotd reload` to print
SLOTS_AT = HEADER_SIZE + MESSAGE_SIZE
assert struct.calcsize(SLOT_FMT) <= SLOT_SIZE and struct.calcsize(HEADER_FMT) <= HEADER_SIZE
SIZE = SLOTS_AT + SLOTS * SLOT_SIZE


def path_for(pid_file: str) -> str:
    return pid_file + ".scoreboard"


class Scoreboard:
    def __init__(self, mem: mmap.mmap, path: str = "") -> None:
        self.mem = mem
        self.path = path
        self.inode = os.stat(path).st_ino if path else 0
        self.kept = ""  # a second name for the file while a USR2 may still roll back
        self.words: tuple[memoryview, memoryview] | None = None  # 'q' and 'd' views, for writers

    @classmethod
    def create(cls, path: str | None) -> Scoreboard:
        """A zeroed scoreboard: in a file beside the PID file, or anonymous."""
        if not path:
            return cls(mmap.mmap(-1, SIZE))
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, SIZE)
            mem = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        board = cls(mem, path)
        board.mem[:8] = MAGIC
        return board

    @classmethod
    def open(cls, path: str) -> Scoreboard:
        """Read-only view for `lancelotd status`."""
        with open(path, "rb") as f:
            mem = mmap.mmap(f.fileno(), SIZE, prot=mmap.PROT_READ)
        if mem[:8] != MAGIC:
            raise ValueError(f"{path} is not a lancelotd scoreboard")
        return cls(mem)

    # --- worker slots ----------------------------------------------------

    def _store(self, offset: int, codes: str, values: tuple) -> None:
        """Write 8-byte fields, each with one aligned store.

        Not struct.pack_into: it zeroes the whole range before filling it in,
        so a reader could see a live slot as all zeros (state FREE, heartbeat
        0) and the master would take a healthy worker for a hung one.
        """
        if self.words is None:
            view = memoryview(self.mem)
            self.words = (view.cast("q"), view.cast("d"))
        ints, floats = self.words
        base = offset // 8
        for i, (code, value) in enumerate(zip(codes, values, strict=True)):
            if code == "d":
                floats[base + i] = value
            else:
                ints[base + i] = value

    def write_slot(self, index: int, slot: Slot) -> None:
        c = slot.counters or Counters()
        self._store(SLOTS_AT + index * SLOT_SIZE, SLOT_FMT[1:], (
            slot.pid, slot.number, slot.generation, slot.state, slot.started, slot.heartbeat,
            slot.connections, slot.rate, *(getattr(c, name) for name in COUNTER_NAMES),
        ))

    def read_slot(self, index: int) -> Slot:
        values = struct.unpack_from(SLOT_FMT, self.mem, SLOTS_AT + index * SLOT_SIZE)
        return Slot(*values[:8], counters=Counters(*values[8:]))  # type: ignore[arg-type]

    def free_slot(self) -> int:
        for index in range(SLOTS):
            if self.read_slot(index).state == FREE:
                return index
        raise RuntimeError("scoreboard full")

    def clear_slot(self, index: int) -> None:
        self.write_slot(index, Slot())

    def slots(self) -> Iterator[tuple[int, Slot]]:
        for index in range(SLOTS):
            slot = self.read_slot(index)
            if slot.state != FREE:
                yield index, slot

    # --- header (master) -------------------------------------------------

    def write_header(self, h: Header) -> None:
        c = h.retired or Counters()
        self._store(8, HEADER_FMT[3:], (  # after the magic, written once at creation
            h.master_pid, h.started, h.generation, h.workers_target,
            h.reloads, h.reload_failures, h.last_reload, h.last_reload_ok, h.replaced_crashed,
            h.replaced_hung, h.recycled, h.reload_pending, h.metrics_port,
            *(getattr(c, name) for name in COUNTER_NAMES),
        ))

    def read_header(self) -> Header:
        values = struct.unpack_from(HEADER_FMT, self.mem, 0)
        return Header(*values[1:14], retired=Counters(*values[14:]))  # type: ignore[arg-type]

    def write_message(self, text: str) -> None:
        data = text.encode("utf-8", "replace")[: MESSAGE_SIZE - 1]
        self.mem[HEADER_SIZE:SLOTS_AT] = data + bytes(MESSAGE_SIZE - len(data))

    def read_message(self) -> str:
        return self.mem[HEADER_SIZE:SLOTS_AT].rstrip(b"\0").decode("utf-8", "replace")

    def totals(self) -> Counters:
        """Every worker's counters, the retired ones included."""
        total = Counters()
        total.add(self.read_header().retired or Counters())
        for _, slot in self.slots():
            total.add(slot.counters or Counters())
        return total

    def move_to(self, path: str) -> None:
        """Publish a board created at a private path (a USR2 successor, once let in)."""
        os.replace(self.path, path)
        self.path = path

    def keep_link(self, path: str) -> None:
        """A second name for our file, so a rollback can put it back (USR2, before "go")."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.link(self.path, path)
        self.kept = path

    def restore_link(self, path: str) -> None:
        """Our file back at its public name (a USR2 that failed after "go")."""
        if self._ours(path):
            os.replace(path, self.path)
        self.kept = ""

    def _ours(self, path: str) -> bool:
        try:
            return bool(path) and os.stat(path).st_ino == self.inode
        except FileNotFoundError:
            return False

    def remove_file_if_ours(self) -> None:
        """Remove the file (and a kept link) unless a newer master (USR2) has put its own there."""
        for path in (self.path, self.kept):
            if self._ours(path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        if self.words:
            for view in self.words:
                view.release()
            self.words = None
        self.mem.close()

