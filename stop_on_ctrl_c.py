"""Ctrl-C while a script's modules import (torch, transformers: seconds) stops at once with one line and exit code
130, instead of a KeyboardInterrupt traceback from inside some library.

Imported first by train_sft_pg.py, train_dpo_pg.py and evaluate_alignment.py (standard library only, so that it
acts from the first moment); run_guard.run_main hands Ctrl-C back to Python when main() starts, where it stops with
the same line (and during training StepGuard makes the first Ctrl-C stop after a step). Only when the program is one
of this folder's scripts: a test or a benchmark that imports a script keeps its own Ctrl-C.
"""

import os
import signal
import sys
from pathlib import Path

MESSAGE = "\nstopped by Ctrl-C\n"
EXIT_CODE = 128 + signal.SIGINT  # 130, what a shell reports for a process ended by Ctrl-C


def stop_at_once(signum, frame):
    """Print one line (on the main process only: under a launcher every rank gets Ctrl-C) and exit 130 without
    unwinding the half-done imports."""
    if int(os.environ.get("RANK", "0")) == 0:
        os.write(2, MESSAGE.encode())  # os.write: a print here could interrupt a print in progress
    os._exit(EXIT_CODE)


def hand_over():
    """From here Ctrl-C raises KeyboardInterrupt again (run_main turns it into the same line and exit code)."""
    if signal.getsignal(signal.SIGINT) is stop_at_once:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_program = getattr(sys.modules.get("__main__"), "__file__", None)
if _program and Path(_program).resolve().parent == Path(__file__).resolve().parent:
    signal.signal(signal.SIGINT, stop_at_once)
