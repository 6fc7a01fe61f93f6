"""Worker for test_distributed.py: one of two gloo ranks on the CPU (not collected by pytest)."""

import datetime
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist

from d2z_optim import AdamW

STEPS, K = 8, 4
CLIP_STEPS, CLIP_LR = 12, 1e-2


def model_fn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def data(k):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def loss_fn(m, x, y):
    return ((m(x) - y) ** 2).mean()


def train(model, opt, steps, start=0, shard=None):
    for k in range(start, start + steps):
        x, y = data(k)
        if shard is not None:  # this rank's half of the batch
            x, y = x[shard::2], y[shard::2]
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


def opt_fn(params, backend):
    return AdamW(params, lr=1e-2, weight_decay=0.1, total_steps=2 * STEPS, amsgrad=True, backend=backend)


def full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def sharded(mesh=None, dtype=torch.float32):
    """The model under FSDP2: each Linear its own unit, then the root (``mesh`` None: each
    fully_shard call makes its own default mesh over the world, as FSDP2 does), in ``dtype``
    (cast before sharding, as FSDP2 asks)."""
    from torch.distributed.fsdp import fully_shard

    m = model_fn().to(dtype)
    for layer in (m[0], m[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


# ---------------------------------------------------------------- gradient clipping (max_grad_norm)
def loss_scale(k):
    """Gradients 16x apart from step to step: with max_grad_norm between them, clipping is active
    on some steps and not on others."""
    return 4.0 if k % 2 else 0.25


def clip_batch(k, shard=None):
    x, y = data(50 + k)
    return (x, y) if shard is None else (x[shard::2], y[shard::2])


def clip_opt(params, backend, max_norm, norm_type):
    return AdamW(
        params,
        lr=CLIP_LR,
        weight_decay=0.1,
        total_steps=CLIP_STEPS,
        amsgrad=True,
        backend=backend,
        max_grad_norm=max_norm,
        norm_type=norm_type,
    )


def clip_lrs():
    """The LR of each step of clip_opt's schedule (peak times the table's multiplier, in float64 as
    current_lr() gives it), for the torch reference."""
    table = clip_opt([torch.nn.Parameter(torch.zeros(1))], "torch", 1.0, 2.0).lr_table
    return [CLIP_LR * float(table[k]) for k in range(CLIP_STEPS)]


def clip_reference(max_norm, norm_type, lrs):
    """One process, the whole batch: clip_grad_norm_ then torch.optim.AdamW at d2z's per-step LR.
    Returns the parameters and clip_grad_norm_'s total norm of every step."""
    m = model_fn()
    params = list(m.parameters())
    opt = torch.optim.AdamW(params, lr=CLIP_LR, weight_decay=0.1, amsgrad=True, foreach=True)
    norms = []
    for k in range(CLIP_STEPS):
        x, y = clip_batch(k)
        opt.zero_grad()
        (loss_fn(m, x, y) * loss_scale(k)).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=True).detach().clone())
        for g in opt.param_groups:
            g["lr"] = lrs[k]
        opt.step()
    return [p.detach().clone() for p in params], torch.stack(norms)


def clip_train(model, opt, steps, shard, start=0):
    """d2z's clipped steps on this rank's half batch; returns opt.grad_norm after every step."""
    norms = []
    for k in range(start, start + steps):
        x, y = clip_batch(k, shard)
        opt.zero_grad()
        (loss_fn(model, x, y) * loss_scale(k)).backward()
        opt.step()
        norms.append(opt.grad_norm.detach().clone())
    return norms


def clip_norm_pick(norm_type, lrs):
    """max_grad_norm for norm_type: the median of an unclipped reference run's norms (the loss
    scale alternates, so it falls between the small-gradient and the large-gradient steps)."""
    _, norms = clip_reference(math.inf, norm_type, lrs)
    return float(norms.median())


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def guarded(fn, *args):
    """fn's results, or the traceback it raised (the test shows it): a failing clip case fails its
    own tests, not the worker and every other test with it. (Each case raises on both ranks alike,
    so no rank is left waiting in a collective.)"""
    try:
        return fn(*args)
    except Exception:
        return {"error": traceback.format_exc()}


def clip_fsdp_run(rank, backend, max_norm, norm_type, mesh):
    model = sharded(mesh)
    opt = clip_opt(model.parameters(), backend, max_norm, norm_type)
    norms = torch.stack(clip_train(model, opt, CLIP_STEPS, rank))
    return {
        "norms": norms,
        "params": [full(p).detach().clone() for p in model.parameters()],
        "skipped": int(opt.skipped_steps),
        "is_dtensor": all(type(p).__name__ == "DTensor" for p in model.parameters()),
    }


