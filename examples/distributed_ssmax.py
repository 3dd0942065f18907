"""An SSMax model trains under torch.distributed: DDP and FSDP2 (``fully_shard``), gloo on CPU, 2 processes.

Three ways to get the SSMax model, each trained the same way:
  fx       ``attnpass.to_ssmax(TinyGPT, example inputs)``: a GraphModule that owns ``attnpass_ssmax.s_<i>``;
  compile  ``torch.compile(wrapped TinyGPT, backend="attnpass", options={"rewrite": "ssmax", "inner": "eager"})``;
  hf       a tiny Llama built from its config class, converted by ``attnpass.hf.to_ssmax``.
Each is trained for a few SGD steps on 2 ranks (each rank gets half of the global batch) and once in a
single process on the whole global batch; the global losses must agree, the SSMax ``s`` gradients
must be the same on both ranks and equal the single-process ones, and a distributed checkpoint
(``torch.distributed.checkpoint``) must bring the trained ``s`` back into a freshly built model.

The compile backend creates its ``s`` inside the graph it compiles, so the model does not own it:
DDP/FSDP cannot see it and ``model.parameters()`` does not list it.  This script reaches it through
``attnpass.lowering.backend.ssmax_parameters()``, trains it and averages its gradient across ranks
itself (what DDP does for the model's own parameters), and checkpoints it beside the model.

Run:  python examples/distributed_ssmax.py [--modes fx,compile,hf] [--engines ddp,fsdp] [--steps 3]
Loopback only (127.0.0.1, a free port); no GPU needed.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

MODES = ("fx", "compile", "hf")
ENGINES = ("ddp", "fsdp")
VOCAB, SEQ, GLOBAL_BATCH, WORLD = 64, 16, 4, 2
LR = 0.5


# ------------------------------------------------------------------ data and models

def global_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed token batches; rows 1 and 3 are right-padded by different amounts, so ``n`` differs per row."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
        mask = torch.ones(GLOBAL_BATCH, SEQ, dtype=torch.long)
        mask[1, SEQ - 3:] = 0
        mask[3, SEQ - 6:] = 0
        out.append((ids, mask))
    return out


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of the global batch (what a DistributedSampler would give)."""
    per = GLOBAL_BATCH // world
    return tuple(t[rank * per:(rank + 1) * per] for t in batch)


def _tiny_gpt() -> nn.Module:
    from attnpass.tiny import TinyGPT

    torch.manual_seed(0)
    return TinyGPT(vocab=VOCAB, dim=32, layers=2, heads=4, kv_heads=2, max_len=SEQ)


def _tiny_llama() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                   attn_implementation="eager", use_cache=False, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def build(mode: str, batch: int) -> nn.Module:
    """The SSMax model for ``mode`` before any wrapping; fx needs example inputs of this process's batch size."""
    import attnpass
    import attnpass.hf

    if mode == "fx":
        ids, mask = global_batches(1)[0]
        return attnpass.to_ssmax(_tiny_gpt(), (ids[:batch], mask[:batch]), train_len=SEQ)
    if mode == "compile":
        return _tiny_gpt()  # the backend rewrites it when the wrapped model is compiled
    if mode == "hf":
        return attnpass.hf.to_ssmax(_tiny_llama(), train_len=SEQ)
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def compiled(model: nn.Module) -> Callable:
    """The attnpass compile backend with SSMax; ``inner="eager"`` runs the rewritten graph as it is."""
    import attnpass  # noqa: F401  (registers the backend)

    return torch.compile(model, backend="attnpass",
                         options={"rewrite": "ssmax", "train_len": SEQ, "inner": "eager"})


