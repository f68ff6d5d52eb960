"""Damage to a torch.save file as a disk fault or a bad copy leaves it, for the tests of the checks that
name a damaged checkpoint file (discovery, resume, the preflight, the inference loaders)."""

import struct
import zipfile


def overwrite_start(path):
    """Damage a file where torch's zip archive starts."""
    data = path.read_bytes()
    path.write_bytes(b"\0" * 64 + data[64:])


def corrupt_member(path, member_suffix):
    """Overwrite bytes inside one member of the archive, its index at the end left whole: damage the checks
    that choose a checkpoint do not see (they read the index alone)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the member's data, past its local header
    data[start : start + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
