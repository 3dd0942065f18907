"""Block-tile tables for the Triton kernels and the autotuner's prune hook, per GPU architecture.

Kept apart from ``kernels.py`` (which is executed from source once per interpreter mode) so the tables
can be read, and the hook tested, without building any kernel.  Every entry and every pruning rule was
measured with ``python -m attnpass.kernels.triton.aot --table`` (ptxas for sm_90 and sm_80), and
``tests/test_kernel_triton_aot.py`` keeps it so.
"""

from __future__ import annotations

#: Block configs per kernel for Hopper: (BLOCK_M, BLOCK_N, num_warps, num_stages).  BLOCK_M is
#: the query block, BLOCK_N the key block in every kernel.  The forward and dQ kernels keep a
#: query tile resident and stream keys, so they favour tall query blocks; dK/dV keeps a key
#: tile and streams queries, so it favours wide key blocks.
#:
#: Every entry was measured with ``python -m attnpass.kernels.triton.aot --table`` (ptxas for
#: sm_90 and sm_80; ``tests/test_kernel_triton_aot.py`` keeps it so).  Removed after measuring:
#: forward 128x64x4, 128x128x4 and 64x128x4 and dQ 128x32x4 and 128x64x4 (with 4 warps the fp32
#: accumulator and the score tiles outgrow 255 registers: 24-1016 B spilled at D=64/128);
#: every dK/dV tile with 4 warps or BLOCK_M * BLOCK_N > 32 * 128 (two [BLOCK_N, D] fp32
#: accumulators plus the [BLOCK_N, BLOCK_M] score/probability tiles: 136-2864 B spilled).
HOPPER_CONFIGS: dict[str, list[tuple[int, int, int, int]]] = {
    "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 8, 3)],
    "dkdv": [(32, 128, 8, 2), (16, 128, 8, 2), (32, 64, 8, 2), (16, 64, 8, 2)],
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
}
#: Ampere (sm_8x) keeps MMA operands in registers as well (no warpgroup MMA reading shared memory),
#: so the same tiles spill there: measured for sm_80, forward 128x128 spills 8-64 B, dQ 128x64
#: 8-48 B and dQ 64x64 8-40 B with masks; dK/dV at D=128 spills 16-152 B in every pipelined tile once a mask or soft-cap
#: is compiled in, and only the unpipelined 16x64x8 (one stage) is spill-free in every variant.
AMPERE_CONFIGS: dict[str, list[tuple[int, int, int, int]]] = {
    "fwd": [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
    "dkdv": [(16, 128, 8, 2), (16, 64, 8, 2), (16, 64, 8, 1)],
    "dq": [(128, 32, 8, 3), (64, 32, 8, 3)],
}
#: Under the interpreter every config costs a full (slow) run, so there is one, small and
#: with BLOCK_M != BLOCK_N so the tests exercise the causal diagonal logic with both orders.
_INTERPRETER = {"fwd": [(32, 16, 1, 1)], "dkdv": [(16, 32, 1, 1)], "dq": [(32, 16, 1, 1)]}

def config_table(interpret: bool) -> dict[str, list[tuple[int, int, int, int]]]:
    """What the autotuner is given: both architectures' tables (the prune hook keeps the device's own)."""
    if interpret:
        return _INTERPRETER
    return {k: HOPPER_CONFIGS[k] + [c for c in AMPERE_CONFIGS[k] if c not in HOPPER_CONFIGS[k]] for k in HOPPER_CONFIGS}

#: Shared memory kept free for layout-conversion and reduction scratch, beyond the staged and
#: resident tiles the prune hook counts (measured: 1-4 KB in every sm_90/sm_80 build).
_SCRATCH_RESERVE = 4 * 1024


def _device_smem_limit() -> int:
    """Opt-in shared memory per block of the current CUDA device; Hopper's 227 KB where there is none."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin)
    return 227 * 1024


def _device_arch() -> int:
    """Compute capability of the current CUDA device as ``10 * major + minor``; 90 where there is none."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor
    return 90


def _as_tuple(c) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _elem_size(named_args, name: str, default: int) -> int:
    x = named_args.get(name)
    return x.element_size() if hasattr(x, "element_size") else default


def prune(configs, named_args, kernel: str = "fwd", smem_limit: int | None = None, arch: int | None = None,
          interpret: bool = False, **kwargs):
    """Drop tiles that cannot fit the target for this call's shape, and tiles far taller than the problem.

    ``kernel`` says which operand is streamed: keys (forward, dQ: K and V per stage) or queries
    (dK/dV: Q and dO per stage); the estimate matched ptxas within 1-4 KB where it binds.  A full float mask adds a
    [BLOCK_M, BLOCK_N] tile of its own dtype per stage; a row-broadcast mask only BLOCK_N values.  The launcher
    narrows a wider mask (fp32 with bf16/fp16 inputs) to the inputs' dtype unless it requires grad, so the
    fp32-mask rules below bind only for a mask that needs a gradient.
    ``smem_limit`` and ``arch`` are the target's (the current device's when None; the AOT check
    passes its target's): compiled configs are first narrowed to that architecture's table.
    """
    arch = _device_arch() if arch is None else arch
    if not interpret:
        own = HOPPER_CONFIGS[kernel] if arch >= 90 else AMPERE_CONFIGS[kernel]
        configs = [c for c in configs if _as_tuple(c) in own] or configs
    budget = (_device_smem_limit() if smem_limit is None else smem_limit) - _SCRATCH_RESERVE
    d_pad = max(kwargs.get("D_PAD", 64), kwargs.get("DV_PAD", 64))
    bucket = kwargs.get("S_BUCKET", named_args.get("S_BUCKET", 1 << 30))
    in_bytes = _elem_size(named_args, "Q", 2)
    mask_tile = kwargs.get("MASK_KIND", 0) != 0 and not kwargs.get("MASK_ROWB", False)
    mask_bytes = _elem_size(named_args, "Mask", 4) if mask_tile else 0
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if d_pad > 128 and (bm * bn > 64 * 64 or c.num_stages > 2):
            continue
        if d_pad == 128 and bm == 128 and bn == 128 and c.num_stages > 2:
            continue
        # Staged per pipeline stage: two streamed [rows, D] tiles and the mask tile; resident for the
        # whole program: Q (forward), Q and dO (dQ), K and V (dK/dV).
        streamed, resident = (bm, bn) if kernel == "dkdv" else (bn, bm)
        n_resident = 1 if kernel == "fwd" else 2
        staged = c.num_stages * (2 * streamed * d_pad * in_bytes + bm * bn * mask_bytes)
        if staged + n_resident * resident * d_pad * in_bytes > budget:
            continue
        # Measured (sm_90, D=128, key-major dK/dV): 16x128 spills nothing in any variant; 32x64 spills
        # 56-104 B once a float mask meets SSMax; 32x128 and 64x64 spill 16-400 B with any mask.
        if arch >= 90 and kernel == "dkdv" and d_pad >= 128 and bm > 16 and (kwargs.get("MASK_KIND", 0) or bm * bn > 32 * 64):
            continue
        # Only a mask requiring grad reaches the kernels as fp32 (see _narrowed_mask in the launcher).
        # Measured (sm_90, every variant): a full fp32 mask tile spills 32-104 B in dK/dV above 32x64
        # (16x64 at D=128) and 88 B in a 128x128 forward; dQ 64x64x4 at D=128 spills 56 B when causal.
        if arch >= 90 and mask_bytes >= 4 and bm * bn > {"dkdv": 16 * 64 if d_pad >= 128 else 32 * 64}.get(kernel, 128 * 64):
            continue
        if arch >= 90 and kernel == "dq" and d_pad >= 128 and c.num_warps == 4 and bm * bn >= 64 * 64:
            continue
        # Measured (sm_80): the one-stage dK/dV tile is for D=128 only, where every pipelined one spills;
        # the 128-row forward spills 8 B at D=128 once a mask is compiled in.
        if arch < 90 and kernel == "dkdv" and (c.num_stages == 1) != (d_pad >= 128):
            continue
        if arch < 90 and kernel == "fwd" and bm == 128 and d_pad >= 128:
            continue
        if bm > 2 * bucket and bm > 16:
            continue
        kept.append(c)
    if not kept:  # keep the smallest tile rather than fail: slow beats out-of-resources
        kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
    return kept


KEY = ["S_BUCKET", "D_PAD", "DV_PAD", "CAUSAL", "MASK_KIND", "MASK_ROWB", "SSMAX", "SOFTCAP"]
