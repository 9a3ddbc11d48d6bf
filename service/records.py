"""Kafka record batches (message format v2) of keyless messages, for the publisher child.

kafka-python's ``DefaultRecordBatchBuilder`` writes each record with a dozen Python calls (type
checks, a varint a byte at a time): 1.7 µs a message, a prediction per event. These are the same
bytes from a few joins, the small varints taken from a table: ~0.5 µs a message. Every record of a
batch has the batch's timestamp, no key and no headers, which is what the publisher sends.

>>> batches = list(record_batches([b"a", b"bc"], timestamp_ms=1_700_000_000_000))
>>> [(len(batch), n) for batch, n in batches]
[(78, 2)]
>>> from kafka.record.default_records import DefaultRecordBatch
>>> [r.value for r in DefaultRecordBatch(batches[0][0])]
[b'a', b'bc']
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

from kafka.record.util import calc_crc32c

# base offset, length, partition leader epoch, magic, CRC, attributes, last offset delta, first
# and max timestamp, producer id and epoch, base sequence, record count
_HEADER = struct.Struct(">qiibIhiqqqhii")
_LENGTH_FROM = 12  # the length counts the bytes after the base offset and itself
_CRC_AT = 17  # the CRC field, covering every byte from the attributes on
_ATTRIBUTES_AT = 21


def zigzag_varint(n: int) -> bytes:
    """Kafka's signed varint: zigzag, then 7 bits a byte, least significant first.

    >>> [zigzag_varint(n).hex() for n in (0, -1, 1, 63, 64, 300)]
    ['00', '01', '02', '7e', '8001', 'd804']
    """
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


# offsets within a batch and message lengths are mostly below this
_SMALL = [zigzag_varint(n) for n in range(1 << 14)]


def _varint(n: int) -> bytes:
    return _SMALL[n] if n < len(_SMALL) else zigzag_varint(n)


def record_batches(values: Sequence[bytes], timestamp_ms: int, max_bytes: int = 1 << 20) -> Iterator[tuple[bytes, int]]:
    """``values`` as record batches of at most ``max_bytes`` (a batch always takes its first
    message, however large), each with the number of messages in it."""
    i, n = 0, len(values)
    while i < n:
        parts: list[bytes] = []
        add = parts.extend
        size, start = _HEADER.size, i
        while i < n:
            value = values[i]
            offset, length = _varint(i - start), _varint(len(value))
            body = 4 + len(offset) + len(length) + len(value)  # attributes, timestamp delta, key, headers: a byte each
            head = _varint(body)
            size += len(head) + body
            if size > max_bytes and i > start:
                break
            # record: length, attributes 0, timestamp delta 0, offset delta, no key (-1), value, no headers
            add((head, b"\x00\x00", offset, b"\x01", length, value, b"\x00"))
            i += 1
        count = i - start
        batch = bytearray(_HEADER.pack(0, 0, 0, 2, 0, 0, count - 1, timestamp_ms, timestamp_ms, -1, -1, -1, count))
        batch += b"".join(parts)
        struct.pack_into(">i", batch, 8, len(batch) - _LENGTH_FROM)
        struct.pack_into(">I", batch, _CRC_AT, calc_crc32c(memoryview(batch)[_ATTRIBUTES_AT:]))
        yield bytes(batch), count
