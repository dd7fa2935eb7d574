"""Where the tools' Maildirs live: a loop-mounted ext4 image when possible, else a directory.

On some machines creating files under /tmp (often overlay or tmpfs-backed containers) costs
0.3-0.7 ms of system time per file, which would swamp the differences being measured. A fresh ext4
image (sparse, ~2 GB, under bench/out/) gives every run the same ordinary file system. mkfs runs
with lazy init off so no background ext4lazyinit thread writes during the benchmark.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Storage", "setup_storage"]


@dataclass
class Storage:
    """A directory for the tools' work dirs and a sentence saying what it is."""

    path: Path
    description: str
    image: Path | None = None

    def teardown(self) -> None:
        """Unmount and delete the image (if any)."""
        if self.image is not None:
            subprocess.run(["umount", str(self.path)], check=False)
            self.image.unlink(missing_ok=True)


def _is_mount(path: Path) -> bool:
    return path.is_dir() and os.path.ismount(path)


def _loop(out: Path, size: int) -> Storage | None:
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        return None
    image, mnt = out / "maildirs.img", out / "mnt"
    if _is_mount(mnt):  # left over from an interrupted run
        subprocess.run(["umount", str(mnt)], check=False)
    image.unlink(missing_ok=True)
    mnt.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    mkfs = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
        capture_output=True,
        check=False,
    )
    if mkfs.returncode != 0:
        image.unlink(missing_ok=True)
        return None
    mount = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, check=False
    )
    if mount.returncode != 0:
        image.unlink(missing_ok=True)
        return None
    os.chmod(mnt, 0o755)
    what = f"ext4 on a loop-mounted {size / 1e9:.1f} GB sparse image ({image}, mounted at {mnt})"
    return Storage(mnt, what, image)


def setup_storage(out: Path, mode: str = "auto", size: int = 2 * 1024**3) -> Storage:
    """Return the Maildir storage: ``mode`` "loop", "dir" or "auto" (loop if we can)."""
    out.mkdir(parents=True, exist_ok=True)
    if mode in ("auto", "loop"):
        storage = _loop(out, size)
        if storage is not None:
            return storage
        if mode == "loop":
            raise RuntimeError("cannot create and mount a loop ext4 image (need root)")
    path = out / "maildirs"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False
    )
    return Storage(path, f"plain directory {path} (file system: {fs.stdout.strip() or '?'})")
