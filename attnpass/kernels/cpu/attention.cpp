// Fused online-softmax attention for the CPU: forward and FlashAttention-2 style backward.
//
// One translation unit, compiled once per CPU capability (AVX512, AVX2, DEFAULT) by
// attnpass/kernels/cpu/__init__.py with different -m flags and CPU_CAPABILITY macros; the
// Python side picks the variant at run time from torch's own cpuid probe.  Each variant is
// its own shared library with its own op namespace (ATTNPASS_NS), so no inline function
// compiled for AVX-512 can be picked by the linker for an AVX2 caller (the COMDAT hazard of
// mixing differently-flagged translation units in one library).
//
// Layout: q [B,H,Sq,D], k [Bk,Hk,Sk,D], v [Bk,Hk,Sk,Dv], contiguous, in the compute type T
// (float for fp32/bf16/fp16 inputs, double for fp64: reduced-precision inputs are widened
// once by the caller, which costs O(S*D) memory and keeps a single fp32 GEMM path, since
// this CPU class runs bf16 GEMMs no faster than fp32 without AMX).
//
// Block matmuls go through the BLAS that libtorch_cpu exports (MKL's sgemm_/dgemm_): on
// 256x512x64 tiles it runs close to the machine's matmul peak, which a hand micro-kernel
// would have to match first.  If the symbols are absent (a torch built without MKL) a
// plain vectorisable loop GEMM takes over so the kernel still works.
//
// Memory: per thread a few [q_block x kv_block] tiles; the S_q x S_k score matrix is never
// formed.  Key blocks that are wholly masked (causal upper triangle, padding) are skipped.
//
// NaN: a NaN in q, k, v or an additive mask reaches the output of every row that attends
// it, never a silent 0 or a dropped key (semantics.attention's meaning).  Three choices keep
// it so at no cost on the hot path: an additive value is masked only when `x <= thr` holds
// (a NaN compares false, so it stays a logit); the running row maximum propagates NaN;
// and "the row has keys" is `l != 0` (a fully masked row sums to exactly 0, a NaN row to
// NaN) rather than `l > 0`, which is false for NaN.  A fully masked row still gives 0.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef ATTNPASS_NS
#define ATTNPASS_NS attnpass_cpu_default
#endif

