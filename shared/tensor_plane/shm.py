"""POSIX shared-memory segments for same-host transfers, and the host identity that gates them.

Producer side: `create_segment` makes a `SharedMemory` segment (registered with this process's
resource tracker on purpose: if the producer dies, its segments are unlinked, and nobody could
have asked for them anyway since the token check goes through the dead producer).
Consumer side: `map_segment` maps the segment file copy-on-write with plain `mmap`, so it never
touches the resource tracker (no warnings or unlinks at consumer exit), the mapping lives exactly
as long as the views of it, and a consumer writing into its tensor cannot corrupt the producer's
copy that a retried step may read again.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import re
import secrets
import socket
import sys
from multiprocessing.shared_memory import SharedMemory

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^lego_[0-9a-f]{24}$")
# Leave this much of /dev/shm free: a full tmpfs turns a write into SIGBUS, not an exception.
_SHM_HEADROOM = 64 * 1024 * 1024
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Python < 3.13 lacks the constant


@functools.cache
def host_identity() -> str:
    """Identical for processes on one machine (boot), different across machines.

    hostname alone can repeat across hosts (containers, clones); the kernel boot id cannot.
    """
    boot = ""
    for path in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            with open(path) as f:
                boot = f.read().strip()
            break
        except OSError:
            continue
    return f"{socket.gethostname()}/{boot or 'unknown-boot'}"


@functools.cache
def shm_supported() -> bool:
    """Whether this process can exchange segments by name under /dev/shm (Linux)."""
    return sys.platform.startswith("linux") and os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


class Segment(SharedMemory):
    """A producer-owned segment whose `close` tolerates views still in use.

    A TCP send in flight (or a local reader) may still hold a view when the tensor is released;
    the stock `close` would raise BufferError (also from `__del__`). Here the mapping simply
    stays until its last view goes, which is what we want anyway.
    """

    def close(self) -> None:
        try:
            super().close()
        except BufferError:
            fd = getattr(self, "_fd", -1)
            if fd >= 0:  # the mmap holds its own descriptor; ours is no longer needed
                os.close(fd)
                self._fd = -1

    def destroy(self) -> None:
        """Unlink the name (open mappings stay valid) and drop this process's mapping."""
        try:
            self.unlink()
        except FileNotFoundError:
            pass
        self.close()


def create_segment(nbytes: int) -> Segment | None:
    """A fresh segment of `nbytes` with a random name, or None when /dev/shm lacks the room.

    The space is reserved up front (posix_fallocate), so filling the segment cannot SIGBUS.
    """
    if nbytes <= 0 or not shm_supported():
        return None
    try:
        st = os.statvfs(SHM_DIR)
        if nbytes + _SHM_HEADROOM > st.f_bavail * st.f_frsize:
            return None
    except OSError:
        return None
    for _ in range(4):
        try:
            seg = Segment(name=f"lego_{secrets.token_hex(12)}", create=True, size=nbytes)
        except FileExistsError:
            continue
        except OSError:
            return None
        fd = getattr(seg, "_fd", -1)
        if fd >= 0 and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError:
                seg.destroy()
                return None
        return seg
    return None


def segment_exists(name: str) -> bool:
    """Whether a segment name is still linked (for tests and diagnostics)."""
    return os.path.exists(os.path.join(SHM_DIR, name))


def map_segment(name: str, nbytes: int) -> memoryview:
    """Map a producer's segment copy-on-write and return a writable view of its first `nbytes`.

    Zero-copy for reads; the view keeps the mapping alive, and the mapping stays valid even
    after the producer unlinks the name. Raises FileNotFoundError when the segment is gone (or
    lives in another /dev/shm namespace), ValueError for a bad name or a short segment.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"refusing to map segment with unexpected name {name!r}")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise ValueError(f"segment {name} holds {size} bytes, expected {nbytes}")
        mm = mmap.mmap(fd, nbytes, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError, ValueError):
        # Map every page now, read-only (writes still copy-on-write): one call instead of one page
        # fault per 4 KiB as the consumer reads (64 MiB: 14 vs 8-10 GB/s). Linux >= 5.14.
        mm.madvise(_MADV_POPULATE_READ)
    return memoryview(mm)
