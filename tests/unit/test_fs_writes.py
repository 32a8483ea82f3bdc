"""The file system's changes (cachefs.fs) over an in-memory engine, without a mount.

What the kernel, and so a user, sees of the namespace: inode numbers
through create, unlink, rename and writes, and the errno of each change.
"""

from __future__ import annotations

import errno
import os
import stat

from fsrig import BLOCK, FakeCache, directory, errno_of, file, mount, names, tree

from cachefs.fs.inodes import ROOT_INODE
from cachefs.fs.operations import Operations
from cachefs.fuse.api import RENAME_EXCHANGE, RENAME_NOREPLACE, Entry, SetAttr

CREATE = os.O_CREAT | os.O_WRONLY


async def test_a_created_file_is_found_under_its_inode() -> None:
    ops, cache = mount()
    fh = (await ops.opendir(ROOT_INODE)).fh  # a fresh listing answers negative lookups ...
    assert await errno_of(ops.lookup(ROOT_INODE, b"new")) == errno.ENOENT
    entry, opened = await ops.create(ROOT_INODE, b"new", stat.S_IFREG | 0o600, CREATE)
    await ops.releasedir(fh)
    assert (await ops.lookup(ROOT_INODE, b"new")).ino == entry.ino  # ... but not this one
    assert entry.mode == stat.S_IFREG | 0o600 and entry.size == 0
    assert opened.keep_cache and not opened.backing_id and not opened.direct_io
    assert not opened.noflush  # the close flushes
    assert await ops.write(opened.fh, 0, b"hello") == 5
    assert (await ops.getattr(entry.ino)).size == 5
    await ops.flush(opened.fh)
    await ops.release(opened.fh)
    assert cache.flushed == ["new"] and [h.file_id for h in cache.closed] == ["new"]
    exclusive = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    assert await errno_of(ops.create(ROOT_INODE, b"new", 0o600, exclusive)) == errno.EEXIST


async def test_a_file_made_after_an_unlink_is_a_new_inode() -> None:
    ops, _ = mount()
    g = await ops.lookup(ROOT_INODE, b"g")
    assert await names(ops, ROOT_INODE) == [b"d", b"g"]
    await ops.unlink(ROOT_INODE, b"g")
    assert await names(ops, ROOT_INODE) == [b"d"]
    assert await errno_of(ops.lookup(ROOT_INODE, b"g")) == errno.ENOENT
    entry, _ = await ops.create(ROOT_INODE, b"g", stat.S_IFREG | 0o644, CREATE)
    assert entry.ino != g.ino
    assert (await ops.lookup(ROOT_INODE, b"g")).ino == entry.ino
    made = await ops.mknod(ROOT_INODE, b"h", stat.S_IFREG | 0o644, 0)
    assert (await ops.lookup(ROOT_INODE, b"h")).ino == made.ino
    fifo = stat.S_IFIFO | 0o644
    assert await errno_of(ops.mknod(ROOT_INODE, b"p", fifo, 0)) == errno.EPERM


async def test_directories_and_symlinks_are_made_and_removed() -> None:
    ops, _ = mount()
    made = await ops.mkdir(ROOT_INODE, b"e", 0o700)
    assert made.mode == stat.S_IFDIR | 0o700
    assert (await ops.lookup(ROOT_INODE, b"e")).ino == made.ino
    link = await ops.symlink(made.ino, b"l", b"../g")
    assert await ops.readlink(link.ino) == b"../g"
    d = await ops.lookup(ROOT_INODE, b"d")
    assert await errno_of(ops.rmdir(ROOT_INODE, b"d")) == errno.ENOTEMPTY
    assert await errno_of(ops.unlink(ROOT_INODE, b"d")) == errno.EISDIR
    sub = await ops.lookup(d.ino, b"sub")
    await ops.rmdir(d.ino, b"sub")
    assert await errno_of(ops.lookup(d.ino, b"sub")) == errno.ENOENT
    again = await ops.mkdir(d.ino, b"sub", 0o755)
    assert again.ino != sub.ino and (await ops.lookup(d.ino, b"sub")).ino == again.ino
    assert await names(ops, d.ino) == [b"f", b"sub"]


