"""Deterministic WebDataset tar writing, and DALI's index format read back from a tar.

DALI's `fn.readers.webdataset` uses an index file per tar (format v1.2, the one NVIDIA's
`wds2idx` writes): a first line `v1.2 <number of samples>`, then one line per sample listing
each of its members as `<ext> <data offset> <size> <member name>`, space separated. A sample is
a run of consecutive members with the same basename; the extension is everything after the
basename's first dot. We compute offsets from the tar headers with `tarfile`, so a damaged tar
fails loudly here instead of producing a wrong index (wds2idx ignores GNU tar's exit status).
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator

DALI_INDEX_VERSION = "v1.2"


class HashingWriter:
    """A write-only file wrapper that hashes what passes through (tarfile writes sequentially)."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes_written = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes_written += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.bytes_written


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0  # fixed metadata: the same samples always give the same bytes
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class SampleTarWriter:
    """Writes samples as consecutive tar members `<key>.<ext>` with fixed metadata."""

    def __init__(self, f: BinaryIO):
        self._hashing = HashingWriter(f)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for ext, data in members:
            self._tar.addfile(_member_info(f"{key}.{ext}", len(data)), _BytesReader(data))

    def close(self) -> tuple[int, str]:
        """Finish the archive; returns (bytes written, sha256 hex)."""
        self._tar.close()
        return self._hashing.bytes_written, self._hashing.sha256.hexdigest()


class _BytesReader:
    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk = self._data[self._pos:end]
        self._pos += len(chunk)
        return chunk


def split_member_name(name: str) -> tuple[str, str]:
    """('dir/key', 'ext.more') for 'dir/key.ext.more', as WebDataset and DALI split names."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def iter_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """(key, members) for each run of consecutive regular members sharing a basename."""
    key, group = None, []
    for member in tar:
        if not member.isreg():
            continue
        base, _ = split_member_name(member.name)
        if base != key and group:
            yield key, group
            group = []
        key = base
        group.append(member)
    if group:
        yield key, group


def dali_index_text(tar_path: str | Path) -> str:
    """The v1.2 DALI index of a tar, computed from its headers (raises tarfile.TarError if damaged)."""
    lines = []
    with tarfile.open(tar_path, mode="r:") as tar:
        for _, members in iter_samples(tar):
            parts = []
            for m in members:
                _, ext = split_member_name(m.name)
                parts.append(f"{ext} {m.offset_data} {m.size} {m.name}")
            lines.append(" ".join(parts))
    return f"{DALI_INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)
