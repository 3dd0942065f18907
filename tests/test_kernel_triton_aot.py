"""Ahead-of-time compiles of the Triton kernels for Hopper (sm_90) and Ampere (sm_80), on the CPU.

A lent GPU gives about 15 minutes, so a kernel that spills registers or needs more shared
memory than the chip has is caught here, without one: every kernel x every config the
autotuner may pick x representative variants is compiled with the wheel's ptxas and must
compile, fit the target's shared memory and spill nothing.

By default each (kernel, head dim, candidate config) is compiled once with a rotating variant
(see ``aot.sample``); ``ATTNPASS_AOT_FULL=1`` compiles every variant with every candidate config.
Nothing here skips: a missing ptxas or cuobjdump is a failure, since the check is the point.
"""

from __future__ import annotations

import os

import pytest

from attnpass.kernels.triton import aot

FULL = os.environ.get("ATTNPASS_AOT_FULL", "0") == "1"


def test_wheel_ships_the_cuda_tools() -> None:
    """ptxas and cuobjdump come with Triton's wheel; without them there is no AOT check at all."""
    assert aot.tool_path("ptxas").is_file()
    assert aot.tool_path("cuobjdump").is_file()


def _builds(arch: int) -> list[tuple[str, tuple[int, int, int, int], aot.Variant]]:
    vs = aot.variants()
    out = []
    for kernel in aot.TUNED:
        if FULL:
            pairs = [(c, v) for v in vs for c in aot.candidate_configs(v, kernel, arch)]
        else:
            pairs = aot.sample(vs, kernel, arch)
        out += [(kernel, c, v) for c, v in pairs]
    return out


@pytest.mark.parametrize("arch", [90, 80])
def test_every_candidate_config_compiles_and_fits(arch: int) -> None:
    """Compiles, shared memory within the target's limit, zero spills, for every config the autotuner may choose."""
    builds = _builds(arch)
    results = [aot.compile_one(kernel, c, v, arch) for kernel, c, v in builds]
    bad = [f"{r.kernel} D={r.variant.d} {r.config} {r.variant.dtype} {r.variant.name}: shared {r.shared} "
           f"(limit {aot.SHARED_LIMIT[arch]}), {r.regs} regs, {r.spills} B spilled" for r in results if not r.fits]
    assert not bad, f"sm_{arch}: {len(bad)} of {len(results)} builds do not fit:\n" + "\n".join(bad)
    if arch == 90:  # Hopper's warpgroup MMA, or the kernels leave most of an H100/H200 idle
        assert all(r.wgmma for r in results), [r for r in results if not r.wgmma]


def test_sample_covers_every_kernel_dim_and_config() -> None:
    """The default (sampled) run still compiles each candidate config of each kernel at each head dim."""
    vs = aot.variants()
    for kernel in aot.TUNED:
        want = {(v.d, c) for v in vs for c in aot.candidate_configs(v, kernel, 90)}
        got = {(v.d, c) for c, v in aot.sample(vs, kernel, 90)}
        assert got == want, kernel


def test_checker_reports_spills_and_oversized_tiles() -> None:
    """The check can fail: a dK/dV tile far too big for the register file (and a forward tile too
    big for shared memory) are reported as such, so a zero above means zero."""
    big = aot.compile_one("dkdv", (128, 128, 4, 2), aot.Variant("bf16", 128), 90)
    assert big.spills > 0 and not big.fits
    huge = aot.compile_one("fwd", (256, 128, 8, 4), aot.Variant("bf16", 128, mask="float"), 90)
    assert huge.shared > aot.SHARED_LIMIT[90] and not huge.fits


def test_padding_mask_costs_a_vector_not_a_tile() -> None:
    """A [B, 1, 1, S_k] mask is staged as BLOCK_N values per key block: it needs less shared memory
    than a full [B, H, S_q, S_k] mask of the same dtype, by about (BLOCK_M - 1) * BLOCK_N per stage."""
    cfg = (128, 64, 8, 3)
    pad = aot.compile_one("fwd", cfg, aot.Variant("bf16", 64, mask="padding"), 90)
    full = aot.compile_one("fwd", cfg, aot.Variant("bf16", 64, mask="float"), 90)
    plain = aot.compile_one("fwd", cfg, aot.Variant("bf16", 64), 90)
    assert pad.shared < full.shared
    assert pad.shared - plain.shared <= 4 * 64 * 2 * cfg[3]  # at most a few BLOCK_N-sized buffers per stage


def test_fp32_mask_costs_what_a_bf16_mask_costs() -> None:
    """An fp32 mask with bf16 inputs is narrowed once by the launcher: the kernels stage bf16 tiles, so shared
    memory, registers and the configs the autotuner may pick equal those of a bf16 mask; a mask that requires
    grad still reaches the kernels as fp32 and costs more (it is what the prune hook's fp32 rules are for)."""
    cfg = (128, 64, 8, 3)
    f32 = aot.compile_one("fwd", cfg, aot.Variant("bf16", 64, causal=True, mask="float32"), 90)
    bf16 = aot.compile_one("fwd", cfg, aot.Variant("bf16", 64, causal=True, mask="float"), 90)
    grad = aot.compile_one("fwd", cfg, aot.Variant("bf16", 64, causal=True, mask="float32-grad"), 90)
    assert (f32.shared, f32.regs, f32.spills) == (bf16.shared, bf16.regs, bf16.spills)
    assert grad.shared >= bf16.shared + cfg[0] * cfg[1] * 2 * (cfg[3] - 1)  # an fp32 tile is 2 bytes wider per entry
    for kernel in aot.TUNED:
        for d in (64, 128):
            same = aot.candidate_configs(aot.Variant("bf16", d, causal=True, mask="float32"), kernel, 90)
            assert same == aot.candidate_configs(aot.Variant("bf16", d, causal=True, mask="float"), kernel, 90)
