"""Byte comparisons the compiled gateway makes in C: field names in any ASCII case.

The functions take C types in the compiled form (``C_TYPES``, ADR 22): a byte of a ``bytes`` is
read as a C ``unsigned char``. The sources run the same code in Python, which is slower per
byte than a bytes method; callers on the request path pick a bytes-method form when
`COMPILED` is false (every gateway module is compiled, or none is: ADR 15).
"""

from __future__ import annotations

from types import FunctionType

__all__ = ["COMPILED", "name_is"]

# The C types of the compiled form (gateway/speedups.py declares them in the module's .pxd).
C_TYPES = {
    "name_is": {
        "data": "bytes",
        "start": "Py_ssize_t",
        "lower": "bytes",
        "j": "Py_ssize_t",
        "c": "uchar",
    },
}


def name_is(data: bytes, start: int, lower: bytes) -> bool:
    """``data`` holds ``lower`` (lower-case) at ``start``, in any ASCII case. The caller has
    checked that ``data`` has that many bytes there (an index past its end raises
    IndexError)."""
    for j in range(len(lower)):
        c = data[start + j]
        if 65 <= c <= 90:  # A-Z
            c += 32
        if c != lower[j]:
            return False
    return True


# Compiled, a module's functions are Cython's own function type, not Python's (the module's
# file name would tell too, but compiled modules never look at their own path: ADR 15).
COMPILED = not isinstance(name_is, FunctionType)
