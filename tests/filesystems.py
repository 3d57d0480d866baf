"""Beam filesystems for tests: local files under another scheme, so that the
pipeline treats them as it treats an object store, with the faults object stores
have. Registered by being imported (Beam finds FileSystem subclasses); they exist
only in this process, so they serve the in-process runner."""

from __future__ import annotations

import io
import os
import threading
import time

from apache_beam.io.filesystem import FileMetadata, MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem


class RemoteLookingFileSystem(LocalFileSystem):
    """``<scheme>://<local path>``: a filesystem that is not local to the pipeline."""

    SCHEME = "remote"

    @classmethod
    def scheme(cls):
        return cls.SCHEME

    @classmethod
    def local(cls, path: str) -> str:
        return path.removeprefix(f"{cls.SCHEME}://")

    def match(self, patterns, limits=None):
        prefix = f"{self.SCHEME}://"
        results = super().match([self.local(pattern) for pattern in patterns], limits)
        return [
            MatchResult(
                prefix + result.pattern,
                [
                    FileMetadata(prefix + found.path, found.size_in_bytes, found.last_updated_in_seconds)
                    for found in result.metadata_list
                ],
            )
            for result in results
        ]

    def open(self, path, *args, **kwargs):
        return super().open(self.local(path), *args, **kwargs)

    def create(self, path, *args, **kwargs):
        return super().create(self.local(path), *args, **kwargs)


class LaggyFileSystem(RemoteLookingFileSystem):
    """Each file opened 20 ms late, as an object store answers; records who opened it."""

    SCHEME = "laggy"
    opened_by: list[str] = []  # names of the threads that opened files

    def open(self, path, *args, **kwargs):
        LaggyFileSystem.opened_by.append(threading.current_thread().name)
        time.sleep(0.02)
        return super().open(path, *args, **kwargs)


class FlakyFileSystem(RemoteLookingFileSystem):
    """The first open of each file whose name contains "flaky" fails, as a throttled
    or briefly unreachable store does."""

    SCHEME = "flaky"
    failed: set[str] = set()

    def open(self, path, *args, **kwargs):
        if "flaky" in path.rsplit("/", 1)[-1] and path not in FlakyFileSystem.failed:
            FlakyFileSystem.failed.add(path)
            raise ConnectionError(f"503 Service Unavailable: {path}")
        return super().open(path, *args, **kwargs)


class DeniedFileSystem(RemoteLookingFileSystem):
    """Files whose name contains "denied" can never be opened, as when a bucket's
    permissions are wrong: not the file's fault, and it does not pass."""

    SCHEME = "denied"
    denying = True  # False: the permissions were fixed

    def open(self, path, *args, **kwargs):
        if DeniedFileSystem.denying and "denied" in path.rsplit("/", 1)[-1]:
            raise PermissionError(f"403 Forbidden: {path}")
        return super().open(path, *args, **kwargs)


class _CutReads(io.RawIOBase):
    """A file whose reads fail once they pass ``cut`` bytes, as a connection reset in
    the middle of a download does."""

    def __init__(self, file, cut: int, path: str):
        self._file, self._cut, self._path = file, cut, path

    def readable(self):
        return True

    def seekable(self):
        return self._file.seekable()

    def seek(self, offset, whence=io.SEEK_SET):
        return self._file.seek(offset, whence)

    def tell(self):
        return self._file.tell()

    def readinto(self, buffer):
        if self._file.tell() + len(buffer) > self._cut:
            raise ConnectionResetError(f"connection reset while reading {self._path}")
        data = self._file.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self):
        self._file.close()
        super().close()


class CutFileSystem(RemoteLookingFileSystem):
    """Reads fail half way through a file: the first time each file is read, or every
    time for a file whose name contains "broken" (a fault that does not pass)."""

    SCHEME = "cut"
    cut: set[str] = set()

    def open(self, path, *args, **kwargs):
        file = super().open(path, *args, **kwargs)
        name = path.rsplit("/", 1)[-1]
        if "broken" in name or path not in CutFileSystem.cut:
            CutFileSystem.cut.add(path)
            size = os.path.getsize(self.local(path))
            return io.BufferedReader(_CutReads(file, size // 2, path))
        return file
