"""On which file system a path lives: network file systems cannot hold a store's database.

SQLite's write-ahead log keeps its index in shared memory (the ``-shm`` file, mapped by every
process that opens the database): processes on *other hosts* do not share that memory, so on
NFS, Lustre, GPFS and the like two hosts using one database each see their own index and can
corrupt it (https://sqlite.org/wal.html, "WAL does not work over a network filesystem"). The
store therefore asks, when it opens, which mount holds its database, from the kernel's mount
table (``/proc/self/mounts``: the mounts this process sees, namespaces included).

>>> table = parse_mounts("server:/export/home /home nfs4 rw,relatime,vers=4.2 0 0\\n"
...                      "/dev/sda1 / ext4 rw 0 0\\n")
>>> mount_of("/home/ada/project/.nbpipe", table).fstype
'nfs4'
>>> network_mount("/tmp/x", table) is None
True
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MOUNTS", "NETWORK_TYPES", "Mount", "mount_of", "network_mount", "parse_mounts", "read_mounts"]

#: The kernel's table of the mounts this process sees (``/proc/mounts`` is a link to it).
MOUNTS = "/proc/self/mounts"

#: File system types whose files other hosts see too: network and cluster file systems, and
#: FUSE clients of them (the kernel names a FUSE mount ``fuse.<program>``). ``tmpfs`` and the
#: disk file systems are local.
NETWORK_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p",
    "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "gfs2", "ocfs2", "panfs", "pvfs2",
    "orangefs", "wekafs", "davfs", "fuse.sshfs", "fuse.ceph", "fuse.cephfs", "fuse.glusterfs",
    "fuse.beegfs", "fuse.gpfs", "fuse.s3fs", "fuse.rclone", "fuse.juicefs", "fuse.gcsfuse",
    "fuse.goofys", "fuse.davfs",
})


@dataclass(frozen=True)
class Mount:
    """One line of the mount table: what is mounted (``device``), where, and its type."""

    device: str
    point: str
    fstype: str

    @property
    def network(self) -> bool:
        """Whether other hosts may see this file system (see :data:`NETWORK_TYPES`)."""
        return self.fstype in NETWORK_TYPES

    def __str__(self) -> str:
        return f"{self.device} on {self.point} ({self.fstype})"


def _unescape(field: str) -> str:
    """A mount table field as the path it names: the kernel writes space, tab, newline and
    backslash as octal escapes (``\\040`` ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> list[Mount]:
    """The mounts of a mount table's text (the format of ``/proc/mounts``, ``fstab(5)``)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not fields[0].startswith("#"):
            mounts.append(Mount(_unescape(fields[0]), _unescape(fields[1]), fields[2]))
    return mounts


def read_mounts(table: str | os.PathLike[str] | None = None) -> list[Mount]:
    """The mounts this process sees, from :data:`MOUNTS` (none where there is no ``/proc``,
    e.g. macOS: every path counts as local there)."""
    try:
        return parse_mounts(Path(table or MOUNTS).read_text(errors="replace"))
    except OSError:
        return []


def mount_of(path: str | os.PathLike[str], mounts: list[Mount] | None = None) -> Mount | None:
    """The mount that holds ``path``: the deepest mount point above it (the last such line
    when several were mounted on one point: the one on top)."""
    # Canonical (symlinks of the parts that exist resolved): a store about to be created lives
    # on the file system of the folder it is created in.
    where = os.path.realpath(os.path.abspath(path))
    best: Mount | None = None
    for mount in read_mounts() if mounts is None else mounts:
        point = mount.point.rstrip("/") or "/"
        if (where == point or where.startswith(point + "/") or point == "/") and (
                best is None or len(point) >= len(best.point.rstrip("/") or "/")):
            best = mount
    return best


def network_mount(path: str | os.PathLike[str], mounts: list[Mount] | None = None) -> Mount | None:
    """The network file system that holds ``path``, or None when it is local (or unknown)."""
    mount = mount_of(path, mounts)
    return mount if mount is not None and mount.network else None
