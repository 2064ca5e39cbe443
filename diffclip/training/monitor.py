"""What a run reports (rank 0 only): a tqdm bar (loss, lr, images/s), RUN_DIR/log.jsonl (one JSON object per
logged step), and TensorBoard scalars under RUN_DIR/tensorboard when the `tensorboard` package is installed."""

from __future__ import annotations

import importlib.util
import json
import os


class Monitor:
    def __init__(self, run_dir: str, enabled: bool, start_step: int, total_steps: int):
        self.enabled = enabled
        self.bar = self.tb = self.log = None
        if not enabled:
            return
        from tqdm import tqdm

        # Appending: a resumed run continues the same log (lines after the checkpoint's step, written before a
        # crash, are dropped first so that every step appears once).
        self.log_path = os.path.join(run_dir, "log.jsonl")
        _truncate_after(self.log_path, start_step)
        self.log = open(self.log_path, "a", encoding="utf-8")
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def tensorboard_note(self) -> str:
        return "TensorBoard: on (RUN_DIR/tensorboard)" if self.tb else "TensorBoard: off (pip install tensorboard)"

    def advance(self, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def record(self, row: dict) -> None:
        """One line of log.jsonl (flushed: a crash loses nothing logged) and the same scalars for TensorBoard."""
        if not self.enabled:
            return
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, row["step"])

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        elif self.enabled:
            print(message)

    def close(self) -> None:
        for obj in (self.bar, self.tb, self.log):
            if obj is not None:
                obj.close()


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= step:
                keep.append(ln)
        except json.JSONDecodeError:  # a line cut by a crash
            pass
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)
