"""Run `llamoe ARGS...` with a disk that fills up: used by test_faults.py.

Usage: inject_enospc.py GLOB ARGS...  Every file opened for writing whose path matches GLOB
(fnmatch) accepts its first 64 bytes, then fails each write with ENOSPC, as a full disk does.
Only `open` is replaced; the code under test (torch.save, numpy, the checkpoint and cache
writers) runs unchanged on top of it.
"""

import builtins
import errno
import io
import sys
from fnmatch import fnmatch
from typing import Any

from llamoe.experiments.cli import main


class FullDisk(io.FileIO):
    """A real file on which writes beyond the first 64 bytes fail with ENOSPC."""

    room = 64

    def write(self, data: Any) -> int:
        n = min(len(memoryview(data)), self.room)
        if n == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= n
        return super().write(memoryview(data)[:n])


def install(pattern: str) -> None:
    real_open = builtins.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, int) or not any(c in mode for c in "wax") or not fnmatch(str(file), pattern):
            return real_open(file, mode, *args, **kwargs)
        raw = FullDisk(str(file), mode.replace("b", "").replace("t", ""))
        if "b" in mode:
            return raw
        # text goes through a buffer, as with the real open: TextIOWrapper drops the rest of a short raw write
        return io.TextIOWrapper(io.BufferedWriter(raw), encoding=kwargs.get("encoding") or "utf-8")

    builtins.open = io.open = open_


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
