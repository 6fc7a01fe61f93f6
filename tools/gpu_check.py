"""make gpu-check: everything that needs a GPU, in one command, on a machine with a CUDA build of
torch, Triton and nvcc preinstalled and no network.

    python tools/gpu_check.py            # build, GPU tests, benchmarks, sanitizers (<= ~6 min on an H100/H200)
    python tools/gpu_check.py --quick    # fewer repeats, no --full benchmark rows (<= ~3 min)

Uses the python that runs it (no venv, nothing downloaded). Stages, each timed and logged:
  1. build: the extension in place for the present GPU's compute capability
     (``pip install --no-build-isolation --no-deps --no-index -e .``, D2Z_FORCE_CUDA=1,
     D2Z_CUDA_ARCH_LIST=<capability>, MAX_JOBS=$(nproc)); a failed build stops here
  2. tests: ``pytest -m cuda tests`` (tests/test_gpu.py: CUDA-graph replay vs eager for cuda and
     triton, parity with torch fused across dtypes / odd sizes / misaligned views / amsgrad /
     found_inf, no host sync, the arch gate on the real device, cuda:1 with two GPUs)
  3. bench: benchmarks/bench_throughput.py on the GPU (ratios to torch fused + LambdaLR, torch
     fused capturable + tensor LR, CUDA-graph rows, GB/s and % of a copy timed in the same run,
     launches and syncs per step), then benchmarks/bench_host_overhead.py (real launches)
  4. sanitizers: compute-sanitizer memcheck and racecheck on a small step of each fused backend
Results go to $D2Z_GPU_OUT, or benchmarks/results/<gpu>/gpu-check-<date>/: one log per stage and
summary.md (stage, exit status, seconds). Exit status: 0 when every stage passed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# a small step of each fused backend, for compute-sanitizer (its own process per tool and backend)
SANITIZED_STEP = """
import sys, torch
from d2z_optim import AdamW
backend = sys.argv[1]
torch.manual_seed(0)
shapes = [(33, 17), (1,), (1023,), (4099,), (0,)]
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in shapes]
    base = torch.empty(1024 + 1, device="cuda", dtype=dtype)
    params.append(torch.nn.Parameter(base[1:]))  # a misaligned view: the masked path
    opt = AdamW(params, total_steps=10, backend=backend, amsgrad=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
torch.cuda.synchronize()
print("sanitized step OK", backend)
"""


def gpu_facts(py: str) -> dict[str, str]:
    code = (
        "import torch; c = torch.cuda.get_device_capability(); "
        "print(torch.cuda.get_device_name()); print(f'{c[0]}.{c[1]}'); print(torch.__version__); "
        "print(torch.cuda.device_count())"
    )
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    return {"name": out[0], "capability": out[1], "torch": out[2], "count": out[3]}


class Stages:
    def __init__(self, out: Path):
        self.out, self.rows = out, []

    def run(self, name: str, cmd: list[str], env: dict | None = None, timeout: int = 600) -> int:
        log = self.out / f"{name}.log"
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        with log.open("w") as f:
            f.write(f"$ {' '.join(cmd)}\n\n")
            f.flush()
            try:
                full_env = {**os.environ, **(env or {})}
                rc = subprocess.run(
                    cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
                ).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        secs = time.time() - t0
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        self.rows.append((name, rc, secs, tail[0][:160]))
        print(f"   exit {rc} in {secs:.0f} s: {tail[0][:160]}", flush=True)
        return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (<= ~3 minutes)")
    ap.add_argument("--no-build", action="store_true", help="use the extension already built in place")
    args = ap.parse_args()
    py = sys.executable
    facts = gpu_facts(py)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    gpu = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"cuda-{facts['name']}")
    out = Path(os.environ.get("D2Z_GPU_OUT") or ROOT / "benchmarks" / "results" / gpu / f"gpu-check-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: {facts['name']} (sm {facts['capability']}), torch {facts['torch']} -> {out}", flush=True)
    stages = Stages(out)
    t_all = time.time()

    if not args.no_build:
        env = {
            "D2Z_FORCE_CUDA": "1",
            "D2Z_CUDA_ARCH_LIST": facts["capability"],
            "MAX_JOBS": str(os.cpu_count() or 4),
        }
        cmd = [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
        if stages.run("build", cmd, env=env, timeout=900) != 0:
            return _summary(stages, out, facts, t_all)

    stages.run("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"])
    bench_out = ["--out", str(out)]
    reps = ["--reps", "5"] if args.quick else []
    stages.run("bench-throughput", [py, "benchmarks/bench_throughput.py", *reps, *bench_out], timeout=900)
    host_reps = ["--reps", "30" if args.quick else "100"]
    stages.run("bench-host-overhead", [py, "benchmarks/bench_host_overhead.py", *host_reps, *bench_out])

    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    script = out / "sanitized_step.py"
    script.write_text(SANITIZED_STEP)
    for tool in ("memcheck", "racecheck"):
        for backend in ("cuda", "triton"):
            cmd = [sanitizer, "--tool", tool, "--error-exitcode", "3", py, str(script), backend]
            stages.run(f"sanitizer-{tool}-{backend}", cmd, env={"PYTHONPATH": str(ROOT)})
    return _summary(stages, out, facts, t_all)


def _summary(stages: Stages, out: Path, facts: dict, t_all: float) -> int:
    lines = [
        f"# gpu-check on {facts['name']} (sm {facts['capability']}, {facts['count']} GPU), torch {facts['torch']}",
        "",
        f"Command: `make gpu-check`; {time.time() - t_all:.0f} s in all. Logs beside this file.",
        "",
        "| stage | exit | seconds | last line |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {rc} | {s:.0f} | {tail.replace('|', '/')} |" for n, rc, s, tail in stages.rows]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print("\n" + text)
    return 0 if all(rc == 0 for _, rc, _, _ in stages.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
