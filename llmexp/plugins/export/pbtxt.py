"""Protocol Buffers text format (what Triton's ``config.pbtxt`` is) from nested Python values.

Written by hand rather than through ``google.protobuf.text_format`` and Triton's generated
``model_config_pb2``: those come with tritonclient[grpc], which writing a model repository
should not need at run time, and the format for the few kinds of value a model config holds
is small. The tests parse every file written with Triton's own schema, so a misspelled field
or a wrongly shaped value fails there.

Values map as follows: a ``dict`` is a message, a ``Map`` a protobuf map field (written as
its repeated ``{ key value }`` entries), a ``list`` a repeated field, an ``Enum`` a bare enum
name, ``bool``/``int``/``float`` themselves, a ``str`` a quoted string.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

INDENT = "  "


class Enum(str):
    """An enum value, written bare: ``TYPE_INT32``, ``KIND_CPU``."""


class Map(dict):
    """A protobuf ``map<K, V>`` field, such as ``parameters`` or an ensemble step's ``input_map``."""


def to_text(message: Mapping[str, Any]) -> str:
    """The text format of ``message``, one field per line, ending in a newline."""
    return "".join(f"{line}\n" for line in _fields(message, 0))


def _fields(message: Mapping[str, Any], depth: int) -> Iterator[str]:
    pad = INDENT * depth
    for name, value in message.items():
        if value is None:
            continue
        if isinstance(value, Map):
            for key, item in value.items():
                entry = {"key": key, "value": item}
                yield f"{pad}{name} {{"
                yield from _fields(entry, depth + 1)
                yield f"{pad}}}"
        elif isinstance(value, dict):
            yield f"{pad}{name} {{"
            yield from _fields(value, depth + 1)
            yield f"{pad}}}"
        elif isinstance(value, (list, tuple)):
            if value and all(isinstance(item, dict) for item in value):
                yield f"{pad}{name} ["
                for index, item in enumerate(value):
                    yield f"{pad}{INDENT}{{"
                    yield from _fields(item, depth + 2)
                    yield f"{pad}{INDENT}}}" + ("," if index < len(value) - 1 else "")
                yield f"{pad}]"
            else:
                yield f"{pad}{name}: [{', '.join(_scalar(item) for item in value)}]"
        else:
            yield f"{pad}{name}: {_scalar(value)}"


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _quoted(value)
    raise TypeError(f"no protobuf text form for {type(value).__name__} {value!r}")


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quoted(text: str) -> str:
    """A double-quoted string: UTF-8 as is, the quote, backslash and control characters escaped (octal)."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\{ord(char):03o}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
