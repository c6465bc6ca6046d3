"""Connections per client address, for the whole server: `max_connections_per_client`.

Every worker of every generation of one master counts in one shared mapping
the master creates before it forks (anonymous MAP_SHARED; a USR2 successor
has its own: a connection handed to its workers is counted by them).  Python
has no atomic operations, and a lock held by a worker killed as hung would
stop every other, so nothing is shared for writing: each worker counts in its
own region (region = its scoreboard slot), which only it writes, and the
check at accept sums that address's count over the regions in use.  The
master zeroes a region before it forks a worker into it and after it reaps
one, so the connections of a worker that died vanish from the counts with it.

A region is an open-addressing hash table of (fingerprint, count) words, in
two halves: the writer fills the active one, and when it has too many
entries of addresses gone (count 0, kept so that probe chains stay whole), it
rebuilds the table from its own dict in the other half and flips the active
word, so a reader never sees a table half rebuilt.  Writes are single 8-byte
stores in this order: a new entry's fingerprint, then its count; a reader
loads the count before the fingerprint, so it never credits one address with
another's count.  The fingerprint is a keyed hash of the address (the key is
the master's, random): nobody can choose addresses that share another's count.

Cost of a check at accept: one probe per region in use (the high-water mark
of slots the master has used: 2 x workers during a reload), about a
microsecond each.  Races: two workers accepting from one address in the same
instant may both admit it, so the limit can be passed by workers - 1 for a
moment; a connection being handed over is counted twice until its new
worker confirms it (never zero times).

Capacity: ENTRIES per half; a worker counts up to FULL distinct addresses at
once and admits further ones uncounted (logged once).  The mapping is
MAP_NORESERVE and touched lazily: it costs the pages the counts use.
"""

from __future__ import annotations

import hashlib
import mmap
import os

from .logs import log

ENTRIES = 1 << 15  # per half-table; a power of two
FULL = ENTRIES * 3 // 4  # entries (live or gone) that make a half-table rebuild
HALF_WORDS = ENTRIES * 2  # (fingerprint, count) per entry
PAGE_WORDS = mmap.PAGESIZE // 8
REGION_WORDS = PAGE_WORDS + 2 * HALF_WORDS  # a page for the active-half word, then the halves
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; not in Python 3.11's mmap


class ClientTable:
    """The shared mapping: a header page (word 0: regions in use), then one region per slot."""

    def __init__(self, regions: int) -> None:
        self.regions = regions
        size = (PAGE_WORDS + regions * REGION_WORDS) * 8
        self.mem = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | MAP_NORESERVE)
        self.words = memoryview(self.mem).cast("Q")
        self.key = os.urandom(16)

    def fingerprint(self, client: tuple[int, int]) -> int:
        """A keyed 64-bit hash of (version, address), never 0 (0 marks an empty entry)."""
        version, ip = client
        digest = hashlib.blake2b(ip.to_bytes(16, "big") + bytes((version,)), digest_size=8, key=self.key)
        return int.from_bytes(digest.digest(), "little") | 1

    def total(self, fingerprint: int, limit: int) -> int:
        """Connections of that address in every region in use (stops counting at `limit`)."""
        words = self.words
        start = (fingerprint >> 1) & (ENTRIES - 1)
        total = 0
        for region in range(min(words[0], self.regions)):
            base = PAGE_WORDS + region * REGION_WORDS
            table = base + PAGE_WORDS + (words[base] & 1) * HALF_WORDS
            index = start
            while True:
                at = table + 2 * index
                count = words[at + 1]  # before the fingerprint: see the module docstring
                found = words[at]
                if found == fingerprint:
                    total += count
                    break
                if not found:
                    break
                index = (index + 1) & (ENTRIES - 1)
            if total >= limit:
                break
        return total

    # --- the master's part --------------------------------------------------

    def open_region(self, region: int) -> None:
        """Before a worker is forked into `region`: zeroed, and within the regions readers scan."""
        self.clear(region)
        if self.words[0] <= region:
            self.words[0] = region + 1

    def clear(self, region: int) -> None:
        """Zero a region (its worker is gone or not born yet), giving its pages back."""
        start = (PAGE_WORDS + region * REGION_WORDS) * 8
        length = REGION_WORDS * 8
        try:
            self.mem.madvise(mmap.MADV_REMOVE, start, length)
        except (AttributeError, OSError):  # no hole punching here: write the zeros
            self.mem[start:start + length] = bytes(length)


class ClientCounts:
    """A worker's own region: the only writer of it, with its own dict as the truth."""

    def __init__(self, table: ClientTable, region: int) -> None:
        self.table = table
        self.base = PAGE_WORDS + region * REGION_WORDS
        self.counts: dict[int, int] = {}  # fingerprint -> connections
        self.entry: dict[int, int] = {}  # fingerprint -> its word in the active half
        self.used = 0  # entries taken in the active half, live or gone
        self.warned = False

    def _half(self) -> int:
        words = self.table.words
        return self.base + PAGE_WORDS + (words[self.base] & 1) * HALF_WORDS

    def add(self, fingerprint: int) -> bool:
        """Count one connection more; False when the table is full (it is then not counted)."""
        count = self.counts.get(fingerprint, 0)
        words = self.table.words
        at = self.entry.get(fingerprint)
        if at is None:
            if self.used >= FULL and not self._rebuild():
                if not self.warned:
                    self.warned = True
                    log.warning("max_connections_per_client: %d client addresses on this worker, the most "
                                "it can count; connections from more addresses are not counted", FULL)
                return False
            at = self._insert(fingerprint)
            self.entry[fingerprint] = at
        self.counts[fingerprint] = count + 1
        words[at + 1] = count + 1
        return True

    def remove(self, fingerprint: int) -> None:
        count = self.counts.get(fingerprint, 0) - 1
        if count < 0:
            return
        if count:
            self.counts[fingerprint] = count
        else:
            del self.counts[fingerprint]  # its entry stays, count 0, for the probe chains
        self.table.words[self.entry[fingerprint] + 1] = count

    def _insert(self, fingerprint: int) -> int:
        """A word for a new fingerprint: the first empty or gone entry on its probe chain."""
        words = self.table.words
        half = self._half()
        index = (fingerprint >> 1) & (ENTRIES - 1)
        while True:
            at = half + 2 * index
            found = words[at]
            if not found:
                self.used += 1
                break
            if not words[at + 1] and found not in self.counts:  # gone: reuse it
                self.entry.pop(found, None)
                break
            index = (index + 1) & (ENTRIES - 1)
        words[at + 1] = 0
        words[at] = fingerprint  # the count (still 0) is set by the caller, after this
        return at

    def _rebuild(self) -> bool:
        """The live entries alone, in the other half; then readers are switched to it."""
        if len(self.counts) >= FULL:
            return False
        words = self.table.words
        active = words[self.base] & 1
        other = self.base + PAGE_WORDS + (1 - active) * HALF_WORDS
        start = other * 8
        try:
            self.table.mem.madvise(mmap.MADV_REMOVE, start, HALF_WORDS * 8)
        except (AttributeError, OSError):
            self.table.mem[start:start + HALF_WORDS * 8] = bytes(HALF_WORDS * 8)
        self.entry.clear()
        self.used = 0
        for fingerprint, count in self.counts.items():
            index = (fingerprint >> 1) & (ENTRIES - 1)
            while words[other + 2 * index]:
                index = (index + 1) & (ENTRIES - 1)
            at = other + 2 * index
            words[at + 1] = count
            words[at] = fingerprint
            self.entry[fingerprint] = at
            self.used += 1
        words[self.base] = 1 - active
        return True
