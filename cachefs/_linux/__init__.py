"""Linux syscall helpers.

Page cache, huge pages, io_uring, mmap views. They import nothing else from
cachefs.
"""
