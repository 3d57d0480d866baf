"""Beam filesystems for tests: local files under another scheme, so that the
pipeline treats them as it treats an object store, with the faults object stores
have. Registered by being imported (Beam finds FileSystem subclasses); they exist
only in this process, so they serve the in-process runner."""

from __future__ import annotations

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
