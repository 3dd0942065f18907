"""The CPU kernel under concurrency: several Python threads calling the op, two processes building it.

Serving code calls attention from thread pools, and test runners (pytest-xdist) or parallel
jobs build the extension at the same moment.  Both must give the answers a lone,
single-threaded caller gets: no shared scratch in the kernel, no half-written library.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import attnpass
from attnpass import kernels
from attnpass.kernels import cpu

REPO = Path(__file__).resolve().parents[1]


def _case(i: int) -> dict:
    """A different problem per index: shapes, masks, causal, GQA, SSMax and softcap all vary."""
    g = torch.Generator().manual_seed(100 + i)
    b, h, hk = 1 + i % 2, 4, (4, 2, 1)[i % 3]
    s_q, s_k, d = 40 + 23 * i, 90 + 31 * i, (8, 16, 32)[i % 3]
    q = torch.randn(b, h, s_q, d, generator=g)
    k = torch.randn(b, hk, s_k, d, generator=g)
    v = torch.randn(b, hk, s_k, d, generator=g)
    mask = None
    if i % 4 == 1:
        mask = torch.rand(b, 1, s_q, s_k, generator=g) > 0.3
    elif i % 4 == 2:
        mask = torch.randn(1, h, s_q, s_k, generator=g)
        mask[mask < -1.0] = float("-inf")
    return dict(
        q=q, k=k, v=v, attn_mask=mask, is_causal=i % 2 == 0,
        ssmax_s=torch.linspace(0.3, 0.5, h) if i % 3 != 2 else None,
        softcap=3.0 if i % 5 == 0 else None, enable_gqa=hk != h,
        grad_out=torch.randn(b, h, s_q, d, generator=g),
    )


def _run(case: dict) -> list[torch.Tensor]:
    """Forward and backward through the public op: the output and the gradients of q, k, v."""
    leaves = {n: case[n].clone().requires_grad_() for n in ("q", "k", "v")}
    out = attnpass.attention(
        leaves["q"], leaves["k"], leaves["v"], case["attn_mask"], case["is_causal"], None, case["ssmax_s"], None,
        case["softcap"], case["enable_gqa"],
    )
    grads = torch.autograd.grad(out, list(leaves.values()), case["grad_out"])
    return [out.detach(), *grads]


def test_concurrent_calls_match_single_threaded():
    assert cpu.load() is not None, "the C++ CPU kernel did not build (see the warning)"
    assert kernels.active_backend("cpu") == "cpu"
    cases = [_case(i) for i in range(8)]
    want = [_run(c) for c in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):  # several rounds, so calls overlap in different pairings
            got = list(pool.map(_run, cases))
            for g_case, w_case in zip(got, want):
                for g, w in zip(g_case, w_case):
                    # Not bitwise: a worker thread may get another OpenMP team size, and the
                    # backward's per-thread mask-gradient slices then sum in another order.
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


_BUILD_AND_CHECK = textwrap.dedent(
    """
    import threading, torch, warnings
    warnings.simplefilter("error")  # a failed build warns and falls back: make that fail here
    from attnpass.kernels import cpu, reference

    got = []
    threads = [threading.Thread(target=lambda: got.append(cpu.load("DEFAULT"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] is not None and got[0] is got[1], got
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=g) for _ in range(3))
    out, lse = got[0].attention_forward(q, k, v, None, True, None, None, None, None, False)
    want, want_lse = reference.attention_forward(q, k, v, None, True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=5e-6)
    print("ok", got[0].capability)
    """
)


def test_two_processes_build_at_once(tmp_path):
    """Two cold processes build the same library in one fresh cache: the file lock makes one
    build and the other wait and load it; both must end with a working kernel.

    Only the DEFAULT capability is built (one ~20 s compile, and it builds on any CPU); in
    each process two threads ask for it at once, which covers the in-process lock as well.
    """
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD_AND_CHECK], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]
        assert out.strip() == "ok DEFAULT", (out, err[-4000:])
    builds = [p.name for p in (tmp_path / "ext").rglob("attnpass_cpu_default_*") if p.is_dir()]
    assert len(builds) == 1, builds  # one library, shared, not one per process
