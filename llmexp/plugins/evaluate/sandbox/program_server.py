"""The program's side of the code sandbox: run a model's program, then call its function for the checks.

The verdict process starts this file's source (``python -I -c``) inside the confinement
(``isolation.py``) with descriptor 3 carrying calls in and 4 carrying replies out. The
first call carries the program's source and the name of its function: the server runs
the program as ``__main__`` (from ``program.py`` in its working directory, so tracebacks
show its lines), replies ``("ready",)``, and then answers each call ``(args, kwargs)`` with
``("return", value)`` or ``("raise", exception type name, message)``. It exits when the
calls end. ``SystemExit`` is not caught: a program that exits, exits.

The wire format, which the verdict process imports from here: each message is a 4-byte
big-endian length and a pickle. Calls come from the trusted side and are unpickled freely
here. Replies are pickled by ``PlainPickler`` (a subclass of a plain type goes as that
type: a namedtuple as a tuple, a ``Counter`` as a dict; NumPy's number scalars as int or
float) and unpickled there by
``PlainUnpickler``, which builds nothing but plain data, so a reply can be wrong but cannot
run code in the verdict process, nor carry an object whose ``__eq__`` always says yes.

Standard library only: it runs in the confined interpreter before anything is imported.
"""

from __future__ import annotations

import builtins
import io
import numbers
import os
import pickle
import struct
import sys
import types

CALLS_FD, REPLIES_FD = 3, 4
PROGRAM_FILE = "program.py"
PLAIN_TYPES = (bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset)
_HEADER = struct.Struct(">I")


class PlainPickler(pickle.Pickler):
    def reducer_override(self, obj):
        kind = type(obj)
        if kind in PLAIN_TYPES:
            return NotImplemented
        for base in PLAIN_TYPES[1:]:  # bool has no subclasses
            if isinstance(obj, base):
                return base, (base(obj),)
        if isinstance(obj, numbers.Integral):  # NumPy's integers
            return int, (int(obj),)
        if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Rational):  # NumPy's other floats
            return float, (float(obj),)
        return NotImplemented  # pickled by reference: the verdict side refuses it


class PlainUnpickler(pickle.Unpickler):
    """Builds only None, the ``PLAIN_TYPES`` and containers of them; any other class is refused."""

    def find_class(self, module, name):
        if module == "builtins" and any(name == kind.__name__ for kind in PLAIN_TYPES):
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def plain_dumps(value) -> bytes:
    buffer = io.BytesIO()
    PlainPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def plain_loads(data: bytes):
    return PlainUnpickler(io.BytesIO(data)).load()


def write_message(fd: int, data: bytes, wait=lambda: None) -> None:
    """Send ``data``; ``wait()`` runs before each write (the verdict side writes without blocking)."""
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        wait()
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            pass


def read_message(fd: int, limit: int, wait=lambda: None):
    """The next message's bytes, or None at the end of the stream; ``wait()`` runs before each read."""
    header = _read_exactly(fd, _HEADER.size, wait)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > limit:
        raise ValueError(f"a message of {length} bytes, over the limit of {limit}")
    body = _read_exactly(fd, length, wait)
    if body is None:
        raise EOFError("the stream ended inside a message")
    return body


def _read_exactly(fd: int, size: int, wait):
    chunks, left = [], size
    while left:
        wait()
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            if left == size:
                return None
            raise EOFError("the stream ended inside a message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def serve() -> None:
    _, source, entry_point = pickle.loads(read_message(CALLS_FD, sys.maxsize))
    with open(PROGRAM_FILE, "w", encoding="utf-8") as handle:
        handle.write(source)
    program = types.ModuleType("__main__")
    program.__file__ = PROGRAM_FILE
    sys.modules["__main__"] = program
    sys.argv = [PROGRAM_FILE]  # as if run as `python program.py`
    exec(compile(source, PROGRAM_FILE, "exec"), program.__dict__)
    write_message(REPLIES_FD, plain_dumps(("ready",)))
    while True:
        call = read_message(CALLS_FD, sys.maxsize)
        if call is None:
            return
        args, kwargs = pickle.loads(call)
        try:
            value = program.__dict__[entry_point](*args, **kwargs)
        except Exception as error:
            import traceback  # only here: it costs the program's start 5 ms

            traceback.print_exc()
            write_message(REPLIES_FD, plain_dumps(("raise", type(error).__name__, str(error)[:2000])))
            continue
        try:
            reply = plain_dumps(("return", value))
        except Exception as error:  # a generator, a lambda, an open file: nothing the checks could compare
            reply = plain_dumps(("raise", "TypeError", f"{entry_point} returned a {type(value).__name__}, "
                                 f"which cannot leave its process ({error})"))  # fmt: skip
        write_message(REPLIES_FD, reply)


if __name__ == "__main__":
    serve()