def loss_of(mode: str, model: Callable, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over every position, so equal-sized shards average to the global loss."""
    logits = model(input_ids=ids, attention_mask=mask).logits if mode == "hf" else model(ids, mask)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


# ------------------------------------------------------------------ training

@dataclass
class Run:
    """What one training run measured: global loss per step, ``s`` gradient of the first step, final ``s``."""

    losses: list[float] = field(default_factory=list)
    s_grad: dict[str, torch.Tensor] = field(default_factory=dict)
    s_final: dict[str, torch.Tensor] = field(default_factory=dict)
    s_grad_ranks_equal: bool = True
    checkpoint_s_restored: bool = False
    checkpoint_s_changed: bool = False


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly FSDP-sharded) DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _ssmax_named(model: nn.Module, mode: str) -> dict[str, nn.Parameter]:
    """The SSMax parameters, by a name that is the same wrapped or not (DDP adds ``module.``)."""
    if mode == "compile":
        from attnpass.lowering import backend

        return {f"compiled.{i}": p for i, p in enumerate(backend.ssmax_parameters())}
    return {n.removeprefix("module."): p for n, p in model.named_parameters() if "ssmax" in n}


def _wrap(model: nn.Module, engine: str | None) -> nn.Module:
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        return fully_shard(model)
    return model


def train(mode: str, engine: str | None, steps: int, rank: int = 0, world: int = 1) -> tuple[Run, nn.Module]:
    """``steps`` SGD steps; ``engine=None`` is the single-process run on the whole global batch."""
    from attnpass.lowering import backend

    torch._dynamo.reset()
    backend.clear_ssmax_parameters()
    model = _wrap(build(mode, GLOBAL_BATCH // world), engine)
    fn = compiled(model) if mode == "compile" else model
    run = Run()
    # before the first forward: FSDP2 swaps in unsharded tensors while a step runs
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step, batch in enumerate(global_batches(steps)):
        ids, mask = shard(batch, rank, world) if engine else batch
        loss = loss_of(mode, fn, ids, mask)
        if step == 0 and mode == "compile":  # the compile backend's s exists only after the first forward
            opt.add_param_group({"params": list(_ssmax_named(model, mode).values())})
        loss.backward()
        s_params = _ssmax_named(model, mode)
        if mode == "compile" and engine:
            for p in s_params.values():  # the graph owns these: average them as DDP/FSDP do the model's
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        if step == 0:
            run.s_grad = {n: _full(p.grad).detach().clone() for n, p in s_params.items()}
            if engine:
                run.s_grad_ranks_equal = _same_on_every_rank(run.s_grad, world)
        opt.step()
        opt.zero_grad()
        logged = loss.detach().clone()
        if engine:
            dist.all_reduce(logged, op=dist.ReduceOp.AVG)
        run.losses.append(float(logged))
    run.s_final = {n: _full(p).detach().clone() for n, p in _ssmax_named(model, mode).items()}
    return run, model


def _same_on_every_rank(tensors: dict[str, torch.Tensor], world: int) -> bool:
    flat = torch.cat([t.reshape(-1) for _, t in sorted(tensors.items())])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def checkpoint_round_trip(mode: str, engine: str, model: nn.Module, run: Run, folder: str, world: int) -> None:
    """Save with DCP, load into a freshly built (untrained) model of the same shape, compare ``s``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    if mode == "compile":
        state["ssmax"] = {n: p.detach() for n, p in _ssmax_named(model, mode).items()}
    dcp.save(state, checkpoint_id=folder)
    fresh = _wrap(build(mode, GLOBAL_BATCH // world), engine)
    target = {"model": get_model_state_dict(fresh)}
    if mode == "compile":
        target["ssmax"] = {n: torch.zeros_like(t) for n, t in state["ssmax"].items()}
    before = _fresh_s(fresh, mode, target)
    dcp.load(target, checkpoint_id=folder)
    set_model_state_dict(fresh, target["model"])
    after = _fresh_s(fresh, mode, target)
    run.checkpoint_s_restored = bool(after) and all(torch.equal(after[n], run.s_final[n]) for n in run.s_final)
    run.checkpoint_s_changed = any(not torch.equal(before[n], after[n]) for n in after)


def _fresh_s(model: nn.Module, mode: str, target: dict) -> dict[str, torch.Tensor]:
    if mode == "compile":
        return {n: t.clone() for n, t in target["ssmax"].items()}
    return {n.removeprefix("module."): _full(p).detach().clone() for n, p in model.named_parameters() if "ssmax" in n}


# ------------------------------------------------------------------ processes

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, str]], steps: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for mode, engine in jobs:
            run, model = train(mode, engine, steps, rank, world)
            checkpoint_round_trip(mode, engine, model, run, os.path.join(folder, f"ckpt_{mode}_{engine}"), world)
            results[(mode, engine)] = run
            dist.barrier()
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def distributed(jobs: list[tuple[str, str]], steps: int) -> dict[tuple[str, str], list[Run]]:
    """Every (mode, engine) job in one spawn of ``WORLD`` processes; each rank's ``Run`` per job."""
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory(prefix="attnpass_dist_") as folder:
        mp.spawn(_worker, args=(WORLD, _free_port(), jobs, steps, folder), nprocs=WORLD, join=True)
        per_rank = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {job: [ranks[job] for ranks in per_rank] for job in jobs}


def compare(single: Run, ranks: list[Run]) -> dict[str, float | bool]:
    """How far the distributed run is from the single-process one (losses, ``s`` gradients, final ``s``)."""
    r0 = ranks[0]
    loss_diff = max(abs(a - b) for a, b in zip(single.losses, r0.losses))
    grad_diff = max((single.s_grad[n] - r0.s_grad[n]).abs().max().item() for n in single.s_grad)
    final_diff = max((single.s_final[n] - r0.s_final[n]).abs().max().item() for n in single.s_final)
    return {"max_loss_diff": loss_diff, "max_s_grad_diff": grad_diff, "max_s_final_diff": final_diff,
            "s_grad_nonzero": all(g.abs().sum() > 0 for g in single.s_grad.values()),
            "s_grad_ranks_equal": all(r.s_grad_ranks_equal for r in ranks),
            "s_sites": len(single.s_grad),
            "checkpoint_s_restored": all(r.checkpoint_s_restored for r in ranks),
            "checkpoint_s_changed": all(r.checkpoint_s_changed for r in ranks)}


def main(argv: list[str] | None = None) -> dict[tuple[str, str], dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {','.join(ENGINES)}")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    modes, engines = args.modes.split(","), args.engines.split(",")
    bad = sorted(set(modes) - set(MODES)) + sorted(set(engines) - set(ENGINES))
    if bad or args.steps < 1:
        p.error(f"unknown modes/engines {bad}" if bad else "--steps must be >= 1")
    jobs = [(m, e) for m in modes for e in engines]
    torch.set_num_threads(1)
    singles = {m: train(m, None, args.steps)[0] for m in modes}
    ranks = distributed(jobs, args.steps)
    table = {}
    print(f"{'mode':8} {'engine':6} {'single-process losses':>30} {'2-rank losses':>30} {'max |dloss|':>11} "
          f"{'max |ds grad|':>13} {'s grads equal':>13} {'DCP s':>6}")
    for mode, engine in jobs:
        single = singles[mode]
        row = compare(single, ranks[(mode, engine)])
        table[(mode, engine)] = {**row, "single_losses": single.losses, "dist_losses": ranks[(mode, engine)][0].losses}
        fmt = " ".join(f"{x:.6f}" for x in single.losses)
        fmt_d = " ".join(f"{x:.6f}" for x in ranks[(mode, engine)][0].losses)
        print(f"{mode:8} {engine:6} {fmt:>30} {fmt_d:>30} {row['max_loss_diff']:11.2e} {row['max_s_grad_diff']:13.2e} "
              f"{str(row['s_grad_ranks_equal']):>13} {'ok' if row['checkpoint_s_restored'] else 'LOST':>6}")
    s0 = 1 / math.log(SEQ)
    print(f"s starts at 1/log({SEQ}) = {s0:.4f}; SGD lr {LR}, {args.steps} steps, global batch {GLOBAL_BATCH}, {WORLD} ranks")
    return table


if __name__ == "__main__":
    main()
