"""cachefs's own FUSE transport: the kernel protocol over /dev/fuse, served with trio."""
