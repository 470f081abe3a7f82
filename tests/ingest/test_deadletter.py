"""The dead-letter store on a real SQLite file: kept with reasons, counted, listed, purged,
and surviving a reopen."""

from __future__ import annotations

import threading
from pathlib import Path

from cityward.ingest.deadletter import DeadLetters


def test_dead_letters_keep_reason_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "ingest" / "deadletter.db"
    store = DeadLetters(path, max_payload=16)
    a = store.add("air", b'{"no2": "n/a"}', field="$.no2", reason="expected a number", topic="c/a")
    b = store.add("air", b"x" * 40, field="$", reason="not JSON")
    store.add("noise", b"{}", field="$", reason="none of the mapped attributes")
    assert store.counts() == {"air": 2, "noise": 1}
    got = store.entries("air")
    assert [d.seq for d in got] == [a, b]
    assert got[0].payload == b'{"no2": "n/a"}' and not got[0].truncated
    assert got[0].field == "$.no2" and got[0].topic == "c/a"
    assert got[1].payload == b"x" * 16 and got[1].truncated
    assert [d.seq for d in store.entries(after=a)] == [b, b + 1]
    store.close()
    again = DeadLetters(path)
    assert again.counts() == {"air": 2, "noise": 1}
    assert again.purge("air", upto=a) == 1
    assert again.counts() == {"air": 1, "noise": 1}
    assert again.purge() == 2
    assert again.counts() == {}
    again.close()


def test_concurrent_adds_lose_nothing(tmp_path: Path) -> None:
    store = DeadLetters(tmp_path / "dl.db")

    def work(n: int) -> None:
        for i in range(200):
            store.add(f"s{n}", str(i).encode(), field="$", reason="bad")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.counts() == {f"s{n}": 200 for n in range(4)}
    assert len({d.seq for d in store.entries(limit=10_000)}) == 800
    store.close()
