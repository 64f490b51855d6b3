"""Temporary and appended files for the atomic outputs of the data tools."""

from __future__ import annotations

import os
import shutil
import uuid

_COPY_BUFFER_BYTES = 8 << 20


def temporary_path(final_path: str) -> str:
    """A unique hidden name beside ``final_path``: same directory, so that ``os.replace`` onto the
    final name is atomic, and a suffix that no reader takes for a finished output."""
    directory, name = os.path.split(os.path.abspath(final_path))
    return os.path.join(directory, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def remove_if_exists(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def append_file(source_path: str, destination) -> int:
    """Copy the bytes of ``source_path`` to the end of the open binary file ``destination``."""
    with open(source_path, "rb") as source:
        shutil.copyfileobj(source, destination, _COPY_BUFFER_BYTES)
    return os.path.getsize(source_path)
