"""The fused loop nest on all cores: query blocks as a parallel loop, lowered to OpenMP on our own runtime.

Structure: the block loop is an ``scf.forall`` and the LLVM module an ``omp.parallel`` / ``omp.wsloop``.  The
runtime (``lowering.omp``) on its own: a C program forks teams and checks that the static schedules hand out
every iteration exactly once over the asked thread count.  Numerics: the JIT at 1 and 3 threads gives the same
bits (each block is one thread's, in the same order), equal to the reference; the native library run by a C
program linked to it alone gives those bits again at any ``ATTNPASS_THREADS``.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_mlir  # noqa: F401  (required: a missing torch-mlir must fail, not skip)

import attnpass.mlir as am
from attnpass.kernels import reference
from attnpass.lowering import mlir as lowering
from attnpass.lowering import native, omp

warnings.filterwarnings("ignore")
F = torch.nn.functional


class _Sdpa(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


S = 256  # four query blocks of 64


@pytest.fixture(scope="module")
def fused() -> tuple[object, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(1, 2, S, 8, generator=g) for _ in range(3)]
    return am.rewrite(am.import_(_Sdpa(), tuple(args)), to="fused", tile=32), args


def test_query_blocks_lower_to_an_openmp_parallel_loop(fused) -> None:
    module, _ = fused
    lin = str(am.lower(module, "linalg"))
    assert "scf.forall" in lin and "tensor.parallel_insert_slice" in lin
    llvm = str(lowering.to_llvm(module))
    assert "omp.parallel" in llvm and "omp.wsloop" in llvm and "memref.alloca_scope" not in llvm
    assert lowering.uses_openmp(llvm)


def test_results_do_not_depend_on_the_thread_count(fused, monkeypatch) -> None:
    module, args = fused
    fn = am.compile(module, opt_level=0)
    got = {}
    for n in (1, 3):
        monkeypatch.setenv("ATTNPASS_THREADS", str(n))  # read by the runtime at every fork
        got[n] = fn(*args).numpy()
    np.testing.assert_array_equal(got[1], got[3])
    keep = torch.arange(S)[None, :] <= torch.arange(S)[:, None]
    want, _ = reference.attention_forward(*args, attn_mask=keep)
    np.testing.assert_allclose(got[3], want.numpy(), rtol=1e-5, atol=2e-6)


def test_bad_thread_count_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("ATTNPASS_THREADS", "many")
    with pytest.raises(Exception, match="ATTNPASS_THREADS must be a positive integer"):
        omp.default_threads()


RUNTIME_DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
void __kmpc_fork_call(void *, int32_t, void (*)(int32_t *, int32_t *, ...), ...);
void __kmpc_for_static_init_8u(void *, int32_t, int32_t, int32_t *, uint64_t *, uint64_t *, int64_t *, int64_t, int64_t);
void __kmpc_barrier(void *, int32_t);
int32_t __kmpc_global_thread_num(void *);
enum { N = 103 };
static int hits[N], owner[N], team[64];
static void body(int32_t *gtid, int32_t *btid, int *sched, int *chunk) {
  (void)btid;
  int32_t last = 0; uint64_t lo = 0, hi = N - 1; int64_t stride = 1;
  __kmpc_for_static_init_8u(NULL, *gtid, *sched, &last, &lo, &hi, &stride, 1, *chunk);
  team[__kmpc_global_thread_num(NULL)] = 1;
  for (uint64_t base = lo; base < N; base += (uint64_t)stride) {
    uint64_t top = hi < N - 1 ? hi : N - 1;
    for (uint64_t i = base; i <= top && i >= lo; ++i) { __atomic_add_fetch(&hits[i], 1, __ATOMIC_SEQ_CST); owner[i] = *gtid; }
    if (*sched == 34) break;
    lo += (uint64_t)stride; hi += (uint64_t)stride;
  }
  __kmpc_barrier(NULL, *gtid);
}
int main(int argc, char **argv) {  /* driver sched chunk: prints the team size, exits 1 unless every i ran once */
  int sched = atoi(argv[1]), chunk = atoi(argv[2]);
  __kmpc_fork_call(NULL, 2, (void (*)(int32_t *, int32_t *, ...))body, &sched, &chunk);
  int members = 0;
  for (int t = 0; t < 64; ++t) members += team[t];
  for (int i = 0; i < N; ++i) if (hits[i] != 1) return 1;
  printf("%d %d %d\n", members, owner[0], owner[N - 1]);
  return 0;
}
"""


