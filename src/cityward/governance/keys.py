"""Secret keys kept in files of the data folder (the token signing key, the audit seal key)."""

from __future__ import annotations

import logging
import os
import secrets
from contextlib import suppress
from pathlib import Path

log = logging.getLogger("cityward.governance")


def load_or_create_key(path: Path, what: str = "key") -> bytes:
    """The key in ``path`` (hex); 32 random bytes in a new 0600 file when missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            # link is atomic and never overwrites: when processes start together, one key wins
            with suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise ValueError(f"{path} does not hold a hex-encoded {what}") from None
    if len(key) < 16:
        raise ValueError(f"the {what} in {path} is shorter than 16 bytes")
    if path.stat().st_mode & 0o077:
        log.warning("the %s %s is readable by other users; chmod 600 it", what, path)
    return key
