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


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """One launch of the two gloo workers for every backend (each backend's checks in turn, in one
    process group): {backend: [rank 0's results, rank 1's]}."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), "2", str(out / "init"), str(out), ",".join(BACKENDS)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    limit = 300 * len(BACKENDS)  # 300 s per backend, as when each had its own launch
    try:
        logs = [p.communicate(timeout=limit)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = "\n".join(p.communicate()[0][-2000:] for p in procs)
        pytest.fail(f"the gloo workers did not finish in {limit} s:\n{tails}")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return {b: [torch.load(out / b / f"rank{r}.pt", weights_only=False) for r in range(2)] for b in BACKENDS}


@pytest.fixture(scope="module", params=BACKENDS)
def ranks(request, workers):
    return workers[request.param]


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


# ---------------------------------------------------------------- max_grad_norm across ranks
# opt.grad_norm against clip_grad_norm_'s total norm of the single-process run: 1e-5 relative, since
# the gradients themselves differ in their last bits (two half-batch means averaged by DDP's
# all-reduce / FSDP2's reduce-scatter vs one full-batch mean), and under FSDP2 the norm is the
# per-shard sums of squares combined across ranks, an fp32 reduction in another order.
NORM_RTOL = 1e-5
# FSDP2 as fully_shard builds it by default (a default mesh per call: equal, distinct objects) and
# with one mesh given to every call
FSDP_KINDS = ["fsdp-default-mesh", "fsdp-one-mesh"]


def ran(entry):
    assert "error" not in entry, entry["error"]
    return entry


@pytest.mark.parametrize("norm_type", ["2", "inf"])
@pytest.mark.parametrize("kind", [*FSDP_KINDS, "ddp"])
def test_max_grad_norm_matches_clip_grad_norm_then_torch_adamw(ranks, kind, norm_type):
    ref = ranks[0]["clip"][norm_type]
    ref_norms, max_norm = ref["ref_norms"], ref["max_norm"]
    # the test means something: clipping was active on some steps and not on others
    assert (ref_norms > max_norm * 1.05).sum() >= 3, (ref_norms, max_norm)
    assert (ref_norms < max_norm * 0.95).sum() >= 3, (ref_norms, max_norm)
    runs = [ran(r["clip"][norm_type][kind]) for r in ranks]
    for r, rank in zip(runs, ranks):
        assert rank["clip"][norm_type]["max_norm"] == max_norm
        assert r.get("is_dtensor", True)
        assert r["skipped"] == 0
        assert r["norms"].dtype == torch.float32 and r["norms"].shape == ref_norms.shape
        torch.testing.assert_close(r["norms"], ref_norms, rtol=NORM_RTOL, atol=0)
        assert_params(r["params"], ref["ref"])
    # every rank clips by the same coefficient: FSDP2's all-reduced norm, DDP's replicated gradients
    assert torch.equal(runs[0]["norms"], runs[1]["norms"])


@pytest.mark.parametrize("mesh", ["default-mesh", "one-mesh"])
@pytest.mark.parametrize("case", ["2-nan", "inf-nan", "2-inf"])
def test_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(ranks, case, mesh):
    runs = [ran(r["clip"][f"nonfinite-{case}-{mesh}"]) for r in ranks]
    assert runs[1]["injected"] and not runs[0]["injected"]  # rank 1's shard only
    for rank, r in enumerate(runs):
        assert r["skipped"] == 1, (rank, r)
        assert r["step_count_delta"] == 0, (rank, r)
        assert not r["grad_norm_finite"], (rank, r)
        assert r["params_unchanged"] and r["states_unchanged"], (rank, r)
        assert r["after_skipped"] == 1 and r["after_step_count_delta"] == 1, (rank, r)  # and it goes on


# ---------------------------------------------------------------- lean states under FSDP2
# FSDP2 against one process on the whole batch, in fp32 master values: the gradients differ in their
# last bits (two half-batch means reduce-scattered vs one mean; in bf16 for the bf16 model), and a
# 16-bit rounding of a moment or a bf16 gradient may then go the other way: one bf16 ulp (2^-8
# relative) of a step's update, lr = 1e-2, over 8 steps, bounds the masters' difference by ~3e-4.
LEAN_ATOL = 5e-4


@pytest.mark.parametrize("mode", ["bf16-moments", "remainders"])
def test_fsdp2_steps_lean_states_on_its_shards_as_one_process(ranks, mode):
    for r in ranks:
        run = ran(r["lean"][mode])
        for x, y in zip(run["fsdp"], run["ref"]):
            assert x.dtype == torch.float32
            torch.testing.assert_close(x, y, rtol=0, atol=LEAN_ATOL)
        # the states are DTensor shards, stored as asked
        for st in run["states"]:
            assert all(kind == "DTensor" for kind, _ in st.values()), st
            if mode == "bf16-moments":
                assert st["exp_avg"][1] == st["exp_avg_sq"][1] == torch.bfloat16
            else:
                assert st["param_remainder"][1] == torch.int16 and st["exp_avg"][1] == torch.float32
        if mode == "remainders":  # the shards' masters carry more than their bf16 halves
            assert run["carried"] and all(run["carried"]), run["carried"]