@pytest.mark.parametrize("sched,chunk", [(34, 0), (33, 5)])
def test_runtime_schedules_every_iteration_once_over_the_team(sched: int, chunk: int, tmp_path: Path) -> None:
    (tmp_path / "rt.c").write_text(omp.SOURCE)
    (tmp_path / "drv.c").write_text(RUNTIME_DRIVER)
    exe = tmp_path / "drv"
    subprocess.run([native.compiler(), "-O1", "-o", str(exe), str(tmp_path / "drv.c"), str(tmp_path / "rt.c"), "-lpthread"],
                   check=True)
    for threads in (1, 4):
        run = subprocess.run([str(exe), str(sched), str(chunk)], capture_output=True, text=True,
                             env={"ATTNPASS_THREADS": str(threads)})
        assert run.returncode == 0, f"an iteration ran other than once with {threads} threads"
        members, first, last = map(int, run.stdout.split())
        assert members == threads
        assert (first, last) == ((0, threads - 1) if sched == 34 else (0, (102 // chunk) % threads))


C_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
int attnpass_run(void *const *inputs, void *const *outputs);
int main(int argc, char **argv) {  /* driver q.bin k.bin v.bin out.bin bytes */
  void *in[3];
  size_t bytes = strtoul(argv[5], 0, 10);
  for (int i = 0; i < 3; ++i) {
    FILE *f = fopen(argv[1 + i], "rb"); in[i] = malloc(bytes);
    if (fread(in[i], 1, bytes, f) != bytes) return 3;
    fclose(f);
  }
  void *out[1] = {malloc(bytes)};
  int rc = attnpass_run(in, out);
  FILE *f = fopen(argv[4], "wb"); fwrite(out[0], 1, bytes, f); fclose(f);
  return rc;
}
"""


def test_native_library_runs_its_parallel_loop_standalone(fused, tmp_path: Path) -> None:
    """A C program linked only to the library: same bits as the JIT at 1 and 4 threads; the runtime is inside."""
    module, args = fused
    want = am.compile(module, opt_level=0)(*args).numpy()
    so = tmp_path / "libattn.so"
    am.compile_library(module, so, opt_level=0)
    syms = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True).stdout
    assert "__kmpc_fork_call" in syms and "attnpass_set_threads" in syms
    needed = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
    assert "gomp" not in needed and "libomp" not in needed and "torch" not in needed, needed
    (tmp_path / "driver.c").write_text(C_DRIVER)
    exe = tmp_path / "driver"
    subprocess.run([native.compiler(), "-o", str(exe), str(tmp_path / "driver.c"), f"-L{tmp_path}", "-lattn",
                    f"-Wl,-rpath,{tmp_path}"], check=True)
    names = []
    for name, x in zip("qkv", args):
        x.numpy().tofile(tmp_path / f"{name}.bin")
        names.append(str(tmp_path / f"{name}.bin"))
    for threads in (1, 4):
        out = tmp_path / f"out{threads}.bin"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ATTNPASS_THREADS": str(threads)}
        run = subprocess.run([str(exe), *names, str(out), str(want.nbytes)], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        np.testing.assert_array_equal(np.fromfile(out, dtype=np.float32).reshape(want.shape), want)


def test_without_a_c_compiler_the_parallel_loop_runs_in_order(fused, monkeypatch, tmp_path: Path) -> None:
    """No cc to build the runtime: a warning, no OpenMP in the module, the same bits."""
    module, args = fused
    want = am.compile(module, opt_level=0)(*args).numpy()
    monkeypatch.setenv("ATTNPASS_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="one thread"):
        fn = am.compile(module, opt_level=0)
    assert not lowering.uses_openmp(fn.llvm_text)
    np.testing.assert_array_equal(fn(*args).numpy(), want)
