"""``DiskStore``: a size-capped, crash-safe directory of content-addressed KV block files.

No MLX here: payloads are bytes. One file per block, named by its key (a SHA-256 digest,
``engine/disk_tier.py`` derives it). A file is a header (magic, the key, payload length,
CRC-32 of the payload) and the payload. Files are written by one background thread:
temporary name, ``fsync``, ``rename``, so a crash leaves either the whole file or a
temporary one (deleted at the next start). A read verifies magic, key, length and checksum;
a file that fails is a miss and is deleted.

One process owns a directory at a time: an exclusive ``fcntl`` lock on ``.lock``. A second
process on the same directory runs read-only (it loads what it finds, writes and deletes
nothing), so two servers never corrupt each other and the cap holds: only the owner writes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"NQ3KVB01"
HEADER = struct.Struct("<8s32sQI")  # magic, key, payload bytes, CRC-32 of the payload
SUFFIX = ".kvb"
TMP_SUFFIX = ".tmp"


class DiskStore:
    """Block files under ``directory``, at most ``cap_bytes`` in all (LRU by last use).

    ``put`` never blocks: it queues the write, or counts it as skipped when
    ``max_pending`` writes already wait. ``get`` may run on any thread.
    """

    def __init__(self, directory: str | Path, cap_bytes: int, max_pending: int = 64) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cap_bytes = int(cap_bytes)
        self._mu = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file bytes, LRU first
        self._pending: set[bytes] = set()
        self.num_bytes = 0
        self.counts = dict.fromkeys(("hits", "misses", "corrupt", "writes", "writes_skipped",
                                     "write_errors", "evictions"), 0)
        self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.writable = True
        except BlockingIOError:
            self.writable = False
            log.warning("prefix cache dir %s is locked by another process: using it read-only",
                        self.directory)
        self._queue: queue.Queue[tuple[bytes, bytes | memoryview] | None] = queue.Queue(max_pending)
        self._writer: threading.Thread | None = None
        if self.writable:
            self._scan()
            self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer",
                                            daemon=True)
            self._writer.start()

    # ---- paths and the index ------------------------------------------------------------
    def path(self, key: bytes) -> Path:
        return self.directory / f"{key.hex()}{SUFFIX}"

    def _scan(self) -> None:
        """Rebuild the index from the files (oldest use first); drop temporaries a crash
        left (no other writer exists: we hold the lock) and evict down to the cap."""
        found = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(TMP_SUFFIX):
                _unlink(entry.path)
            elif entry.name.endswith(SUFFIX) and entry.is_file():
                try:
                    key = bytes.fromhex(entry.name[:-len(SUFFIX)])
                    st = entry.stat()
                except (ValueError, OSError):
                    _unlink(entry.path)
                    continue
                found.append((st.st_mtime_ns, key, st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self.num_bytes += size
        with self._mu:
            self._evict_until(0)
        log.info("prefix cache dir %s: %d blocks, %.1f MB (cap %.1f MB)", self.directory,
                 len(self._index), self.num_bytes / 1e6, self.cap_bytes / 1e6)

    def contains(self, key: bytes) -> bool:
        """Is a block with this key stored (or queued to be)? Read-only: does its file exist."""
        if not self.writable:
            return self.path(key).is_file()
        with self._mu:
            return key in self._index or key in self._pending

    @property
    def num_blocks(self) -> int:
        return len(self._index)

    @property
    def num_pending(self) -> int:
        return self._queue.qsize()

    @property
    def writing(self) -> bool:
        """Writes queued or in progress: the stats still move."""
        with self._mu:
            return bool(self._pending)

    def free_slots(self) -> int:
        """Writes ``put`` can queue now without skipping."""
        return self._queue.maxsize - self._queue.qsize() if self.writable else 0

    # ---- writes -------------------------------------------------------------------------
    def put(self, key: bytes, payload: bytes | memoryview) -> bool:
        """Queue ``payload`` under ``key``; never blocks. False: skipped (queue full,
        read-only, larger than the cap) or already stored."""
        if not self.writable or HEADER.size + len(payload) > self.cap_bytes:
            return False
        with self._mu:
            if key in self._index or key in self._pending:
                return False
            try:
                self._queue.put_nowait((key, payload))
            except queue.Full:
                self.counts["writes_skipped"] += 1
                return False
            self._pending.add(key)
        return True

    def count_skipped(self, num: int) -> None:
        """Blocks the caller dropped before ``put`` because the queue had no room."""
        with self._mu:
            self.counts["writes_skipped"] += num

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            key, payload = item
            try:
                self._write(key, payload)
            except OSError as exc:  # a full or read-only disk: the cache is best effort
                self.counts["write_errors"] += 1
                log.warning("prefix cache write failed: %s", exc)
            finally:
                with self._mu:
                    self._pending.discard(key)
                self._queue.task_done()

    def _write(self, key: bytes, payload: bytes | memoryview) -> None:
        size = HEADER.size + len(payload)
        with self._mu:  # make room first, so the directory never exceeds the cap
            self._evict_until(size)
            self.num_bytes += size  # reserved; returned below if the write fails
        final = self.path(key)
        tmp = final.with_name(f"{final.name}.{os.getpid()}{TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, key, len(payload), zlib.crc32(payload)))
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # atomic: readers see the whole file or none
        except BaseException:
            _unlink(tmp)
            with self._mu:
                self.num_bytes -= size
            raise
        with self._mu:
            self._index[key] = size
            self.counts["writes"] += 1

    def _evict_until(self, incoming: int) -> None:
        """Delete least recently used files until ``incoming`` more bytes fit (lock held)."""
        while self._index and self.num_bytes + incoming > self.cap_bytes:
            key, size = self._index.popitem(last=False)
            self.num_bytes -= size
            self.counts["evictions"] += 1
            _unlink(self.path(key))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until queued writes are on disk (tests, shutdown); False on timeout."""
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True)
        waiter.start()
        return done.wait(timeout)

    def close(self) -> None:
        """Finish queued writes (a few seconds at most), stop the writer, release the lock."""
        if self._writer is not None:
            self.flush(10.0)
            try:
                self._queue.put(None, timeout=5.0)
            except queue.Full:  # a disk that hangs: the daemon thread is left behind
                pass
            self._writer.join(5.0)
            self._writer = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # ---- reads --------------------------------------------------------------------------
    def get(self, key: bytes, expected_len: int) -> memoryview | None:
        """The payload stored under ``key``, or None (missing, or corrupt: then deleted)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            self._miss(key, corrupt=False)
            return None
        payload = _verify(data, key, expected_len)
        if payload is None:
            log.warning("prefix cache file %s is corrupt, truncated or foreign: deleted", path.name)
            self._miss(key, corrupt=True)
            return None
        self._touch(key, path)
        return payload

    def get_into(self, key: bytes, chunks: list[memoryview]) -> bool:
        """Read the payload under ``key`` straight into ``chunks`` (in order, together its
        whole length): no intermediate copy. False for a miss (corrupt: deleted)."""
        path, crc = self.path(key), 0
        try:
            with open(path, "rb", buffering=0) as f:
                header = f.read(HEADER.size)
                ok = len(header) == HEADER.size
                if ok:
                    magic, stored_key, length, want = HEADER.unpack(header)
                    ok = magic == MAGIC and stored_key == key \
                        and length == sum(c.nbytes for c in chunks)
                for chunk in chunks if ok else ():
                    if f.readinto(chunk) != chunk.nbytes:
                        ok = False
                        break
                    crc = zlib.crc32(chunk, crc)
                ok = ok and crc == want and not f.read(1)
        except OSError:
            self._miss(key, corrupt=False)
            return False
        if not ok:
            log.warning("prefix cache file %s is corrupt, truncated or foreign: deleted", path.name)
            self._miss(key, corrupt=True)
            return False
        self._touch(key, path)
        return True

    def _touch(self, key: bytes, path: Path) -> None:
        """A hit: most recently used now, here and for the next start's scan."""
        with self._mu:
            self.counts["hits"] += 1
            if key in self._index:
                self._index.move_to_end(key)
        if self.writable:
            try:
                os.utime(path)
            except OSError:
                pass

    def _miss(self, key: bytes, corrupt: bool) -> None:
        with self._mu:
            self.counts["corrupt" if corrupt else "misses"] += 1
            if not self.writable:
                return
            size = self._index.pop(key, None)
            if size is not None:
                self.num_bytes -= size
            if corrupt:
                _unlink(self.path(key))

    def stats(self) -> dict[str, Any]:
        with self._mu:
            return {"dir": str(self.directory), "writable": self.writable,
                    "cap_bytes": self.cap_bytes, "bytes": self.num_bytes,
                    "blocks": len(self._index), "writes_pending": self._queue.qsize(),
                    **self.counts}


def _verify(data: bytes, key: bytes, expected_len: int) -> memoryview | None:
    if len(data) < HEADER.size:
        return None
    magic, stored_key, length, crc = HEADER.unpack_from(data)
    payload = memoryview(data)[HEADER.size:]  # no copy of the payload
    if magic != MAGIC or stored_key != key or length != expected_len or len(payload) != length:
        return None
    return payload if zlib.crc32(payload) == crc else None


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
