"""The files of a Debian package, read in Python: a .deb is an `ar` archive whose data.tar.{xz,gz,bz2}
member holds the installed files; no unpacking to disk, no dpkg needed. Any damage (a truncated
download, a garbled tar header, a compressed stream failing its CRC) is a CorpusError naming the .deb."""

from __future__ import annotations

import io
import lzma
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterator


class CorpusError(ValueError):
    """A .deb directory or archive that cannot be read; the message names it."""


def package_name(path: Path) -> str:
    return path.name.split("_", 1)[0]


def deb_data_tar(path: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), opened for streaming."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise CorpusError(f"{path}: not a .deb (no ar archive header)")
        while header := f.read(60):
            if len(header) < 60:
                break
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            if name.startswith("data.tar"):
                data = f.read(size)
                if len(data) < size:  # an interrupted download: tarfile would fail later, unnamed
                    raise CorpusError(f"{path}: truncated ({name} has {len(data)} of its {size} bytes)")
                suffix = name[len("data.tar") :]
                if suffix not in ("", ".xz", ".gz", ".bz2"):
                    raise CorpusError(
                        f"{path}: {name} is compressed in a way Python's tarfile cannot read "
                        f"(unpack it with `dpkg-deb --fsys-tarfile` first)"
                    )
                return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
            f.seek(size + size % 2, 1)  # members are 2-byte aligned
    raise CorpusError(f"{path}: no data.tar member")


def deb_files(deb: Path, select: Callable[[list[str]], set[str]]) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the regular files of a .deb that `select` picks from all their paths (without
    "./"), in archive order. Links are left out: they would give the same text again."""
    try:
        archive = deb_data_tar(deb)
    except (OSError, tarfile.TarError, ValueError) as e:
        raise CorpusError(f"{deb}: cannot read ({e})") from None
    # a damaged compressed stream shows only while the members are read: name the .deb
    try:
        with archive:
            members = [m for m in archive.getmembers() if m.isreg()]
            _read_to_the_end(archive)
            selected = select([m.name.removeprefix("./") for m in members])
            for member in members:
                path = member.name.removeprefix("./")
                if path in selected:
                    yield path, archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as e:
        raise CorpusError(f"{deb}: damaged data archive ({type(e).__name__}: {e})") from None


def _read_to_the_end(archive: tarfile.TarFile) -> None:
    """tarfile ends the member list silently at a garbled header; reading the compressed stream to
    its end checks its CRC, so a damaged .deb is an error, not a corpus missing some files."""
    while archive.fileobj.read(1 << 20):
        pass
