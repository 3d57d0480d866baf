"""Pages of memory-mapped index files that a build has read, given back.

faiss maps the raw vectors of a re-ranked index (IO_FLAG_MMAP_IFC), and every
page a search reads stays mapped in the process, counted in its RSS, until the
kernel wants the memory back. Measuring recall@100 with k_factor 64 re-ranks 6400
rows a query, so 1000 queries read a 5 GB file whole (peak RSS 7.3 GB on 5M x
256 under a 1G budget). ``release`` drops this process's pages of the watched
files (madvise MADV_DONTNEED: safe for a read-only shared mapping; the data stays
in the page cache, so the next read is a memory copy, not a disk read). Where
there is no /proc/self/maps (not Linux) it does nothing.

How much one read maps depends on the page cache: a fault maps the whole cached
folio around it, and a file just written holds folios of up to 2 MB (88 random
rows of a 100 MB file mapped 78 MB; Linux 6.18, ext4). ``watch`` therefore reads
the file back into the cache in base pages first (dropped, then re-read with
POSIX_FADV_RANDOM: 1.5 s a GB here), after which a fault maps about 48 KB (the
kernel's fault-around), so measuring in small batches maps a bounded amount.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

_watched: set[str] = set()
_libc = None


# Bytes read at a time while re-reading a watched file into the cache.
READ_BYTES = 2**20


def watch(path: str) -> None:
    """Gives back this file's mapped pages at every ``release``, and re-reads it
    into the page cache in base pages."""
    _watched.add(os.path.realpath(path))
    _cache_in_base_pages(path)


def _cache_in_base_pages(path: str) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # dirty pages are not dropped
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: base pages
        buffer = memoryview(bytearray(READ_BYTES))
        offset = 0
        while read := os.preadv(descriptor, [buffer], offset):
            offset += read
    finally:
        os.close(descriptor)


def watching() -> bool:
    return bool(_watched)


def release() -> None:
    global _libc
    if not _watched or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in _watched:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            _libc.madvise(start, end - start, mmap.MADV_DONTNEED)
