"""What keeps a run from going silently wrong or losing work: one-line errors for users' mistakes, one run per
output folder, a main-process-first block that every process leaves together, and a per-step decision to stop
(SIGTERM or Ctrl-C, or a non-finite loss or gradient norm) that every rank takes together.
"""

import math
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import stop_on_ctrl_c

USER_ERROR_EXIT = 2  # a mistake in the flags, the data, the files or the environment: `error: <message>`
PREEMPTED_EXIT = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM
INTERRUPTED_EXIT = stop_on_ctrl_c.EXIT_CODE  # 130, what a shell reports for a process ended by Ctrl-C
LOCK_FILE = "run.lock"


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, the data): the scripts print `error: <message>` and exit 2,
    without a traceback. Anything else is a bug and keeps its traceback."""


def is_main_rank():
    """Whether this is the main process (global rank 0); true without a launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def run_main(main):
    """Run a script's main(); user errors become one line on stderr and exit code 2, Ctrl-C one line and exit 130.

    Besides UserError: data_utils.DataError (bad dataset input) and SystemExit with a message (the refusals in
    backends.py and elsewhere that predate UserError). argparse errors become UserErrors in make_parser. With several
    processes every one of them finds the same mistake (the checks are deterministic, and a data error on the main
    process reaches the others through `main_process_first`); only the main process prints it.
    """
    from data_utils import DataError

    stop_on_ctrl_c.hand_over()  # Ctrl-C raises KeyboardInterrupt again: handled below
    try:
        main()
    except (UserError, DataError) as err:
        sys.exit(user_error(err))
    except SystemExit as err:
        if isinstance(err.code, str):
            sys.exit(user_error(err.code))
        raise
    except KeyboardInterrupt:  # before training (where Ctrl-C stops after a step), or a second Ctrl-C
        leave_process_group()
        if is_main_rank():
            print(stop_on_ctrl_c.MESSAGE, end="", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT)


def user_error(message):
    leave_process_group()
    sys.stdout.flush()
    if is_main_rank():
        print(f"error: {message}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


def leave_process_group():
    """Close the process group, if any, before exiting: a process that exits with it open can abort in its
    communication threads' teardown ("terminate called without an active exception", SIGABRT)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextmanager
def main_process_first(accelerator):
    """Accelerate's `main_process_first()` (the main process runs the block first, e.g. to fill the datasets cache,
    then the others), except that a failure on the main process reaches the others: instead of a barrier they wait
    for its outcome, and on a user error raise the same UserError (which only the main process prints), on any
    other failure exit with code 1 and no traceback of their own. Without it they would fail in their wait with a
    traceback of the collective."""
    if accelerator.num_processes == 1:
        yield
        return
    from accelerate.utils import broadcast_object_list
    from data_utils import DataError

    if not accelerator.is_main_process:
        failure = broadcast_object_list([None])[0]  # (kind, message) from the main process, or None
        if failure is not None:
            kind, message = failure
            if kind == "user":
                raise UserError(message)
            sys.exit(1)
        yield
        return
    try:
        yield
    except (UserError, DataError) as err:
        broadcast_object_list([("user", str(err))])
        raise
    except SystemExit as err:
        broadcast_object_list([("user", err.code) if isinstance(err.code, str) else ("other", None)])
        raise
    except BaseException:
        broadcast_object_list([("other", None)])
        raise
    broadcast_object_list([None])


# ---------------------------------------------------------------------------------------------------------------
# One run per output folder
# ---------------------------------------------------------------------------------------------------------------

_held_locks = []  # open lock files: the lock lasts as long as the process (the OS drops it on any exit)


def hold_output_dir(output_dir):
    """Take OUTPUT_DIR/run.lock for this process's lifetime, or stop with the other run's host, pid, start time.

    An flock dies with the process that holds it, however it ends (even kill -9), so a lock is never stale. Only
    the main process (global rank 0) takes it; the others run under its launcher.
    """
    import fcntl

    if not is_main_rank():
        return
    path = Path(output_dir, LOCK_FILE)
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"--output_dir {output_dir}: cannot write there ({err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that has not written its name"
        os.close(fd)
        raise UserError(f"{output_dir} is in use by another run ({holder}); wait for it to end, or choose another "
                        "--output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(), 0)
    _held_locks.append(fd)


# ---------------------------------------------------------------------------------------------------------------
# Stopping: SIGTERM and non-finite values
# ---------------------------------------------------------------------------------------------------------------

class StepGuard:
    """Decides after every optimizer step whether the run stops, the same way on every rank.

    SIGTERM (what a cluster scheduler sends before it kills a job) and a first Ctrl-C (SIGINT) only set a flag;
    `check` sums the flags of all ranks, so when the launcher signals every rank, or only some, all stop after the
    same step and write one checkpoint together. A second Ctrl-C stops at once (KeyboardInterrupt; checkpoints are
    written under a temporary name, so the previous ones stay whole). A non-finite loss or gradient norm stops the
    run before anything from that step is saved. The gradient norm is global (clipping takes it over all ranks) and
    the loss is reduced here, so every rank sees the same values. One small all-reduce per step (none with one
    process).
    """

    def __init__(self, accelerator, args):
        self.accelerator, self.args = accelerator, args
        self.received, self.preempted = None, False  # the first stopping signal this rank received
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
            if self.accelerator.is_main_process:  # os.write: a print here could interrupt a print in progress
                os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once, "
                            b"without one)\n")
        self.received = self.received or signum

    def check(self, step, loss_share, grad_norm):
        """After optimizer step `step` (counted from 1): returns the step's loss (summed over ranks from each rank's
        `loss_share`); sets `preempted` if any rank got SIGTERM or Ctrl-C; raises UserError on a non-finite loss or
        norm."""
        device = self.accelerator.device
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                              for v in (float(self.received is not None), loss_share, grad_norm)])
        world = self.accelerator.num_processes
        if world > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        signalled, loss, grad_norm = values.tolist()
        grad_norm /= world  # the same on every rank
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            from checkpoint import checkpoints

            found = checkpoints(self.args.output_dir)
            raise UserError(
                f"non-finite training at step {step}: loss {loss}, gradient norm {grad_norm}; stopped without saving "
                f"this step ({'the last checkpoint is ' + str(found[-1]) if found else 'no checkpoint was written'}). "
                f"Usual causes: a learning rate too high (--learning_rate {self.args.learning_rate:g}), bf16 "
                "overflow (try without --bf16), or bad data (extreme or empty samples)")
        self.preempted = signalled > 0
        return loss

    def exit_preempted(self, step):
        """After the checkpoint of `step` is written: say how to resume and exit with 128 + the signal's number
        (143 for SIGTERM, 130 for Ctrl-C; 143 on a rank that was stopped by another rank's signal)."""
        folder = Path(self.args.output_dir, f"checkpoint-{step}")
        received = self.received or signal.SIGTERM
        name = "Ctrl-C (SIGINT)" if received == signal.SIGINT else "SIGTERM"
        self.accelerator.print(f"\nstopped by {name} after step {step}; saved {folder}. Resume with the same "
                               f"command and --resume_from_checkpoint True (or {folder})")
        sys.exit(128 + received)


def first_line(err):
    """The first line of an exception's message, for errors wrapped into a UserError."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
