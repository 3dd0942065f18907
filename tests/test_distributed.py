"""SSMax models train under torch.distributed (gloo, CPU, 2 spawned processes on loopback).

One spawn runs every (model, engine) job of ``examples/distributed_ssmax.py`` for two SGD steps:
fx ``to_ssmax``, the compile backend and HF ``to_ssmax``, each under DDP and FSDP2 (``fully_shard``).
Each is compared with a single-process run on the same global batch.
"""

from __future__ import annotations

import pytest
import torch

from attnpass.lowering import backend
from examples import distributed_ssmax as D
from tests import attention_modules as M

JOBS = [(mode, engine) for mode in D.MODES for engine in D.ENGINES]


@pytest.fixture(scope="module")
def table() -> dict:
    return D.main(["--steps", "2"])


def test_every_job_ran(table) -> None:
    assert sorted(table) == sorted(JOBS)


@pytest.mark.parametrize("job", JOBS, ids=lambda j: f"{j[0]}-{j[1]}")
def test_losses_equal_the_single_process_run(table, job) -> None:
    row = table[job]
    assert len(row["dist_losses"]) == len(row["single_losses"]) == 2
    # the second step's loss depends on the first update: equal losses mean equal training, not just equal init
    assert row["max_loss_diff"] < 2e-5, (row["single_losses"], row["dist_losses"])
    assert row["single_losses"][0] != row["single_losses"][1]


@pytest.mark.parametrize("job", JOBS, ids=lambda j: f"{j[0]}-{j[1]}")
def test_s_gradients_are_synchronised(table, job) -> None:
    row = table[job]
    assert row["s_sites"] == 2, "both attention layers carry SSMax parameters"
    assert row["s_grad_nonzero"], "s must receive a gradient, or the comparison below proves nothing"
    assert row["s_grad_ranks_equal"], "the ranks hold different s gradients after backward"
    assert row["max_s_grad_diff"] < 1e-8, "the averaged s gradient differs from the global batch's"
    assert row["max_s_final_diff"] < 1e-6


@pytest.mark.parametrize("job", JOBS, ids=lambda j: f"{j[0]}-{j[1]}")
def test_distributed_checkpoint_round_trips_s(table, job) -> None:
    row = table[job]
    assert row["checkpoint_s_changed"], "loading must change a fresh model's s (else the check below is vacuous)"
    assert row["checkpoint_s_restored"], "the trained s did not come back from torch.distributed.checkpoint"


def test_bad_arguments_are_usage_errors(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        D.main(["--modes", "fx,onnx"])
    assert exc.value.code == 2
    assert "onnx" in capsys.readouterr().err


def test_compile_backend_hands_out_the_s_it_created() -> None:
    """The compiled graph owns the backend's s: ``ssmax_parameters()`` is how training reaches it (the model's
    own ``parameters()`` do not list it), and ``clear_ssmax_parameters()`` forgets it with the compiled graphs."""
    torch._dynamo.reset()
    backend.clear_ssmax_parameters()
    module = M.CausalTril().eval()
    q, k, v = (torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    compiled = torch.compile(module, backend="attnpass", options={"rewrite": "ssmax", "s": 0.3, "inner": "eager"})
    compiled(q, k, v).square().sum().backward()
    params = backend.ssmax_parameters()
    assert len(params) == 1 and params[0].shape == (2,)
    assert torch.equal(params[0].detach(), torch.full((2,), 0.3)) and params[0].grad is not None
    assert not any(p is params[0] for p in module.parameters())
    torch._dynamo.reset()
    backend.clear_ssmax_parameters()
    assert backend.ssmax_parameters() == []
