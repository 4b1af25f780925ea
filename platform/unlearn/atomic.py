"""Writes a reader never sees half of: one helper for every file the platform leaves behind.

Local paths go through a temporary sibling + `os.replace` (atomic on POSIX); storage URIs (s3://, gs://,
...) through pyarrow's filesystem, whose object stores publish an object only when its upload completes.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def _is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write `data` to a local path or a storage URI, all or nothing."""
    if _is_uri(path):
        from pyarrow import fs as pafs

        filesystem, where = pafs.FileSystem.from_uri(str(path))
        filesystem.create_dir(where.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(where) as out:
            out.write(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_bytes(path: str | Path) -> bytes:
    """The content of a local path or a storage URI."""
    if _is_uri(path):
        from pyarrow import fs as pafs

        filesystem, where = pafs.FileSystem.from_uri(str(path))
        with filesystem.open_input_stream(where) as stream:
            return stream.read()
    return Path(path).read_bytes()


def write_text_atomic(text: str, path: str | Path) -> None:
    write_bytes_atomic(text.encode(), path)


def write_json_atomic(data: Any, path: str | Path) -> None:
    """JSON (NaN/inf as null, numpy scalars as numbers), indented, through `write_bytes_atomic`."""
    write_text_atomic(json.dumps(data, indent=2, default=_json_default) + "\n", path)


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(buffer.getvalue(), path)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