async def test_a_rename_keeps_the_inode_of_what_moves_and_of_everything_in_it() -> None:
    ops, _ = mount()
    d = await ops.lookup(ROOT_INODE, b"d")
    f = await ops.lookup(d.ino, b"f")
    sub = await ops.lookup(d.ino, b"sub")
    ops.forget([(sub.ino, 1)])  # the kernel let it go: its number stays with its path
    await ops.rename(ROOT_INODE, b"d", ROOT_INODE, b"e", 0)
    assert await errno_of(ops.lookup(ROOT_INODE, b"d")) == errno.ENOENT
    e = await ops.lookup(ROOT_INODE, b"e")
    assert e.ino == d.ino
    assert (await ops.lookup(e.ino, b"f")).ino == f.ino
    assert (await ops.lookup(e.ino, b"sub")).ino == sub.ino
    # A rename over a file: the mover keeps its inode, the replaced one's goes.
    g = await ops.lookup(ROOT_INODE, b"g")
    await ops.rename(e.ino, b"f", ROOT_INODE, b"g", 0)
    assert (await ops.lookup(ROOT_INODE, b"g")).ino == f.ino
    await ops.rename(ROOT_INODE, b"g", ROOT_INODE, b"f", 0)
    entry, _ = await ops.create(ROOT_INODE, b"g", stat.S_IFREG | 0o644, CREATE)
    assert entry.ino not in (g.ino, f.ino)
    noreplace = ops.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", RENAME_NOREPLACE)
    assert await errno_of(noreplace) == errno.EEXIST
    exchange = ops.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", RENAME_EXCHANGE)
    assert await errno_of(exchange) == errno.EINVAL


async def test_an_open_for_writing_carries_the_inode_on() -> None:
    ops, cache = mount(passthrough=True)
    g = await ops.lookup(ROOT_INODE, b"g")
    reader = await ops.open(g.ino, os.O_RDONLY)
    writer = await ops.open(g.ino, os.O_RDWR)
    assert not writer.backing_id and not writer.direct_io and writer.keep_cache
    await ops.write(writer.fh, 3, b"more")
    assert (await ops.getattr(g.ino)).size == 7  # what the writer wrote, seen at once
    assert (await ops.lookup(ROOT_INODE, b"g")).ino == g.ino
    # A read-only open of a file being changed reads it through the page cache.
    cache.whole.add("g")
    another = await ops.open(g.ino, os.O_RDONLY)
    assert another.keep_cache and not another.backing_id
    # ftruncate through the writer; the inode follows.
    assert (await ops.setattr(g.ino, SetAttr(size=1, fh=writer.fh))).size == 1
    assert (await ops.getattr(g.ino)).size == 1
    for fh in (reader.fh, writer.fh, another.fh):
        await ops.release(fh)
    assert (await ops.lookup(ROOT_INODE, b"g")).ino == g.ino


async def test_a_truncate_carries_the_inode_on() -> None:
    ops, _ = mount()
    g = await ops.lookup(ROOT_INODE, b"g")
    # O_CREAT on a name whose entry the kernel had dropped: the file, cut.
    entry, opened = await ops.create(ROOT_INODE, b"g", 0o644, CREATE | os.O_TRUNC)
    assert entry.ino == g.ino and entry.size == 0
    await ops.release(opened.fh)
    assert (await ops.setattr(g.ino, SetAttr(size=10))).size == 10
    assert (await ops.getattr(g.ino)).size == 10
    assert (await ops.lookup(ROOT_INODE, b"g")).ino == g.ino
    d = await ops.lookup(ROOT_INODE, b"d")
    assert await errno_of(ops.setattr(d.ino, SetAttr(size=0))) == errno.EISDIR


async def test_a_change_to_a_file_read_with_passthrough_gets_a_new_inode() -> None:
    ops, cache = mount(FakeCache(tree(), whole=("g",)), passthrough=True)
    g = await ops.lookup(ROOT_INODE, b"g")
    reader = await ops.open(g.ino, os.O_RDONLY)
    assert reader.backing_id
    # ESTALE: the kernel looks the name up again and opens what it finds.
    assert await errno_of(ops.open(g.ino, os.O_WRONLY)) == errno.ESTALE
    new = await ops.lookup(ROOT_INODE, b"g")
    assert new.ino != g.ino
    writer = await ops.open(new.ino, os.O_WRONLY)
    assert not writer.backing_id
    await ops.write(writer.fh, 0, b"longer")
    assert (await ops.getattr(new.ino)).size == 6
    assert (await ops.getattr(g.ino)).size == 3  # the reader's inode keeps its version


