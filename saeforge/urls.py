"""One fsspec layer for every path saeforge reads or writes: local paths, file:// and other URLs.

Local paths (and file:// URLs) stay plain filesystem paths so writes can be atomic (write a
temporary file, then `os.replace`); anything else goes through an fsspec filesystem (`memory://`
for tests, `s3://` with s3fs, `gs://` with gcsfs, …).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from saeforge.errors import UserError


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for anything with a scheme (file:// included)."""
    return "://" in str(path)


def is_local(path: str | os.PathLike[str]) -> bool:
    """A plain path or a file:// URL."""
    s = str(path)
    return "://" not in s or s.startswith("file://")


def local_path(path: str | os.PathLike[str]) -> str:
    """The filesystem path of a local path or file:// URL."""
    s = str(path)
    return s[len("file://"):] if s.startswith("file://") else s


def url_to_fs(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """(fsspec filesystem, root without a trailing slash) for a remote URL, with one-line errors."""
    import fsspec
    try:
        fs, root = fsspec.core.url_to_fs(str(path))
    except ImportError as e:
        raise UserError(f"URL {str(path)!r} needs an fsspec backend that is not installed ({e}); "
                        f"pip install it (e.g. s3fs for s3://) or use a local path") from None
    except ValueError as e:
        raise UserError(f"URL {str(path)!r} is not understood by fsspec ({e}); use a local path or a URL "
                        f"like file://, memory:// or s3://") from None
    return fs, (root.rstrip("/") or root)


def resolve(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """(None, local path) for local paths and file:// URLs; (fsspec filesystem, root) otherwise."""
    if is_local(path):
        return None, local_path(path)
    return url_to_fs(path)


def join(path: str | os.PathLike[str], *names: str) -> str:
    """A child of a path or URL, as a string (local paths stay local paths)."""
    if is_local(path):
        return os.path.join(local_path(path), *names)
    return "/".join([str(path).rstrip("/"), *names])


def exists(path: str | os.PathLike[str]) -> bool:
    fs, root = resolve(path)
    return os.path.exists(root) if fs is None else bool(fs.exists(root))


def is_file(path: str | os.PathLike[str]) -> bool:
    fs, root = resolve(path)
    return os.path.isfile(root) if fs is None else bool(fs.isfile(root))


def is_dir(path: str | os.PathLike[str]) -> bool:
    fs, root = resolve(path)
    return os.path.isdir(root) if fs is None else bool(fs.isdir(root))


def makedirs(path: str | os.PathLike[str]) -> None:
    fs, root = resolve(path)
    if fs is None:
        os.makedirs(root, exist_ok=True)
    else:
        fs.makedirs(root, exist_ok=True)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    fs, root = resolve(path)
    if fs is None:
        return Path(root).read_bytes()
    return bytes(fs.cat_file(root))


def read_text(path: str | os.PathLike[str]) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file; local writes are atomic (temporary file + rename), so a crash never
    leaves half a file behind."""
    fs, root = resolve(path)
    if fs is None:
        parent = os.path.dirname(os.path.abspath(root))
        os.makedirs(parent, exist_ok=True)
        tmp = f"{root}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root)
    else:
        fs.makedirs(root.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(root, data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 1) -> None:
    """JSON in UTF-8 (non-ASCII kept as is), atomically for local paths."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str))


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Parsed JSON; a file that is not JSON gets one clear line naming it."""
    try:
        return json.loads(read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {str(path)!r} is not valid JSON ({e}); it is corrupt or truncated: restore it "
                        f"or rerun the command that wrote it") from None


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a file if it is there."""
    fs, root = resolve(path)
    if fs is None:
        if os.path.isfile(root):
            os.remove(root)
    elif fs.isfile(root):
        fs.rm_file(root)


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Free space on the filesystem where `path` will live; None for remote URLs."""
    if not is_local(path):
        return None
    p = os.path.abspath(local_path(path))
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free


def check_output_dir(path: str | os.PathLike[str], flag: str = "--out") -> None:
    """Refuse, before any work, an output directory that cannot be created or written."""
    if not is_local(path):
        return
    p = os.path.abspath(local_path(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise UserError(f"{flag} {str(path)!r} is an existing file, not a directory; choose another {flag}")
    probe = p
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {str(path)!r}: {probe!r} is a file, so the directory cannot be created; choose "
                        f"another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {str(path)!r}: {probe!r} is not writable; choose a writable {flag}")


def check_output_file(path: str | os.PathLike[str], flag: str = "--out") -> None:
    """Refuse, before any work, an output file whose place cannot be written (or that is a directory)."""
    if not is_local(path):
        return
    p = os.path.abspath(local_path(path))
    if os.path.isdir(p):
        raise UserError(f"{flag} {str(path)!r} is a directory; give a file path")
    check_output_dir(os.path.dirname(p), flag)
    if os.path.exists(p) and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {str(path)!r} is not writable; choose another {flag}")
