"""Worker for test_distributed.py: one of two gloo ranks on the CPU (not collected by pytest)."""

import os
import sys

import torch
import torch.distributed as dist

from d2z_optim import AdamW

STEPS, K = 8, 4


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


def main(rank, world, init_file, out_dir, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
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
    from torch.distributed.fsdp import fully_shard

    fsdp_model = model_fn()
    for layer in (fsdp_model[0], fsdp_model[2]):
        fully_shard(layer)
    fully_shard(fsdp_model)
    fsdp_opt = opt_fn(fsdp_model.parameters(), backend)
    train(fsdp_model, fsdp_opt, STEPS, shard=rank)
    results["fsdp"] = [full(p).detach().clone() for p in fsdp_model.parameters()]
    results["fsdp_is_dtensor"] = type(next(fsdp_model.parameters())).__name__ == "DTensor"

    # torch.distributed.checkpoint: save after K steps, reload into fresh objects, continue
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def fsdp_pair():
        m = model_fn()
        for layer in (m[0], m[2]):
            fully_shard(layer)
        fully_shard(m)
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

    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, init_file, out_dir, backend = sys.argv[1:6]
    main(int(rank), int(world), init_file, out_dir, backend)
    # Skip interpreter finalisation: FSDP2 keeps the gloo group alive past destroy_process_group,
    # and its worker thread can free a finished all-gather's tensors (taking the GIL) while Python
    # is being torn down, which aborts ("terminate called without an active exception"; its core dump,
    # reproduced here from the CI failure: ~AsyncAllgatherCoalescedWork -> decref_pyobject -> take_gil -> pthread_exit).
    # A torch teardown race (pytorch/pytorch#179291), not ours: the results are already saved.
    sys.stdout.flush()
    os._exit(0)