async def test_attribute_changes() -> None:
    ops, _ = mount()
    g = await ops.lookup(ROOT_INODE, b"g")
    assert await errno_of(ops.setattr(g.ino, SetAttr(uid=os.getuid() + 1))) == errno.EPERM
    assert await errno_of(ops.setattr(g.ino, SetAttr(gid=os.getgid() + 1))) == errno.EPERM
    same = await ops.setattr(g.ino, SetAttr(uid=os.getuid(), gid=os.getgid()))
    assert same.ino == g.ino and same.mode == g.mode
    changed = await ops.setattr(g.ino, SetAttr(mode=0o600, mtime_ns=5_000_000_000))
    assert changed.mode == stat.S_IFREG | 0o600 and changed.mtime_ns == 5_000_000_000
    # The source gave the file a new version tag (its ctime): still the same inode.
    assert (await ops.getattr(g.ino)).mode == stat.S_IFREG | 0o600
    assert (await ops.lookup(ROOT_INODE, b"g")).ino == g.ino
    d = await ops.lookup(ROOT_INODE, b"d")
    assert (await ops.setattr(d.ino, SetAttr(mode=0o700))).mode == stat.S_IFDIR | 0o700
    assert (await ops.setattr(d.ino, SetAttr(atime_ns=7))).ino == d.ino  # not kept, no error


async def test_what_the_mount_does_not_do() -> None:
    ops, _ = mount()
    assert await errno_of(ops.change("link")) == errno.EPERM
    for request in ("setxattr", "removexattr", "fallocate", "copy_file_range", "tmpfile"):
        assert await errno_of(ops.change(request)) == errno.EOPNOTSUPP


def changes(ops: Operations, g: Entry, d: Entry) -> dict[str, object]:
    reg = stat.S_IFREG | 0o644
    return {
        "create": ops.create(ROOT_INODE, b"new", reg, CREATE),
        "mknod": ops.mknod(ROOT_INODE, b"new", reg, 0),
        "mkdir": ops.mkdir(ROOT_INODE, b"new", 0o755),
        "symlink": ops.symlink(ROOT_INODE, b"new", b"g"),
        "unlink": ops.unlink(ROOT_INODE, b"g"),
        "rmdir": ops.rmdir(d.ino, b"sub"),
        "rename": ops.rename(ROOT_INODE, b"g", ROOT_INODE, b"h", 0),
        "exchange": ops.rename(ROOT_INODE, b"g", ROOT_INODE, b"d", RENAME_EXCHANGE),
        "chmod": ops.setattr(g.ino, SetAttr(mode=0o600)),
        "truncate": ops.setattr(g.ino, SetAttr(size=0)),
        "write open": ops.open(g.ino, os.O_WRONLY),
        "read-write open": ops.open(g.ino, os.O_RDWR),
        "truncating open": ops.open(g.ino, os.O_RDONLY | os.O_TRUNC),
        "link": ops.change("link"),
        "setxattr": ops.change("setxattr"),
    }


async def test_a_read_only_mount_refuses_every_change() -> None:
    ops, cache = mount(FakeCache(tree(), writable=False))
    g = await ops.lookup(ROOT_INODE, b"g")
    d = await ops.lookup(ROOT_INODE, b"d")
    answers = {name: await errno_of(call) for name, call in changes(ops, g, d).items()}
    assert answers == dict.fromkeys(answers, errno.EROFS)
    assert cache.tree == tree()
    assert g.mode == stat.S_IFREG | 0o440 and d.mode == stat.S_IFDIR | 0o550  # no write bits
    reader = await ops.open(g.ino, os.O_RDONLY)
    await ops.release(reader.fh)


async def test_modes_where_the_source_has_none() -> None:
    bare = {"": directory(None), "d": directory(None), "g": file(mode=None)}
    for writable, perms in [(True, (0o644, 0o755)), (False, (0o444, 0o555))]:
        ops, _ = mount(FakeCache(dict(bare), writable=writable))
        g = await ops.lookup(ROOT_INODE, b"g")
        d = await ops.lookup(ROOT_INODE, b"d")
        assert (g.mode, d.mode) == (stat.S_IFREG | perms[0], stat.S_IFDIR | perms[1])


async def test_statfs_shows_the_room_in_the_cache() -> None:
    ops, _ = mount()
    await ops.lookup(ROOT_INODE, b"g")
    fs = await ops.statfs()
    assert (fs.bsize, fs.frsize, fs.blocks, fs.bfree, fs.bavail) == (BLOCK, BLOCK, 100, 40, 40)
    assert fs.files == 2  # the root and g
