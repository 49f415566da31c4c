"""SIGINT and SIGTERM during training: answered at once, acted on safely.

A Python signal handler runs only when the main thread returns to the interpreter, which a long
step (one bf16 convolution backward on a CPU without bf16 kernels can take minutes) does not do
for a long time. So the C-level handler's wake-up byte (`signal.set_wakeup_fd`) is read by a small
watcher thread, which runs while the step holds no GIL:

- the first SIGINT prints at once "stopping after step N (about X s left); press Ctrl-C again to
  stop now" and asks the loop to checkpoint and stop after the current step;
- a second SIGINT stops the process at once, exit code 130: the step in flight is lost, every
  complete checkpoint is intact (a checkpoint becomes visible only by an atomic rename), and the
  resume command is printed;
- SIGTERM keeps its meaning: checkpoint after the current step, then exit 143.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

SIGINT_EXIT = 128 + signal.SIGINT  # 130, as shells report a process stopped by Ctrl-C


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived: the step finished and a checkpoint was written."""

    def __init__(self, signum: int, checkpoint: Path, epoch: int, step: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} in epoch {epoch} after step {step}")
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them


class StopRequest:
    """The flag the loop checks after each step, and what the watcher needs to say where it is."""

    def __init__(self, run_dir: Path | None = None, announce: Callable[[str], None] | None = None) -> None:
        self.signal: int | None = None
        self.run_dir = run_dir
        self.announce = announce or (lambda text: print(text, file=sys.stderr, flush=True))
        self.step = 0  # the step in flight (1-based), 0 before the first
        self.step_started = time.monotonic()
        self.typical_step_seconds: float | None = None  # measured, else predicted
        self.last_checkpoint: str | None = None
        self.interrupts = 0

    def step_begins(self, step: int) -> None:
        self.step, self.step_started = step, time.monotonic()

    def step_ends(self, seconds: float) -> None:
        # a running figure for "about X s left": the latest step's time is the best guess for the next
        self.typical_step_seconds = seconds

    def _handle(self, signum: int, _frame: object) -> None:
        # Python-level handler: the flag only; what a user sees is the watcher's
        if self.signal is None:
            self.signal = signum

    def _received(self, signum: int) -> None:
        """In the watcher thread, as soon as the signal arrives."""
        if signum == signal.SIGTERM:
            self.signal = self.signal or signum
            return
        self.interrupts += 1
        if self.interrupts == 1:
            self.signal = self.signal or signum
            self.announce(f"stopping after step {self.step}{self._time_left()}; press Ctrl-C again to stop now")
            return
        kept = (f"checkpoint {self.last_checkpoint} is the last complete one, intact"
                if self.last_checkpoint else "no checkpoint had been written in this process")
        resume = f"; continue with: mmkit resume {self.run_dir}" if self.run_dir is not None else ""
        self.announce(f"stopped now in step {self.step}; {kept}{resume}")
        if sys.stderr.isatty():
            sys.stderr.write("\x1b[?25h")  # the progress display hid the cursor
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(SIGINT_EXIT)

    def _time_left(self) -> str:
        if self.typical_step_seconds is None or self.step == 0:
            return ""
        left = max(self.typical_step_seconds - (time.monotonic() - self.step_started), 0.0)
        return f" (about {left:.0f} s left)" if left >= 1 else " (less than a second left)"

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        watcher = threading.Thread(target=self._watch, args=(read_fd,), name="mmkit-signals", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.write(write_fd, b"\0")  # 0 is no signal: the watcher's cue to end
            watcher.join()
            os.close(write_fd)
            os.close(read_fd)

    def _watch(self, read_fd: int) -> None:
        while True:
            data = os.read(read_fd, 64)
            if not data:
                return
            for signum in data:
                if signum == 0:
                    return
                if signum in (signal.SIGINT, signal.SIGTERM):
                    self._received(signum)
