"""Record batches of the publisher: byte for byte what kafka-python's own builder writes, and
read back by kafka-python's reader."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from service.records import record_batches, zigzag_varint


def kafka_python_batches(values: list[bytes], ts: int, max_bytes: int) -> list[tuple[bytes, int]]:
    out, i = [], 0
    while i < len(values):
        builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                            producer_epoch=-1, base_sequence=-1, batch_size=max_bytes)
        start = i
        while i < len(values) and builder.append(i - start, ts, None, values[i], ()) is not None:
            i += 1
        out.append((bytes(builder.build()), i - start))
    return out


# lengths around 16,384, where service.records' table of small varints ends (their content is
# not varied: random kilobytes exceed what hypothesis lets one example draw)
_long = st.integers(16_380, 16_400).map(lambda n: b"v" * n)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.binary(max_size=300) | _long, max_size=40),
       ts=st.integers(0, 2**45), max_bytes=st.sampled_from([100, 1_000, 20_000, 1 << 20]))
def test_batches_are_kafka_pythons_bytes(values, ts, max_bytes):
    ours = list(record_batches(values, ts, max_bytes))
    assert ours == kafka_python_batches(values, ts, max_bytes)
    read = [(r.offset, r.timestamp, r.key, r.value, r.headers) for batch, _ in ours for r in DefaultRecordBatch(batch)]
    offsets = [o for batch, n in ours for o in range(n)]
    assert read == [(o, ts, None, v, []) for o, v in zip(offsets, values, strict=True)]


def test_a_batch_over_the_limit_still_takes_its_first_message():
    assert [n for _, n in record_batches([b"x" * 500, b"y" * 500, b"z"], 0, max_bytes=200)] == [1, 1, 1]


@given(st.integers(-(2**63), 2**63 - 1))
def test_varints_round_trip(n):
    from kafka.record.util import decode_varint

    assert decode_varint(zigzag_varint(n), 0) == (n, len(zigzag_varint(n)))