extern "C" {
// Fortran BLAS entry points (LP64) exported by libtorch_cpu when torch bundles MKL.
// Weak: resolve to null instead of failing to load when they are not there.
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace {

using at::vec::Vectorized;

enum MaskKind : int64_t { kNoMask = 0, kBoolMask = 1, kFloatMask = 2 };

// Row-major C[m,n] = alpha * op(A)[m,k] @ op(B)[k,n] + beta * C.  op(A) = A^T when ta (A stored
// [k,m]); op(B) = B^T when tb (B stored [n,k]).  Row-major C is column-major C^T = op(B)^T op(A)^T,
// hence the swapped operands in the BLAS call.
template <typename T>
void fallback_gemm(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta,
                   T* c, int ldc) {
  std::vector<T> brow(n);
  for (int i = 0; i < m; ++i) {
    T* ci = c + (int64_t)i * ldc;
    for (int j = 0; j < n; ++j) ci[j] = beta == T(0) ? T(0) : beta * ci[j];
    for (int p = 0; p < k; ++p) {
      const T aip = alpha * (ta ? a[(int64_t)p * lda + i] : a[(int64_t)i * lda + p]);
      if (tb) {
        for (int j = 0; j < n; ++j) ci[j] += aip * b[(int64_t)j * ldb + p];
      } else {
        const T* bp = b + (int64_t)p * ldb;
        for (int j = 0; j < n; ++j) ci[j] += aip * bp[j];
      }
    }
  }
}

inline void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  if (m <= 0 || n <= 0) return;
  if (sgemm_ != nullptr && k > 0) {
    const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    sgemm_(&cb, &ca, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
  } else {
    fallback_gemm<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

inline void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  if (m <= 0 || n <= 0) return;
  if (dgemm_ != nullptr && k > 0) {
    const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    dgemm_(&cb, &ca, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
  } else {
    fallback_gemm<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

// exp for the softmax: the 20-ulp polynomial for float (what ATen's own flash kernel uses;
// well inside the 1e-5 contract), the accurate one for double (gradcheck needs it).
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

int num_threads() {
#ifdef _OPENMP
  return std::max(1, at::get_num_threads());
#else
  return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// max(a, b) that returns NaN if either is NaN (std::max(a, NaN) returns a).
template <typename T>
inline T nan_max(T a, T b) {
  return b != b ? b : std::max(a, b);
}

// Everything the per-tile logit transform needs, shared by forward and backward.
template <typename T>
struct Problem {
  int64_t B, H, Sq, Sk, D, Dv, Hk, Bk;
  const T* q;
  const T* k;
  const T* v;
  MaskKind mask_kind;
  const uint8_t* mask_b;  // bool mask, 4-D with broadcast strides
  const T* mask_f;        // float mask, same layout
  int64_t msB, msH, msQ;  // mask strides (0 on broadcast dims); last dim is contiguous
  T mask_thr;             // additive values <= this are "not attendable"
  bool causal;
  T scale;
  T softcap;  // 0: none
  const T* ss;  // [H] or null
  const T* sb;  // [H] or null

  int64_t kv_head(int64_t h) const { return Hk == H ? h : h / (H / Hk); }
  int64_t kv_batch(int64_t b) const { return Bk == B ? b : 0; }
  // Last key row i may see under the bottom-right causal mask, exclusive; may be <= 0.
  int64_t key_end(int64_t i) const { return causal ? std::min<int64_t>(Sk, i + Sk - Sq + 1) : Sk; }
  int64_t mask_offset(int64_t b, int64_t h, int64_t i) const { return b * msB + h * msH + i * msQ; }

  bool key_allowed(int64_t moff, int64_t j) const {
    if (mask_kind == kBoolMask) return mask_b[moff + j] != 0;
    if (mask_kind == kFloatMask) return !(mask_f[moff + j] <= mask_thr);  // NaN is attendable
    return true;
  }

  // True if no key in [j0, j1) is attendable for any row in [i0, i1) (causal already handled).
  bool tile_masked(int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    if (mask_kind == kNoMask) return false;
    // A mask broadcast over rows is one row: check it once, up to the widest causal limit.
    const int64_t rows = msQ == 0 ? std::min<int64_t>(i1, i0 + 1) : i1;
    for (int64_t i = i0; i < rows; ++i) {
      const int64_t moff = mask_offset(b, h, i);
      const int64_t je = std::min(j1, key_end(msQ == 0 ? i1 - 1 : i));
      if (mask_kind == kBoolMask) {
        const uint8_t* m = mask_b + moff;
        for (int64_t j = j0; j < je; ++j)
          if (m[j]) return false;
      } else {
        const T* m = mask_f + moff;
        for (int64_t j = j0; j < je; ++j)
          if (!(m[j] <= mask_thr)) return false;  // a NaN key is attendable: its tile must run
      }
    }
    return true;
  }

  // SSMax factor s_h * log(max(n_i, 1)) + b_h and log(max(n_i,1)) for rows [i0, i1).
  void ssmax_rows(int64_t b, int64_t h, int64_t i0, int64_t i1, T* factor, T* logn) const {
    const T s = ss[h], bb = sb ? sb[h] : T(0);
    int64_t prev_moff = -1, prev_end = -1, prev_n = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t je = std::max<int64_t>(0, key_end(i));
      int64_t n = je;
      if (mask_kind != kNoMask) {
        const int64_t moff = mask_offset(b, h, i);
        if (moff == prev_moff && je == prev_end) {
          n = prev_n;  // mask broadcast over rows: count once
        } else {
          n = 0;
          for (int64_t j = 0; j < je; ++j) n += key_allowed(moff, j) ? 1 : 0;
          prev_moff = moff, prev_end = je, prev_n = n;
        }
      }
      const T ln = std::log(static_cast<T>(std::max<int64_t>(n, 1)));
      logn[i - i0] = ln;
      factor[i - i0] = s * ln + bb;
    }
  }

  // In place on one row of scale*q.k: softcap, bias, SSMax factor, masking (-inf).
  // Returns the row maximum.  `th` (optional) receives tanh(raw/c) for the softcap
  // derivative and `u` (optional) the pre-factor logits for the SSMax derivative.
  T transform_row(T* z, int64_t n, int64_t b, int64_t h, int64_t i, int64_t j0, bool has_factor, T factor, T* th,
                  T* u) const {
    using Vec = Vectorized<T>;
    constexpr int64_t VL = Vec::size();
    const int64_t nv = n - n % VL;
    const T ninf = -std::numeric_limits<T>::infinity();
    if (softcap > T(0)) {
      const Vec inv(T(1) / softcap), c(softcap);
      int64_t j = 0;
      for (; j < nv; j += VL) {
        Vec t = (Vec::loadu(z + j) * inv).tanh();
        if (th) t.store(th + j);
        (t * c).store(z + j);
      }
      for (; j < n; ++j) {
        const T t = std::tanh(z[j] / softcap);
        if (th) th[j] = t;
        z[j] = softcap * t;
      }
    }
    const int64_t moff = mask_offset(b, h, i);
    if (mask_kind == kFloatMask) {
      const T* m = mask_f + moff + j0;
      const Vec thr(mask_thr), zero(T(0));
      int64_t j = 0;
      for (; j < nv; j += VL) {
        const Vec mv = Vec::loadu(m + j);
        // 0 where masked (mv <= thr), else the bias; NaN compares false and is added.
        (Vec::loadu(z + j) + Vec::blendv(mv, zero, mv <= thr)).store(z + j);
      }
      for (; j < n; ++j) z[j] += m[j] <= mask_thr ? T(0) : m[j];
    }
    if (u) std::copy(z, z + n, u);
    if (has_factor) {
      const Vec f(factor);
      int64_t j = 0;
      for (; j < nv; j += VL) (Vec::loadu(z + j) * f).store(z + j);
      for (; j < n; ++j) z[j] *= factor;
    }
    if (mask_kind == kBoolMask) {
      const uint8_t* m = mask_b + moff + j0;
      for (int64_t j = 0; j < n; ++j)
        if (!m[j]) z[j] = ninf;
    } else if (mask_kind == kFloatMask) {
      const T* m = mask_f + moff + j0;
      for (int64_t j = 0; j < n; ++j)
        if (m[j] <= mask_thr) z[j] = ninf;
    }
    const int64_t je = key_end(i) - j0;  // keys at or past je are causally hidden
    for (int64_t j = std::max<int64_t>(je, 0); j < n; ++j) z[j] = ninf;
    // at::vec::maximum propagates NaN; the scalar reductions must too (std::max drops it).
    Vec mx(ninf);
    int64_t j = 0;
    for (; j < nv; j += VL) mx = at::vec::maximum(mx, Vec::loadu(z + j));
    T buf[VL];
    mx.store(buf);
    T best = ninf;
    for (int64_t t = 0; t < VL; ++t) best = nan_max(best, buf[t]);
    for (; j < n; ++j) best = nan_max(best, z[j]);
    return best;
  }
};

// z <- exp(z - m) in place; returns the sum.  m must be finite.
template <typename T>
T exp_row(T* z, int64_t n, T m) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const int64_t nv = n - n % VL;
  const Vec mv(m);
  Vec acc(T(0));
  int64_t j = 0;
  for (; j < nv; j += VL) {
    const Vec e = vexp(Vec::loadu(z + j) - mv);
    e.store(z + j);
    acc = acc + e;
  }
  T buf[VL];
  acc.store(buf);
  T s = 0;
  for (int64_t t = 0; t < VL; ++t) s += buf[t];
  for (; j < n; ++j) {
    z[j] = std::exp(z[j] - m);
    s += z[j];
  }
  return s;
}

template <typename T>
void scale_row(T* x, int64_t n, T a) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const int64_t nv = n - n % VL;
  const Vec av(a);
  int64_t j = 0;
  for (; j < nv; j += VL) (Vec::loadu(x + j) * av).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

template <typename T>
void forward_impl(const Problem<T>& P, T* out, T* lse, int64_t qB, int64_t kvB) {
  const int64_t nqb = (P.Sq + qB - 1) / qB;
  const int64_t ntasks = P.B * P.H * nqb;
  const T ninf = -std::numeric_limits<T>::infinity();
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<T> S(qB * kvB), acc(qB * P.Dv), mrow(qB), lrow(qB), factor(qB), logn(qB);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t qb = task % nqb, bh = task / nqb, h = bh % P.H, b = bh / P.H;
      const int64_t i0 = qb * qB, i1 = std::min(P.Sq, i0 + qB), m = i1 - i0;
      const int64_t hk = P.kv_head(h), bk = P.kv_batch(b);
      const T* qp = P.q + ((b * P.H + h) * P.Sq + i0) * P.D;
      const T* kp = P.k + (bk * P.Hk + hk) * P.Sk * P.D;
      const T* vp = P.v + (bk * P.Hk + hk) * P.Sk * P.Dv;
      const bool has_factor = P.ss != nullptr;
      if (has_factor) P.ssmax_rows(b, h, i0, i1, factor.data(), logn.data());
      std::fill(mrow.begin(), mrow.begin() + m, ninf);
      std::fill(lrow.begin(), lrow.begin() + m, T(0));
      std::fill(acc.begin(), acc.begin() + m * P.Dv, T(0));
      const int64_t kend = std::max<int64_t>(0, P.key_end(i1 - 1));
      for (int64_t j0 = 0; j0 < kend; j0 += kvB) {
        const int64_t j1 = std::min(kend, j0 + kvB), n = j1 - j0;
        if (P.tile_masked(b, h, i0, i1, j0, j1)) continue;
        gemm(false, true, (int)m, (int)n, (int)P.D, P.scale, qp, (int)P.D, kp + j0 * P.D, (int)P.D, T(0), S.data(),
             (int)n);
        for (int64_t r = 0; r < m; ++r) {
          T* z = S.data() + r * n;
          const T mx = P.transform_row(z, n, b, h, i0 + r, j0, has_factor, has_factor ? factor[r] : T(1), nullptr,
                                       nullptr);
          // A NaN logit makes mnew NaN, and from there m, l and acc stay NaN for this row.
          const T mnew = nan_max(mrow[r], mx);
          if (mnew == ninf) {  // nothing attendable in this row yet
            std::fill(z, z + n, T(0));
            continue;
          }
          const T sum = exp_row(z, n, mnew);
          const T alpha = mrow[r] == ninf ? T(0) : std::exp(mrow[r] - mnew);
          if (alpha != T(1)) scale_row(acc.data() + r * P.Dv, P.Dv, alpha);
          lrow[r] = lrow[r] * alpha + sum;
          mrow[r] = mnew;
        }
        gemm(false, false, (int)m, (int)P.Dv, (int)n, T(1), S.data(), (int)n, vp + j0 * P.Dv, (int)P.Dv, T(1),
             acc.data(), (int)P.Dv);
      }
      T* op = out + ((b * P.H + h) * P.Sq + i0) * P.Dv;
      T* lp = lse + (b * P.H + h) * P.Sq + i0;
      for (int64_t r = 0; r < m; ++r) {
        if (lrow[r] != T(0)) {  // 0 only for a fully masked row; NaN rows take this branch
          const T inv = T(1) / lrow[r];
          for (int64_t d = 0; d < P.Dv; ++d) op[r * P.Dv + d] = acc[r * P.Dv + d] * inv;
          lp[r] = mrow[r] + std::log(lrow[r]);
        } else {
          std::fill(op + r * P.Dv, op + (r + 1) * P.Dv, T(0));
          lp[r] = -std::numeric_limits<T>::infinity();
        }
      }
    }
  }
}

// Backward, one (batch, head) per task so dq, dk, dv of that head are owned by one thread.
// dk_full/dv_full are per query head ([B,H,Sk,*]); GQA groups are summed by the caller.
template <typename T>
void backward_impl(const Problem<T>& P, const T* dout, const T* out, const T* lse, T* dq, T* dk, T* dv,
                   T* dmask, int64_t dmask_numel, bool dmask_per_thread, T* dfactor, T* dflogn, int64_t qB,
                   int64_t kvB) {
  const int64_t ntasks = P.B * P.H;
  const bool want_dmask = dmask != nullptr;
  const bool has_factor = P.ss != nullptr;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<T> S(qB * kvB), dP(qB * kvB), delta(qB), factor(qB), logn(qB);
    std::vector<T> th(P.softcap > T(0) ? qB * kvB : 0), U(has_factor ? qB * kvB : 0);
    T* dmask_t = want_dmask ? dmask + (dmask_per_thread ? thread_id() * dmask_numel : 0) : nullptr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t h = task % P.H, b = task / P.H;
      const int64_t hk = P.kv_head(h), bk = P.kv_batch(b);
      const T* kp = P.k + (bk * P.Hk + hk) * P.Sk * P.D;
      const T* vp = P.v + (bk * P.Hk + hk) * P.Sk * P.Dv;
      T* dkp = dk + (b * P.H + h) * P.Sk * P.D;
      T* dvp = dv + (b * P.H + h) * P.Sk * P.Dv;
      for (int64_t i0 = 0; i0 < P.Sq; i0 += qB) {
        const int64_t i1 = std::min(P.Sq, i0 + qB), m = i1 - i0;
        const int64_t row0 = (b * P.H + h) * P.Sq + i0;
        const T* qp = P.q + row0 * P.D;
        const T* dop = dout + row0 * P.Dv;
        const T* op = out + row0 * P.Dv;
        const T* lp = lse + row0;
        T* dqp = dq + row0 * P.D;
        for (int64_t r = 0; r < m; ++r) {
          T s = 0;
          for (int64_t d = 0; d < P.Dv; ++d) s += dop[r * P.Dv + d] * op[r * P.Dv + d];
          delta[r] = s;
        }
        if (has_factor) P.ssmax_rows(b, h, i0, i1, factor.data(), logn.data());
        T* dfp = has_factor ? dfactor + row0 : nullptr;
        const int64_t kend = std::max<int64_t>(0, P.key_end(i1 - 1));
        for (int64_t j0 = 0; j0 < kend; j0 += kvB) {
          const int64_t j1 = std::min(kend, j0 + kvB), n = j1 - j0;
          if (P.tile_masked(b, h, i0, i1, j0, j1)) continue;
          gemm(false, true, (int)m, (int)n, (int)P.D, P.scale, qp, (int)P.D, kp + j0 * P.D, (int)P.D, T(0), S.data(),
               (int)n);
          for (int64_t r = 0; r < m; ++r) {
            T* z = S.data() + r * n;
            P.transform_row(z, n, b, h, i0 + r, j0, has_factor, has_factor ? factor[r] : T(1),
                            th.empty() ? nullptr : th.data() + r * n, U.empty() ? nullptr : U.data() + r * n);
            const T l = lp[r];
            if (l == -std::numeric_limits<T>::infinity()) {  // fully masked row: no mass, no gradient
              std::fill(z, z + n, T(0));
            } else if (l != l) {  // a NaN row: NaN on the keys it attends, 0 on the masked ones
              for (int64_t j = 0; j < n; ++j) z[j] = z[j] == -std::numeric_limits<T>::infinity() ? T(0) : l;
            } else {
              exp_row(z, n, l);  // P = exp(z - lse); -inf logits give 0
            }
          }
          // dV_j += P^T dO_i ; dP = dO_i V_j^T
          gemm(true, false, (int)n, (int)P.Dv, (int)m, T(1), S.data(), (int)n, dop, (int)P.Dv, T(1), dvp + j0 * P.Dv,
               (int)P.Dv);
          gemm(false, true, (int)m, (int)n, (int)P.Dv, T(1), dop, (int)P.Dv, vp + j0 * P.Dv, (int)P.Dv, T(0), dP.data(),
               (int)n);
          for (int64_t r = 0; r < m; ++r) {
            T* p = S.data() + r * n;
            T* g = dP.data() + r * n;
            const T dl = delta[r];
            // dZ = P * (dP - delta), written over p.  A fully masked row has P = 0 but dP may
            // hold a NaN from V: 0 * NaN must not give that row (dq, dmask) a NaN gradient.
            if (lp[r] == -std::numeric_limits<T>::infinity()) {
              std::fill(p, p + n, T(0));
            } else {
              for (int64_t j = 0; j < n; ++j) p[j] = p[j] * (g[j] - dl);
            }
            if (has_factor) {
              const T* u = U.data() + r * n;
              T df = 0;
              for (int64_t j = 0; j < n; ++j) df += p[j] * u[j];
              dfp[r] += df;
              scale_row(p, n, factor[r]);
            }
            if (want_dmask) {
              T* dm = dmask_t + P.mask_offset(b, h, i0 + r) + j0;
              for (int64_t j = 0; j < n; ++j) dm[j] += p[j];  // masked keys carry dZ = 0 (finite dP)
            }
            if (!th.empty()) {
              const T* t = th.data() + r * n;
              for (int64_t j = 0; j < n; ++j) p[j] *= T(1) - t[j] * t[j];
            }
          }
          // dQ_i += scale dS K_j ; dK_j += scale dS^T Q_i
          gemm(false, false, (int)m, (int)P.D, (int)n, P.scale, S.data(), (int)n, kp + j0 * P.D, (int)P.D, T(1), dqp,
               (int)P.D);
          gemm(true, false, (int)n, (int)P.D, (int)m, P.scale, S.data(), (int)n, qp, (int)P.D, T(1), dkp + j0 * P.D,
               (int)P.D);
        }
        if (has_factor)
          for (int64_t r = 0; r < m; ++r) dflogn[row0 + r] = dfp[r] * logn[r];
      }
    }
  }
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& mask, int64_t mask_kind, double mask_thr, bool causal,
                        double scale, const std::optional<at::Tensor>& ss, const std::optional<at::Tensor>& sb,
                        double softcap) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attnpass cpu: q, k, v must be 4-D");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "attnpass cpu: q, k, v must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "attnpass cpu: dtype mismatch");
  Problem<T> P{};
  P.B = q.size(0), P.H = q.size(1), P.Sq = q.size(2), P.D = q.size(3);
  P.Bk = k.size(0), P.Hk = k.size(1), P.Sk = k.size(2), P.Dv = v.size(3);
  TORCH_CHECK(P.Bk == P.B || P.Bk == 1, "attnpass cpu: k/v batch must be B or 1");
  TORCH_CHECK(P.Hk > 0 && P.H % P.Hk == 0, "attnpass cpu: query heads must be a multiple of kv heads");
  TORCH_CHECK(P.Sq * std::max(P.D, P.Dv) < (int64_t)INT32_MAX && P.Sk * std::max(P.D, P.Dv) < (int64_t)INT32_MAX,
              "attnpass cpu: tensor too large for 32-bit BLAS indices");
  P.q = q.const_data_ptr<T>(), P.k = k.const_data_ptr<T>(), P.v = v.const_data_ptr<T>();
  P.mask_kind = static_cast<MaskKind>(mask_kind);
  P.mask_b = nullptr, P.mask_f = nullptr, P.msB = P.msH = P.msQ = 0;
  if (P.mask_kind != kNoMask) {
    TORCH_CHECK(mask.has_value() && mask->dim() == 4 && mask->is_contiguous() && mask->size(3) == P.Sk,
                "attnpass cpu: mask must be a contiguous 4-D tensor with S_k keys");
    const at::Tensor& mk = *mask;
    P.msQ = mk.size(2) == 1 ? 0 : P.Sk;
    P.msH = mk.size(1) == 1 ? 0 : mk.size(2) * P.Sk;
    P.msB = mk.size(0) == 1 ? 0 : mk.size(1) * mk.size(2) * P.Sk;
    if (P.mask_kind == kBoolMask) {
      TORCH_CHECK(mk.scalar_type() == at::kByte || mk.scalar_type() == at::kBool, "attnpass cpu: bool mask dtype");
      P.mask_b = static_cast<const uint8_t*>(mk.const_data_ptr());
    } else {
      TORCH_CHECK(mk.scalar_type() == q.scalar_type(), "attnpass cpu: float mask must match compute dtype");
      P.mask_f = mk.const_data_ptr<T>();
    }
  }
  P.mask_thr = static_cast<T>(mask_thr);
  P.causal = causal;
  P.scale = static_cast<T>(scale);
  P.softcap = static_cast<T>(softcap);
  P.ss = nullptr, P.sb = nullptr;
  if (ss.has_value()) {
    TORCH_CHECK(ss->numel() == P.H && ss->scalar_type() == q.scalar_type() && ss->is_contiguous(), "attnpass cpu: ssmax_s");
    P.ss = ss->const_data_ptr<T>();
    if (sb.has_value()) {
      TORCH_CHECK(sb->numel() == P.H && sb->scalar_type() == q.scalar_type() && sb->is_contiguous(), "attnpass cpu: ssmax_b");
      P.sb = sb->const_data_ptr<T>();
    }
  }
  return P;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask, int64_t mask_kind,
                                                 double mask_thr, bool causal, double scale,
                                                 const std::optional<at::Tensor>& ss,
                                                 const std::optional<at::Tensor>& sb, double softcap, int64_t q_block,
                                                 int64_t kv_block) {
  auto out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  // lse in the compute dtype: float64 callers (gradcheck) keep full precision for the backward.
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (q.scalar_type() == at::kDouble) {
    auto P = make_problem<double>(q, k, v, mask, mask_kind, mask_thr, causal, scale, ss, sb, softcap);
    forward_impl<double>(P, out.mutable_data_ptr<double>(), lse.mutable_data_ptr<double>(), q_block, kv_block);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "attnpass cpu: compute dtype must be float32 or float64");
    auto P = make_problem<float>(q, k, v, mask, mask_kind, mask_thr, causal, scale, ss, sb, softcap);
    forward_impl<float>(P, out.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(), q_block, kv_block);
  }
  return {out, lse};
}

