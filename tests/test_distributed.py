"""torch.distributed on the CPU (gloo, two processes): DDP, FSDP2 and distributed checkpoints."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .conftest import BACKENDS

WORKER = Path(__file__).with_name("_dist_worker.py")


@pytest.fixture(scope="module", params=BACKENDS)
def ranks(request, tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    out = tmp_path_factory.mktemp(f"dist-{request.param}")
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), "2", str(out / "init"), str(out), request.param],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_params(a, b, exact=False):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


def test_ddp_matches_single_process(ranks):
    for r in ranks:  # gradients averaged over the two half-batches == the full batch's gradient
        assert_params(r["ddp"], r["ref"])


def test_fsdp2_matches_single_process(ranks):
    assert ranks[0]["fsdp_is_dtensor"]
    for r in ranks:
        assert_params(r["fsdp"], r["ref"])


def test_dcp_save_load_resumes_bit_exactly(ranks):
    for r in ranks:
        assert r["dcp_position"] == 4  # the schedule position came back
        assert_params(r["dcp_resumed"], r["dcp_straight"], exact=True)
