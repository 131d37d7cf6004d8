"""Stacks of a run that stopped moving: every rank's Python stack in ``<run_dir>/stacks/rank-N.txt``.

A rank that hangs without dying (a deadlock, a stuck filesystem) leaves the others waiting in a collective
until ``parallelism.collective_timeout_s``; what each rank was doing is then the one fact that explains it.
Each rank arms ``faulthandler``'s watchdog at every step (it dumps every thread's stack if the step outlasts
the collective timeout by the longest step so far), and a rank whose collective failed dumps its stack at
once. Files that stayed empty are removed at the end, so a healthy run leaves no ``stacks/``.
"""

from __future__ import annotations

import faulthandler
from pathlib import Path
from typing import IO, Optional


class StackWatch:
    """This rank's stack file and ``faulthandler`` watchdog (``train_loop`` arms it around each step)."""

    def __init__(self, run_dir: Path, rank: int, *, timeout_s: float):
        self.path = run_dir / "stacks" / f"rank-{rank}.txt"
        self.timeout_s = timeout_s
        self._file: Optional[IO] = None

    def _open(self) -> IO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
        return self._file

    def arm(self, longest_step_s: float) -> None:
        """Dump the stacks if this step has not finished ``timeout_s + longest_step_s`` seconds from now."""
        faulthandler.dump_traceback_later(self.timeout_s + longest_step_s, file=self._open())

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()

    def dump_now(self) -> Path:
        """Write every thread's stack now (a collective of this rank failed); return the file."""
        faulthandler.dump_traceback(file=self._open(), all_threads=True)
        self._file.flush()
        return self.path

    def close(self) -> None:
        """Stop the watchdog; remove the file (and ``stacks/``) if nothing was dumped."""
        self.disarm()
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self.path.stat().st_size == 0:
            self.path.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()  # only when no other rank's file is left in it
            except OSError:
                pass
