"""Base-128 varints, as protobuf and LevelDB tables (TensorFlow's checkpoint index) write them: the one
reader and writer of the format, for the request path (`wire`) and the checkpoint reader alike.

`read` raises ValueError for a varint cut short or longer than 64 bits; each caller says what that means
for its input (a malformed request, a corrupt checkpoint).
"""

from __future__ import annotations

_ONE_BYTE = [bytes((i,)) for i in range(0x80)]  # varints below 128, made once


def encode(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read(data, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos` of bytes or a memoryview."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")
