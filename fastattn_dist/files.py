"""Output folders checked before any work starts: a clear one-line error instead of a traceback at the end."""
from __future__ import annotations

import os
import tempfile


def check_writable_dir(path: str, option: str = "--out") -> str:
    """Create the folder ``path`` if needed and prove a file can be written there; its absolute path, or a
    ValueError naming ``option`` (a path under a file, no permission, a full or read-only disk)."""
    folder = os.path.abspath(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{option} {path!r} is not a writable directory: {e.strerror or e}") from None
    return folder
