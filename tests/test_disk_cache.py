"""DiskStore (engine/disk_cache.py): atomic files, checksums, the LRU cap, the lock, the queue."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nano_qwen3_mlx.engine.disk_cache import HEADER, DiskStore


def key(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def payload(i: int, n: int = 1000) -> bytes:
    return bytes((i + j) % 256 for j in range(n))


@pytest.fixture
def store(tmp_path: Path):
    s = DiskStore(tmp_path / "cache", cap_bytes=10 * (HEADER.size + 1000))
    yield s
    s.close()


def test_round_trip_survives_a_restart(tmp_path: Path, store: DiskStore) -> None:
    for i in range(3):
        assert store.put(key(i), payload(i))
    assert store.flush()
    assert not store.put(key(0), payload(0))  # stored already: no second write
    store.close()
    again = DiskStore(tmp_path / "cache", cap_bytes=store.cap_bytes)
    try:
        assert again.num_blocks == 3 and again.num_bytes == 3 * (HEADER.size + 1000)
        assert bytes(again.get(key(1), 1000)) == payload(1)
        assert again.get(key(7), 1000) is None and again.counts["misses"] == 1
    finally:
        again.close()


def read(store: DiskStore, k: bytes, length: int, into: bool) -> bytes | None:
    """``get``, or ``get_into`` two buffers (the engine's reader fills the pool's layout)."""
    if not into:
        payload = store.get(k, length)
        return None if payload is None else bytes(payload)
    head, tail = bytearray(length // 2), bytearray(length - length // 2)
    return bytes(head + tail) if store.get_into(k, [memoryview(head), memoryview(tail)]) else None


@pytest.mark.parametrize("into", [False, True])
@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "wrong_length", "empty",
                                    "longer"])
def test_damaged_files_are_misses_and_deleted(store: DiskStore, damage: str, into: bool) -> None:
    assert store.put(key(1), payload(1)) and store.put(key(2), payload(2)) and store.flush()
    path = store.path(key(1))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF  # payload bit flip: the CRC catches it
    elif damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "foreign":  # another block's file under this name: the key inside differs
        data = bytearray(store.path(key(2)).read_bytes())
    elif damage == "empty":
        data = bytearray()
    elif damage == "longer":  # bytes appended after a whole file
        data += b"x"
    path.write_bytes(bytes(data))
    expected_len = 999 if damage == "wrong_length" else 1000
    assert read(store, key(1), expected_len, into) is None
    assert not path.exists() and store.counts["corrupt"] == 1
    assert not store.contains(key(1))
    assert read(store, key(2), 1000, into) == payload(2)


def test_cap_holds_under_load_and_evicts_least_recently_used(store: DiskStore) -> None:
    for i in range(5):
        store.put(key(i), payload(i))
    assert store.flush()
    store.get(key(0), 1000)  # used: now the most recent
    for i in range(5, 40):
        store.put(key(i), payload(i))
        assert store.flush()
        on_disk = sum(p.stat().st_size for p in store.directory.glob("*.kvb"))
        assert on_disk <= store.cap_bytes and store.num_bytes == on_disk
    assert store.num_blocks == 10
    assert store.counts["evictions"] == 30
    assert not store.contains(key(0))  # 35 newer writes pushed it out in the end
    assert store.contains(key(39))


def test_restart_rebuilds_the_index_drops_temporaries_and_applies_a_smaller_cap(
        tmp_path: Path, store: DiskStore) -> None:
    for i in range(6):
        store.put(key(i), payload(i))
        store.flush()
        time.sleep(0.01)  # distinct mtimes: the LRU order the scan rebuilds
    store.close()
    tmp = store.directory / f"{key(99).hex()}.kvb.12345.tmp"  # a write cut by kill -9
    tmp.write_bytes(b"half a file")
    small = DiskStore(store.directory, cap_bytes=3 * (HEADER.size + 1000))
    try:
        assert not tmp.exists()
        assert small.num_blocks == 3
        assert [small.contains(key(i)) for i in range(6)] == [False] * 3 + [True] * 3
    finally:
        small.close()


def test_a_second_process_on_the_directory_is_read_only(tmp_path: Path, store: DiskStore) -> None:
    store.put(key(1), payload(1))
    store.flush()
    other = DiskStore(store.directory, cap_bytes=store.cap_bytes)
    try:
        assert store.writable and not other.writable
        assert not other.put(key(2), payload(2))  # writes nothing
        assert bytes(other.get(key(1), 1000)) == payload(1)  # reads what the owner wrote
        store.path(key(1)).write_bytes(b"garbage")
        assert other.get(key(1), 1000) is None
        assert store.path(key(1)).exists()  # and deletes nothing: the owner does that
    finally:
        other.close()
    store.close()
    after = DiskStore(store.directory, cap_bytes=store.cap_bytes)  # the lock went with close
    try:
        assert after.writable
    finally:
        after.close()


def test_put_never_blocks_a_full_queue_skips(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "c", cap_bytes=10**7, max_pending=2)
    release = threading.Event()
    write = store._write
    store._write = lambda k, p: (release.wait(10), write(k, p))  # a very slow disk
    try:
        t0 = time.perf_counter()
        queued = [store.put(key(i), payload(i)) for i in range(20)]
        assert time.perf_counter() - t0 < 0.5
        assert sum(queued) <= 3  # the one being written plus two waiting
        assert store.counts["writes_skipped"] == 20 - sum(queued)
        release.set()
        assert store.flush()
        assert store.num_blocks == sum(queued)
    finally:
        release.set()
        store.close()


def test_kill_during_a_write_leaves_no_partial_block(tmp_path: Path) -> None:
    """A child process dies (SIGKILL) while writing: the restart keeps only whole files."""
    directory = tmp_path / "c"
    code = ("import hashlib, sys\n"
            "from nano_qwen3_mlx.engine.disk_cache import DiskStore\n"
            "s = DiskStore(sys.argv[1], cap_bytes=10**9)\n"
            "print('ready', flush=True)\n"
            "for i in range(10**6):\n"
            "    s.put(hashlib.sha256(str(i).encode()).digest(), bytes([i % 256]) * 50_000)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 30
    while len(list(directory.glob("*.kvb"))) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    child.kill()  # SIGKILL, in the middle of a write most likely
    child.wait()
    store = DiskStore(directory, cap_bytes=10**9)
    try:
        assert store.writable  # the dead process's lock went with it
        assert store.num_blocks > 0
        assert not list(directory.glob("*.tmp"))
        for p in directory.glob("*.kvb"):
            k = bytes.fromhex(p.name[:-4])
            assert store.get(k, 50_000) is not None
        assert store.counts["corrupt"] == 0
    finally:
        store.close()