def clip_ddp_run(rank, backend, max_norm, norm_type):
    model = torch.nn.parallel.DistributedDataParallel(model_fn())
    opt = clip_opt(model.parameters(), backend, max_norm, norm_type)
    norms = torch.stack(clip_train(model, opt, CLIP_STEPS, rank))
    return {
        "norms": norms,
        "params": [p.detach().clone() for p in model.module.parameters()],
        "skipped": int(opt.skipped_steps),
    }


def nonfinite_run(rank, backend, norm_type, bad, mesh):
    """Two clipped steps, then one whose gradient has ``bad`` in rank 1's first non-empty local
    shard (after FSDP2's reduce-scatter: rank 0's gradients stay finite), then a finite one."""
    model = sharded(mesh)
    params = list(model.parameters())
    opt = clip_opt(params, backend, 1.0, norm_type)
    clip_train(model, opt, 2, rank)
    before = [full(p).detach().clone() for p in params]
    states = [{k: local(v).clone() for k, v in opt.state[p].items()} for p in params]
    count = int(opt.step_count)
    x, y = clip_batch(2, rank)
    opt.zero_grad()
    (loss_fn(model, x, y) * loss_scale(2)).backward()
    injected = False
    if rank == 1:
        with torch.no_grad():
            g = next(p.grad.to_local() for p in params if p.grad.to_local().numel())
            g.view(-1)[0] = bad
        injected = not all(bool(torch.isfinite(p.grad.to_local()).all()) for p in params)
    opt.step()
    after = [full(p).detach().clone() for p in params]  # a collective: every rank gathers every one
    out = {
        "injected": injected,
        "skipped": int(opt.skipped_steps),
        "step_count_delta": int(opt.step_count) - count,
        "grad_norm_finite": bool(torch.isfinite(opt.grad_norm)),
        "params_unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
        "states_unchanged": all(
            torch.equal(v, local(opt.state[p][k])) for s, p in zip(states, params) for k, v in s.items()
        ),
    }
    clip_train(model, opt, 1, rank, start=3)  # the next finite step is applied again
    out["after_skipped"] = int(opt.skipped_steps)
    out["after_step_count_delta"] = int(opt.step_count) - count
    return out


def clip_results(rank, world, backend):
    """FSDP2 and DDP with max_grad_norm against the clip_grad_norm_ + torch AdamW reference, and a
    non-finite gradient on rank 1's shard only (both ranks must skip that step). FSDP2 twice: as
    sharded() builds it by default (each fully_shard call makes its own default mesh: equal meshes,
    distinct objects) and with one mesh handed to every fully_shard call."""
    from torch.distributed.device_mesh import init_device_mesh

    meshes = {"default": None, "one": init_device_mesh("cpu", (world,))}
    out = {}
    lrs = clip_lrs()
    for nt_name, nt in (("2", 2.0), ("inf", math.inf)):
        max_norm = clip_norm_pick(nt, lrs)
        ref_params, ref_norms = clip_reference(max_norm, nt, lrs)
        entry = {"max_norm": max_norm, "ref": ref_params, "ref_norms": ref_norms}
        for mesh_name, mesh in meshes.items():
            entry[f"fsdp-{mesh_name}-mesh"] = guarded(clip_fsdp_run, rank, backend, max_norm, nt, mesh)
        entry["ddp"] = guarded(clip_ddp_run, rank, backend, max_norm, nt)
        out[nt_name] = entry
    # a NaN / Inf in one local gradient shard of rank 1: the norm all-reduce must make both ranks skip
    for case, nt, bad in (("2-nan", 2.0, math.nan), ("inf-nan", math.inf, math.nan), ("2-inf", 2.0, math.inf)):
        for mesh_name, mesh in meshes.items():
            out[f"nonfinite-{case}-{mesh_name}-mesh"] = guarded(nonfinite_run, rank, backend, nt, bad, mesh)
    return out


# ---------------------------------------------------------------- lean states under FSDP2
LEAN_MODES = {
    # fp32 parameters, bf16 moments: 20 bytes per parameter and step
    "bf16-moments": (torch.float32, dict(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)),
    # a bf16 model whose fp32 masters are its bf16 halves and int16 remainders
    "remainders": (torch.bfloat16, dict(master_weights="remainders")),
}


