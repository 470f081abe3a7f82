"""The readings' stream messages (cityward.ingest.jetstream): packing, ids, decoding."""

from __future__ import annotations

import orjson
import pytest

from cityward.ingest import jetstream
from cityward.ingest.jetstream import decode_message, encode_reading, message_id, pack
from cityward.ingest.writer import Reading


def _reading(source: str, n: int, raw: bytes = b"{}") -> Reading:
    frag = {"id": f"urn:ngsi-ld:X:{n}", "type": ["X"], "attrs": {}}
    return Reading(source, f"m:{n}", frag, raw=raw, topic=f"t/{n}")


def test_messages_hold_readings_of_one_source_in_order_up_to_the_limits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readings = [_reading("a" if n % 3 else "b", n) for n in range(20)]
    packed = pack(readings, per_message=4)
    # sources in the order they first come, each one's readings in order, 4 at most
    assert [s for s, _, _ in packed] == ["b", "b", "a", "a", "a", "a"]
    for source, chunk, data in packed:
        assert 1 <= len(chunk) <= 4 and {r.source for r in chunk} == {source}
        back = decode_message(data)
        assert [(r.source, r.key, r.fragment, r.raw, r.topic) for r in back] == [
            (r.source, r.key, r.fragment, r.raw, r.topic) for r in chunk
        ]
    assert [r.key for _, c, _ in packed if c[0].source == "a" for r in c] == [
        r.key for r in readings if r.source == "a"
    ]
    # the byte limit: a message ends before it would pass MESSAGE_BYTES; a reading larger
    # than that still goes, alone
    monkeypatch.setattr(jetstream, "MESSAGE_BYTES", 600)
    big = [_reading("a", 0, b"x" * 1000), *(_reading("a", n, b"y" * 100) for n in range(1, 9))]
    sizes = [len(c) for _, c, _ in pack(big, per_message=250)]
    assert sizes[0] == 1 and sum(sizes) == 9 and len(sizes) > 2
    assert all(len(d) <= 600 for _, c, d in pack(big, per_message=250) if len(c) > 1)


def test_the_same_readings_make_the_same_id_and_others_another() -> None:
    one = [_reading("a", n) for n in range(5)]
    assert message_id("a", one) == message_id("a", [_reading("a", n) for n in range(5)])
    assert message_id("a", one) != message_id("a", one[:4])
    assert message_id("a", one) != message_id("a", [*one[:4], _reading("a", 9)])
    assert message_id("a", one) != message_id("b", one)


def test_a_single_reading_message_of_an_earlier_front_is_read() -> None:
    r = _reading("a", 7, b"\x00raw")
    (back,) = decode_message(encode_reading(r))
    assert (back.source, back.key, back.fragment, back.raw, back.topic) == (
        "a",
        "m:7",
        r.fragment,
        b"\x00raw",
        "t/7",
    )
    assert encode_reading(_reading("a", 1, b"z" * 10), max_raw=4).count(b"enp6eno=") == 1


@pytest.mark.parametrize(
    "data",
    [
        b"[1, 2]",
        b'{"readings": 3}',
        b'{"readings": [{"source": "a"}]}',
        b"not json",
        b'{"source": "a", "key": "k", "fragment": []}',
    ],
)
def test_a_message_without_readings_is_refused(data: bytes) -> None:
    with pytest.raises((ValueError, KeyError, TypeError, orjson.JSONDecodeError)):
        decode_message(data)