// Returns (dq [B,H,Sq,D], dk [B,H,Sk,D], dv [B,H,Sk,Dv] per query head, dmask (mask layout or
// [threads, *mask layout] when the mask broadcasts over batch or heads; empty if not wanted),
// dfactor and dfactor*log(n), both [B,H,Sq] (empty without SSMax)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, int64_t mask_kind, double mask_thr, const at::Tensor& out,
    const at::Tensor& lse, bool causal, double scale, const std::optional<at::Tensor>& ss,
    const std::optional<at::Tensor>& sb, double softcap, bool want_dmask, int64_t q_block, int64_t kv_block) {
  TORCH_CHECK(dout.is_contiguous() && out.is_contiguous() && lse.is_contiguous(), "attnpass cpu: grads contiguous");
  TORCH_CHECK(lse.scalar_type() == q.scalar_type(), "attnpass cpu: lse must be in the compute dtype");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Sk = k.size(2), Dv = v.size(3);
  auto opts = q.options();
  auto dq = at::zeros({B, H, Sq, D}, opts);
  auto dk = at::zeros({B, H, Sk, D}, opts);
  auto dv = at::zeros({B, H, Sk, Dv}, opts);
  at::Tensor dmask = at::empty({0}, opts), dfactor = at::empty({0}, opts), dflogn = at::empty({0}, opts);
  bool per_thread = false;
  int64_t mnumel = 0;
  if (want_dmask) {
    const at::Tensor& mk = *mask;
    per_thread = (mk.size(0) == 1 && B > 1) || (mk.size(1) == 1 && H > 1);
    mnumel = mk.numel();
    std::vector<int64_t> shape = mk.sizes().vec();
    if (per_thread) shape.insert(shape.begin(), num_threads());
    dmask = at::zeros(shape, opts);
  }
  if (ss.has_value()) {
    dfactor = at::zeros({B, H, Sq}, opts);
    dflogn = at::zeros({B, H, Sq}, opts);
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto P = make_problem<T>(q, k, v, mask, mask_kind, mask_thr, causal, scale, ss, sb, softcap);
    backward_impl<T>(P, dout.const_data_ptr<T>(), out.const_data_ptr<T>(), lse.const_data_ptr<T>(),
                     dq.mutable_data_ptr<T>(), dk.mutable_data_ptr<T>(), dv.mutable_data_ptr<T>(),
                     want_dmask ? dmask.mutable_data_ptr<T>() : nullptr, mnumel, per_thread,
                     ss.has_value() ? dfactor.mutable_data_ptr<T>() : nullptr,
                     ss.has_value() ? dflogn.mutable_data_ptr<T>() : nullptr, q_block, kv_block);
  };
  if (q.scalar_type() == at::kDouble) {
    run(double{});
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "attnpass cpu: compute dtype must be float32 or float64");
    run(float{});
  }
  return {dq, dk, dv, dmask, dfactor, dflogn};
}

bool has_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// Takes a tensor only so the dispatcher has something to dispatch on.
int64_t blas_available(const at::Tensor&) { return has_blas() ? 1 : 0; }

}  // namespace

TORCH_LIBRARY(ATTNPASS_NS, m) {
  m.def("forward", &attention_fwd);
  m.def("backward", &attention_bwd);
  m.def("blas_available", &blas_available);
}