def lean_masters(model, opt):
    """The fp32 master values of a model's parameters (full tensors): the parameters, or for those
    with a remainder the join of both halves (on the local shards, then gathered as fp32)."""
    from d2z_optim.backends.remainders import join

    out = []
    for p in model.parameters():
        r = opt.state[p].get("param_remainder")
        if r is None:
            out.append(full(p).detach().float().clone())
            continue
        m = join(local(p).detach(), local(r))
        if hasattr(p, "to_local"):
            from torch.distributed.tensor import DTensor

            m = DTensor.from_local(m, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
        out.append(m.clone())
    return out


def lean_run(rank, backend, mode):
    """One lean mode: the single-process run on the whole batch, and FSDP2 on this rank's half."""
    dtype, kw = LEAN_MODES[mode]

    def make(model):
        opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, total_steps=2 * STEPS, backend=backend, **kw)
        return model, opt

    def run(model, opt, shard):
        for k in range(STEPS):
            x, y = data(k)
            if shard is not None:
                x, y = x[shard::2], y[shard::2]
            opt.zero_grad()
            loss_fn(model, x.to(dtype), y.to(dtype)).float().backward()
            opt.step()

    ref_m, ref_o = make(model_fn().to(dtype))
    run(ref_m, ref_o, None)
    m, o = make(sharded(dtype=dtype))
    run(m, o, rank)
    states = [
        {k: (type(v).__name__, local(v).dtype) for k, v in o.state[p].items() if k != "step"} for p in m.parameters()
    ]
    carried = [
        bool(local(o.state[p]["param_remainder"]).any()) for p in m.parameters() if "param_remainder" in o.state[p]
    ]
    return {"ref": lean_masters(ref_m, ref_o), "fsdp": lean_masters(m, o), "states": states, "carried": carried}


def run_backend(rank, world, out_dir, backend):
    """Every check on one d2z backend; the results in out_dir/rank<rank>.pt."""
    results = {}

    # single-process reference on the whole batch
    ref = model_fn()
    train(ref, opt_fn(ref.parameters(), backend), STEPS)
    results["ref"] = [p.detach().clone() for p in ref.parameters()]

    # DDP: each rank sees half the batch; gradients are averaged
    ddp_model = torch.nn.parallel.DistributedDataParallel(model_fn())
    train(ddp_model, opt_fn(ddp_model.parameters(), backend), STEPS, shard=rank)
    results["ddp"] = [p.detach().clone() for p in ddp_model.module.parameters()]

    # FSDP2: parameters are DTensor shards; the optimizer runs on the local shards
    fsdp_model = sharded()
    fsdp_opt = opt_fn(fsdp_model.parameters(), backend)
    train(fsdp_model, fsdp_opt, STEPS, shard=rank)
    results["fsdp"] = [full(p).detach().clone() for p in fsdp_model.parameters()]
    results["fsdp_is_dtensor"] = type(next(fsdp_model.parameters())).__name__ == "DTensor"

    # torch.distributed.checkpoint: save after K steps, reload into fresh objects, continue
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def fsdp_pair():
        m = sharded()
        return m, opt_fn(m.parameters(), backend)

    straight_m, straight_o = fsdp_pair()
    train(straight_m, straight_o, 2 * K, shard=rank)
    a_m, a_o = fsdp_pair()
    train(a_m, a_o, K, shard=rank)
    msd, osd = get_state_dict(a_m, a_o)
    ckpt = os.path.join(out_dir, "ckpt")
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    b_m, b_o = fsdp_pair()
    msd, osd = get_state_dict(b_m, b_o)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(b_m, b_o, model_state_dict=state["model"], optim_state_dict=state["optim"])
    results["dcp_position"] = int(b_o.step_count)
    train(b_m, b_o, K, start=K, shard=rank)
    results["dcp_resumed"] = [full(p).detach().clone() for p in b_m.parameters()]
    results["dcp_straight"] = [full(p).detach().clone() for p in straight_m.parameters()]

    # max_grad_norm under FSDP2 and DDP; a non-finite gradient on one rank's shard
    results["clip"] = clip_results(rank, world, backend)

    # lean states (bf16 moments; bf16 parameters with remainders) on FSDP2's shards
    results["lean"] = {mode: guarded(lean_run, rank, backend, mode) for mode in LEAN_MODES}

    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def main(rank, world, init_file, out_dir, backends):
    """Each of ``backends`` (comma-separated) in turn, in one process group: its results in
    out_dir/<backend>/. (One launch for all of them: starting the two processes, importing torch
    and setting up gloo took about as long as one backend's checks.)"""
    # a collective one rank never joins (a case that raised on the other) fails after 2 minutes
    # instead of gloo's 30
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    for backend in backends.split(","):
        folder = os.path.join(out_dir, backend)
        os.makedirs(folder, exist_ok=True)
        run_backend(rank, world, folder, backend)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, init_file, out_dir, backends = sys.argv[1:6]
    main(int(rank), int(world), init_file, out_dir, backends)
    # Skip interpreter finalisation: FSDP2 keeps the gloo group alive past destroy_process_group,
    # and its worker thread can free a finished all-gather's tensors (taking the GIL) while Python
    # is being torn down, which aborts ("terminate called without an active exception"; its core dump,
    # reproduced here from the CI failure: ~AsyncAllgatherCoalescedWork -> decref_pyobject -> take_gil -> pthread_exit).
    # A torch teardown race (pytorch/pytorch#179291), not ours: the results are already saved.
    sys.stdout.flush()
    os._exit(0)
