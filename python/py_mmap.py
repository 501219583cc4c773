"""The classic shared-memory demo's Python side (scenarios.md, part B).

Plain third-party code: it knows nothing of pyipcd. `MMAPShmem().run()` opens
the shared file, maps 1024 bytes, writes "567\\n" at offset 0, then ten times
reads a line at offset 0, prints it, writes "567\\n" back and sleeps a second.
Nothing synchronises it with the other writer: that is the demo's known flaw.

The file is `input.dat` in the working directory, as in the classic demo, or
the path in the environment variable PY_MMAP_FILE.
"""

import mmap
import os
import time

SIZE = 1024


class MMAPShmem:
    def __init__(self):
        self.path = os.environ.get("PY_MMAP_FILE", "input.dat")
        self.rounds = int(os.environ.get("PY_MMAP_ROUNDS", "10"))
        self.pause = float(os.environ.get("PY_MMAP_PAUSE", "1.0"))

    def run(self):
        with open(self.path, "r+b") as f:
            mm = mmap.mmap(f.fileno(), SIZE)
            try:
                mm.seek(0)
                mm.write(b"567\n")
                for _ in range(self.rounds):
                    mm.seek(0)
                    line = mm.readline()
                    print("Python read:", line.rstrip(b"\x00\n").decode(errors="replace"))
                    mm.seek(0)
                    mm.write(b"567\n")
                    time.sleep(self.pause)
            finally:
                mm.close()
