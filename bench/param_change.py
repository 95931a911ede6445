r"""Run a training script unchanged and record how far each optimizer step moves the parameters.

    python -m bench.param_change OUT.json train_sft_pg.py --model_name_or_path ... (the script's own flags)

With theta_t the parameters the optimizer updates (all of them, as one vector) before optimizer step t, and
theta_T the parameters when the script ends, it writes to OUT.json:

    relative_steps  [||theta_{t+1} - theta_t|| / ||theta_t|| for t = 0 .. T-1]   (2-norms, float64)
    initial_norm    ||theta_0||
    final_norm      ||theta_T||
    displacement    ||theta_T - theta_0||

theta_{t+1} is read just before the next step (or when the script has ended), not right after step t, so a change
of the parameters made after the optimizer's step (--base_project_update projects it) is part of the step. The hook
is PyTorch's global optimizer-step pre-hook; the training script does not know it is measured.
"""
import json
import runpy
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


class StepRecorder:
    """Snapshots the parameters of the one optimizer that steps, before each of its steps."""

    def __init__(self):
        self.optimizer, self.params = None, None
        self.initial = self.previous = None
        self.relative_steps = []

    def snapshot(self):
        return torch.cat([p.detach().reshape(-1).double().cpu() for p in self.params])

    def record_change(self):
        current = self.snapshot()
        self.relative_steps.append(((current - self.previous).norm() / self.previous.norm()).item())
        self.previous = current

    def before_step(self, optimizer, args, kwargs):
        if self.optimizer is None:
            self.optimizer = optimizer
            self.params = [p for group in optimizer.param_groups for p in group["params"]]
            self.initial = self.previous = self.snapshot()
        elif optimizer is not self.optimizer:  # a wrapper stepping too would count every step twice
            raise RuntimeError(f"bench.param_change: a second optimizer ({type(optimizer).__name__}) stepped; the "
                               f"recorder follows one ({type(self.optimizer).__name__})")
        else:
            self.record_change()

    def result(self):
        """The record of the finished run (the last step's change is read now)."""
        if self.optimizer is None:
            raise RuntimeError("bench.param_change: the script never stepped an optimizer")
        self.record_change()
        return {"relative_steps": self.relative_steps, "initial_norm": self.initial.norm().item(),
                "final_norm": self.previous.norm().item(),
                "displacement": (self.previous - self.initial).norm().item()}


def main():
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m bench.param_change OUT.json SCRIPT [SCRIPT FLAGS ...]")
    out, script = Path(sys.argv[1]), sys.argv[2]
    recorder = StepRecorder()
    register_optimizer_step_pre_hook(recorder.before_step)
    sys.argv = sys.argv[2:]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python SCRIPT` would: its sibling modules
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        if done.code not in (None, 0):
            raise
    out.write_text(json.dumps(recorder.result()))


if __name__ == "__main__":
    main()
