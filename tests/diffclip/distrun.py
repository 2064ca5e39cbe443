"""Run `python -m diffclip ...` under torchrun on CPU (gloo), the way the multi-process tests need it."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_diffclip(args, cwd, procs=2):
    """`torchrun --standalone --nproc-per-node procs -m diffclip *args` (a free port each time; plain python when
    procs == 1), with the project on PYTHONPATH, no hub access, no Triton interpreter. Returns the completed
    process after asserting it succeeded."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_HOME=os.path.join(str(cwd), "hf-home"), PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
    cmd = (launcher if procs > 1 else [sys.executable]) + ["-m", "diffclip", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
