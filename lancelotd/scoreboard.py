"""The scoreboard: shared memory where every process publishes what it is doing.

Like Apache's scoreboard: the master creates one file-backed shared mapping
before it forks (next to the PID file, so `lancelotd status` finds it from
the PID file's location alone), with a header for the master and one slot
per worker.  A worker writes its own slot once per loop tick, never per
request, so the hot path pays nothing; the master reads slots to learn that
a worker is ready, to check its heartbeat, and to keep the totals of
workers that have exited.

The file is allocated when it is created (posix_fallocate): on a full /run
the master refuses to start, where a sparse file would have been a SIGBUS
in whichever process first touched an unbacked page, days later.

Concurrency.  A slot has one writer at a time (the master before the fork
and after the reap, the worker in between), the header one (the master);
readers in other processes read at any moment.  Python has plain loads and
stores only, no atomics and no fences, so:

- Every field is a naturally aligned 8-byte word written with one store: no
  reader sees half a number, and counters only grow.
- A slot is a seqlock: the writer makes the slot's sequence word odd, stores
  the fields, makes it even; read_slot retries until it reads one even value
  before and after the fields.  Without it a worker's first tick (pid,
  number, generation, state=SERVING, started, heartbeat, ...) over the
  master's STARTING slot (heartbeat 0) could be read as SERVING with
  heartbeat 0, which the master took for "no progress since boot".  A writer
  preempted or killed mid-write leaves the word odd; after SLOT_PATIENCE the
  reader takes the slot as it is, and the order of the stores makes that
  safe: a state is stored after the fields it vouches for, and a slot
  leaving for FREE or STARTING gets its state before its fields are zeroed.
- The header and the last reload's message are one record under a seqlock
  and a checksum, so `lancelotd reload` never pairs a new count with the
  previous result, and never reports a refused reload as done.

x86-64 keeps stores in order and loads in order, so the seqlocks are exact
there.  arm64 may reorder both, and CPython offers no barrier: there the
checksum still makes every header read exact (a torn record fails it and is
read again), while a slot read may rarely be torn; so the master never takes
a heartbeat of 0, or one older than the worker's spawn, as the time of its
last progress (last_progress).

Readers check the layout version in the magic: after a USR2 the old and the
new code run side by side, and each refuses the other's layout.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields

from . import runtime, trust
from .runtime import open_new_file
from .sockets import pack_address, unpack_address

# Bump on any change of the layout below; layout 1 had no sequence words, layout 2 no PROXY
# counters (the header's retired counters sit before fields appended later) nor recent clients.
LAYOUT = 3
MAGIC_PREFIX = b"LNCLTSB"
MAGIC = MAGIC_PREFIX + str(LAYOUT).encode()
SLOTS = 512
MODE = 0o640  # it holds client addresses: the master's user and group only (`status` as root or in the group)

# Worker states
FREE, STARTING, SERVING, DRAINING, STOPPING = range(5)
STATE_NAMES = {FREE: "free", STARTING: "starting", SERVING: "serving", DRAINING: "draining",
               STOPPING: "stopping"}


class ScoreboardError(ValueError):
    """A scoreboard this code cannot read: another layout, not one at all, or never settled."""


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
    # access (access.py): connections refused at accept, by cause, and open ones a reload's rules deny
    denied: int = 0
    per_client_limit: int = 0
    denied_open: int = 0
    # PROXY protocol v2 listeners (proxied.py): health checks (LOCAL headers), and connections
    # closed for a header that is invalid, a source not in proxy_protocol_from, or no header in time
    proxy_local: int = 0
    proxy_invalid: int = 0
    proxy_untrusted: int = 0
    proxy_timeout: int = 0

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
    heartbeat: float = 0.0  # time.monotonic() of the last loop tick; 0 = none yet
    connections: int = 0
    rate: float = 0.0  # questions answered per second over the last tick
    counters: Counters | None = None
    clients: tuple = ()  # the addresses of its latest connections, newest first (RECENT_CLIENTS)


def last_progress(slot: Slot, spawned: float) -> float:
    """When the worker last showed progress, by the monotonic clock: for hang detection.

    `spawned` is the master's time.monotonic() at the fork.  A heartbeat of 0
    (none written yet: a STARTING slot, or a torn read of the first tick) or
    one older than the spawn (a previous tenant's) says nothing about this
    worker: it is judged from its spawn.
    """
    return max(slot.heartbeat, spawned)


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
    # Behind a balancer (balancer.py): appended after the counters, so a reader of the older
    # header (a USR2 peer) still reads its own fields, and reads these as 0 from an older writer.
    agent_port: int = 0  # so `status` can tell the agent listener from the service's
    balance: int = 0  # balancer.READY, DRAINED, STOPPING or NOT_SERVING: what the agent answers
    drained: int = 0  # 1 while the operator's drain file exists (also while stopping)
    # 1 in a USR2 successor until the old master lets it in: its workers boot and serve hand-offs, but
    # accept nothing, so a successor that gives up holds no client (upgrade.py)
    accepts_held: int = 0


# q = 8-byte words throughout, d for times.
# Header: magic, sequence, checksum, then the fields; the message follows at HEADER_SIZE.
# The checksum covers everything from the fields to the message's end (RECORD_AT:SLOTS_AT).
SEQ_AT, CHECKSUM_AT, RECORD_AT = 8, 16, 24
HEADER_FMT = "<qdqqqqdqqqqqq" + "q" * len(COUNTER_NAMES) + "qqqq"
HEADER_SIZE = 512
MESSAGE_SIZE = 1024  # the last reload's result, for `lancelotd reload` to print
SLOTS_AT = HEADER_SIZE + MESSAGE_SIZE
# Slot: sequence, then the Slot fields in order, counters last (room for more up to CLIENTS_WORD);
# then from CLIENTS_WORD the recent clients, 3 words each: family << 16 | port, 16 address bytes.
SLOT_FMT = "<qqqqqddqd" + "q" * len(COUNTER_NAMES)
SLOT_SIZE = 512
STATE_WORD = 4  # the state's word in a slot
CLIENTS_WORD = 40
RECENT_CLIENTS = 8
CLIENTS_FMT = "<" + "q16s" * RECENT_CLIENTS
assert RECORD_AT + struct.calcsize(HEADER_FMT) <= HEADER_SIZE
assert struct.calcsize(SLOT_FMT) <= CLIENTS_WORD * 8 and (CLIENTS_WORD + 3 * RECENT_CLIENTS) * 8 <= SLOT_SIZE
SIZE = SLOTS_AT + SLOTS * SLOT_SIZE
READ_TRIES = 100  # header reads between naps (a write takes microseconds)
SLOT_PATIENCE = 0.05  # seconds a slot read waits for a writer to finish its write
HEADER_PATIENCE = 1.0  # seconds a header read waits for a record that checks out


def path_for(pid_file: str) -> str:
    return pid_file + ".scoreboard"


def check_layout(magic: bytes, path: str) -> None:
    """Refuse a file that is not a scoreboard of our layout, saying which it is."""
    if magic == MAGIC:
        return
    if len(magic) == len(MAGIC) and magic.startswith(MAGIC_PREFIX):
        version = magic[len(MAGIC_PREFIX):].decode("ascii", "replace")
        raise ScoreboardError(f"{path}: scoreboard layout version {version}, this lancelotd reads {LAYOUT}: "
                              "run the lancelotd that started the master")
    raise ScoreboardError(f"{path} is not a lancelotd scoreboard")


def checksum(record: bytes) -> bytes:
    """CRC-32 in an 8-byte word: a torn copy of the record fails it (but for one in 2**32)."""
    return zlib.crc32(record).to_bytes(8, "little")


class Scoreboard:
    def __init__(self, mem: mmap.mmap, path: str = "") -> None:
        self.mem = mem
        self.path = path
        self.inode = os.stat(path).st_ino if path else 0
        self.kept = ""  # a second name for the file while a USR2 may still roll back
        self.words: tuple[memoryview, memoryview] | None = None  # 'q' and 'd' views, for writers
        self.staged_message: str | None = None  # write_message's text, for the next publish
        self.message = ""  # the published one (the master is the only writer)

    @classmethod
    def create(cls, path: str | None) -> Scoreboard:
        """A zeroed scoreboard naming us as its master: in a file beside the PID file, or anonymous.

        The file's blocks are allocated here: a full filesystem is an OSError
        (ENOSPC) now, and no temporary file is left behind.
        """
        if not path:
            return cls._initialised(mmap.mmap(-1, SIZE), "")
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = open_new_file(tmp, os.O_RDWR, MODE)  # O_EXCL|O_NOFOLLOW: never through a planted link
        try:
            try:
                os.fchmod(fd, MODE)  # whatever the umask: the clients' addresses are not for everyone
                if runtime.SERVICE_OWNER is not None:  # workers of another user read it after a USR2
                    os.fchown(fd, -1, runtime.SERVICE_OWNER[1])
                os.posix_fallocate(fd, 0, SIZE)
                mem = mmap.mmap(fd, SIZE)
            finally:
                os.close(fd)
            board = cls._initialised(mem, tmp)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        board.path = path
        return board

    @classmethod
    def _initialised(cls, mem: mmap.mmap, path: str) -> Scoreboard:
        """Magic and a first header record, before any reader can see the file."""
        board = cls(mem, path)
        board.mem[:len(MAGIC)] = MAGIC
        board.publish(Header(master_pid=os.getpid(), started=time.time(), retired=Counters()), "")
        return board

    @classmethod
    def open(cls, path: str, owners: set[int] | None = None) -> Scoreboard:
        """Read-only view (`lancelotd status`, a retiring worker after a USR2): our layout only.

        Opened as trust.py says (no link, no FIFO, a regular file owned by root or
        the directory's owner, or by one of `owners`): `status` runs as root.
        """
        directory = trust.open_directory(os.path.dirname(os.path.abspath(path)))
        with directory:
            fd = directory.open_file(os.path.basename(path), directory.trusted() | (owners or set()))
        try:
            check_layout(os.pread(fd, len(MAGIC), 0), path)
            size = os.fstat(fd).st_size
            if size < SIZE:  # mapped past its end, a read would be a SIGBUS
                raise ScoreboardError(f"{path} is cut short ({size} bytes of {SIZE})")
            mem = mmap.mmap(fd, SIZE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(mem)

    def _views(self) -> tuple[memoryview, memoryview]:
        if self.words is None:
            view = memoryview(self.mem)
            self.words = (view.cast("q"), view.cast("d"))
        return self.words

    # --- worker slots ----------------------------------------------------

    def write_slot(self, index: int, slot: Slot) -> None:
        """One store per field (not struct.pack_into, which zeroes the range first), under the seqlock.

        The state goes last, after the fields it vouches for; a slot leaving
        for FREE or STARTING gets it first too, before its fields are zeroed:
        so even a write frozen halfway reads safely (see read_slot).
        """
        ints, floats = self._views()
        base = (SLOTS_AT + index * SLOT_SIZE) // 8
        seq = ints[base] | 1  # odd: "being written"; already odd if a writer died mid-write
        ints[base] = seq
        if slot.state <= STARTING:
            ints[base + STATE_WORD] = slot.state
        ints[base + 1] = slot.pid
        ints[base + 2] = slot.number
        ints[base + 3] = slot.generation
        floats[base + 5] = slot.started
        floats[base + 6] = slot.heartbeat
        ints[base + 7] = slot.connections
        floats[base + 8] = slot.rate
        c = slot.counters or Counters()
        for i, name in enumerate(COUNTER_NAMES, base + 9):
            ints[i] = getattr(c, name)
        at = base + CLIENTS_WORD
        for i in range(RECENT_CLIENTS):
            family, raw, port = pack_address(slot.clients[i] if i < len(slot.clients) else None)
            ints[at] = family << 16 | port
            ints[at + 1] = int.from_bytes(raw[:8], "little", signed=True)
            ints[at + 2] = int.from_bytes(raw[8:], "little", signed=True)
            at += 3
        ints[base + STATE_WORD] = slot.state
        ints[base] = seq + 1

    def read_slot(self, index: int) -> Slot:
        """A slot as its writer left it between two writes (see the module docstring).

        A writer that stops mid-write (preempted, or killed) gets SLOT_PATIENCE
        to finish; then the reader takes the slot as it is, which the order of
        write_slot's stores makes safe: never a state with another's fields.
        """
        offset = SLOTS_AT + index * SLOT_SIZE
        mem = self.mem
        deadline = 0.0
        after = -1
        while True:
            last, (before,) = after, struct.unpack_from("<q", mem, offset)
            values = struct.unpack_from(SLOT_FMT, mem, offset)
            clients = struct.unpack_from(CLIENTS_FMT, mem, offset + CLIENTS_WORD * 8)
            (after,) = struct.unpack_from("<q", mem, offset)
            if before == after and not before & 1:
                break
            now = time.monotonic()
            deadline = deadline or now + SLOT_PATIENCE
            if now > deadline:
                break
            if after == last:  # no progress since the last try: let the writer run
                os.sched_yield()
        pairs = zip(clients[::2], clients[1::2], strict=True)
        recent = (unpack_address(word >> 16, raw, word & 0xFFFF) for word, raw in pairs)
        return Slot(*values[1:9], counters=Counters(*values[9:]),  # type: ignore[arg-type]
                    clients=tuple(address for address in recent if address is not None))

    def _state(self, index: int) -> int:
        return struct.unpack_from("<q", self.mem, SLOTS_AT + index * SLOT_SIZE + STATE_WORD * 8)[0]

    def free_slot(self) -> int:
        for index in range(SLOTS):
            if self._state(index) == FREE:
                return index
        raise RuntimeError("scoreboard full")

    def clear_slot(self, index: int) -> None:
        self.write_slot(index, Slot())

    def slots(self) -> Iterator[tuple[int, Slot]]:
        for index in range(SLOTS):
            if self._state(index) != FREE:
                slot = self.read_slot(index)
                if slot.state != FREE:
                    yield index, slot

    # --- header and reload message (master) ---------------------------------

    def publish(self, h: Header, message: str | None = None) -> None:
        """Publish the header, and the reload message with it when given, as one record.

        `message` None keeps the current one (or the one write_message staged).
        """
        if message is None:
            message = self.staged_message if self.staged_message is not None else self.message
        self.staged_message = None
        data = message.encode("utf-8", "replace")[: MESSAGE_SIZE - 1]
        ints, _ = self._views()
        seq = ints[SEQ_AT // 8] | 1
        ints[SEQ_AT // 8] = seq
        c = h.retired or Counters()
        struct.pack_into(HEADER_FMT, self.mem, RECORD_AT,
                         h.master_pid, h.started, h.generation, h.workers_target,
                         h.reloads, h.reload_failures, h.last_reload, h.last_reload_ok, h.replaced_crashed,
                         h.replaced_hung, h.recycled, h.reload_pending, h.metrics_port,
                         *(getattr(c, name) for name in COUNTER_NAMES), h.agent_port, h.balance, h.drained,
                         h.accepts_held)
        self.mem[HEADER_SIZE:SLOTS_AT] = data + bytes(MESSAGE_SIZE - len(data))
        self.mem[CHECKSUM_AT:RECORD_AT] = checksum(self.mem[RECORD_AT:SLOTS_AT])
        ints[SEQ_AT // 8] = seq + 1
        self.message = message

    def write_header(self, h: Header) -> None:
        """publish(h): kept for callers that stage the message with write_message first."""
        self.publish(h)

    def write_message(self, text: str) -> None:
        """Stage the reload message: it goes out with the next publish, together with its header."""
        self.staged_message = text

    def read_reload_result(self) -> tuple[Header, str]:
        """The header and the message as the master last published them, together."""
        record = self._read_record()
        values = struct.unpack_from(HEADER_FMT, record, RECORD_AT - CHECKSUM_AT)
        counted = 13 + len(COUNTER_NAMES)
        header = Header(*values[:13], Counters(*values[13:counted]),  # type: ignore[arg-type]
                        *values[counted:])
        message = record[HEADER_SIZE - CHECKSUM_AT:].rstrip(b"\0").decode("utf-8", "replace")
        return header, message

    def read_header(self) -> Header:
        return self.read_reload_result()[0]

    def read_message(self) -> str:
        return self.read_reload_result()[1]

    def _read_record(self) -> bytes:
        """Checksum and record, read again until the sequence and the checksum agree."""
        deadline = 0.0
        while True:
            for _ in range(READ_TRIES):
                (before,) = struct.unpack_from("<q", self.mem, SEQ_AT)
                record = self.mem[CHECKSUM_AT:SLOTS_AT]
                (after,) = struct.unpack_from("<q", self.mem, SEQ_AT)
                if before == after and not before & 1 and checksum(record[8:]) == record[:8]:
                    return record
            now = time.monotonic()
            deadline = deadline or now + HEADER_PATIENCE
            if now > deadline:
                raise ScoreboardError("the master's record in the scoreboard does not settle "
                                      "(did the master die while writing it?)")
            time.sleep(0.001)  # the master may be preempted mid-write: let it finish

    def totals(self, slots: list[Slot] | None = None) -> Counters:
        """Every worker's counters, the retired ones included; from `slots` when the caller read them
        already (a metrics scrape: its per-worker series then add up to its totals)."""
        if slots is None:
            slots = [slot for _, slot in self.slots()]
        total = Counters()
        total.add(self.read_header().retired or Counters())
        for slot in slots:
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
        if self._ours(self.path):  # still in place (rename() of two links to one file does nothing)
            os.unlink(path)
        elif self._ours(path):
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
