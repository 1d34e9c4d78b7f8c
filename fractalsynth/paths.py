"""Output paths and counts: checks that fail early with a message naming the fix."""
from __future__ import annotations

import os
import re

_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_count(text: str | int) -> int:
    """'10k' -> 10000, '1m' -> 1000000, '2500' -> 2500; raises ValueError otherwise."""
    if isinstance(text, int):
        value = text
    else:
        m = _COUNT.match(str(text))
        if not m:
            raise ValueError(f"not a count: {text!r} (use e.g. 5000, 10k or 1m)")
        mult = {"": 1, "k": 1000, "m": 1000000}[m.group(2).lower()]
        value = float(m.group(1)) * mult
        if value != int(value):
            raise ValueError(f"not a whole count: {text!r}")
        value = int(value)
    if value <= 0:
        raise ValueError(f"count must be > 0, got {text!r}")
    return value


def prepare_output_file(path: str) -> str:
    """Check that ``path`` can be written and return the temporary name to write first."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; give a file name such as {path}/masks.h5")
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the folder {parent} for {path}: {e.strerror}") from None
    tmp = path + ".partial"
    try:
        with open(tmp, "wb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {tmp}: {e.strerror}; choose another --out") from None
    return tmp
