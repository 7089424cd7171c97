"""Files callgate watches for changes (the policy, the keys file): their identity now."""

from __future__ import annotations

import os

Fingerprint = tuple[int, int, int, int]


def fingerprint(path: str) -> Fingerprint | None:
    """Identity of the file the path resolves to now (a ConfigMap update swaps a symlink), or
    None when there is none: any change of inode, device, size or mtime is a change."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)
