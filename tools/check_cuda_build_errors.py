"""setup.py refuses a CUDA toolkit whose major version differs from torch's, with a clear message.

    <python of a CUDA torch> tools/check_cuda_build_errors.py      (run by `make wheel-cuda`)

A fake toolkit (bin/nvcc printing another release, include/cuda.h) is put in CUDA_HOME and
`setup.py --name` is run with D2Z_FORCE_CUDA=1: it must fail before compiling anything, naming
both versions and the ways out, instead of a wall of compiler errors later.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch

    if not torch.version.cuda:
        sys.exit("this check needs a CUDA build of torch (torch.version.cuda is None)")
    major = int(torch.version.cuda.split(".")[0])
    other = f"{major - 1}.8"
    with tempfile.TemporaryDirectory() as home:
        (Path(home) / "bin").mkdir()
        (Path(home) / "include").mkdir()
        (Path(home) / "include" / "cuda.h").write_text("/* fake */\n")
        nvcc = Path(home) / "bin" / "nvcc"
        nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {other}, V{other}.93'\n")
        nvcc.chmod(0o755)
        env = {**os.environ, "CUDA_HOME": home, "D2Z_FORCE_CUDA": "1"}
        proc = subprocess.run(
            [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
    out = proc.stdout + proc.stderr
    expected = (
        "CUDA version mismatch",
        f"torch is built for CUDA {torch.version.cuda}",
        f"is CUDA {other}",
        "D2Z_FORCE_CPU=1",
    )
    missing = [e for e in expected if e not in out]
    if proc.returncode == 0 or missing:
        sys.exit(f"setup.py with a CUDA {other} nvcc: exit {proc.returncode}, missing {missing} in:\n{out[-3000:]}")
    print(f"ok: a CUDA {other} nvcc against torch CUDA {torch.version.cuda} fails with a clear message")


if __name__ == "__main__":
    main()
