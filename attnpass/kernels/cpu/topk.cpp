// Softmax followed by top-k in one read of the input (Milakov & Gimelshein, "Online normalizer
// calculation for softmax", 2018, algorithm 4), forward and backward, for the CPU.
//
// Compiled once per CPU capability like attention.cpp (attnpass/kernels/cpu/__init__.py), each
// variant its own library and op namespace (ATTNPASS_NS).
//
// Layout: x [rows, n] contiguous, float / bfloat16 / half; all arithmetic in float.  Rows run in
// parallel (at::parallel_for).  Each row is read from memory once, in blocks that fit L1.  Per block
// (block_pass), one vector loop does three things per vector: widen bf16/fp16 to float V lanes at a
// time (into a per-thread buffer), the running block maximum, and the top-k filter (one compare against
// the k-th value; the rare lanes above it enter the buffer).  Then, from L1, the running maximum m and
// normaliser s: s is rescaled by exp(m_old - m_new) only when the maximum grows, then
// s += sum exp(x - m) (vectorised exp), which also prefetches the row's next block so that its read overlaps
// this arithmetic.  The running top-k is a sorted buffer of (value, index),
// k <= 64; an entry finds its place with vector compares and moves the tail once.  A row's first block
// fills the buffer with its first k entries and scans the rest of the block against the k-th.
// The outputs are p_j = exp(x_j - lse) with lse = m + log(s) (renormalised: exp(x_j - x_top) over
// the sum of the k of them), written for k entries per row only.
//
// Router rows (n <= 1024, k <= 8, at least one vector's worth of rows) take another path,
// forward_tile: one row per vector lane, so that the per-row costs above (horizontal reductions,
// scalar exp and log, mispredicted inserts) are paid once per Vec::size() rows; see its comment.
//
// Order and ties, matching attnpass.kernels.reference.softmax_topk: the buffer is ordered by value,
// descending; an element enters only if it is strictly greater than the k-th, and is placed after
// every equal value already there, so among equal values the lower index wins (torch.topk's own
// order among ties is unspecified).  NaN ranks above every number (as in torch.topk), so a row
// holding NaN selects its NaNs first; its normaliser is NaN and so are its probabilities, which is
// what softmax gives.  +inf: lse is +inf, so p is NaN at the +inf entries and 0 elsewhere (softmax's
// answer); an all -inf row gives NaN (softmax's answer too).
//
// Backward: dL/dx from dL/dp.  Without renormalisation every x_i moves the normaliser:
// dx_i = [i selected] g_i p_i - softmax(x)_i * sum_j g_j p_j; lse is recomputed with the same online
// pass (the op keeps only (probs, indices) as outputs), then one pass writes dx.  With it, only the
// selected logits matter: dx = w (g - sum g w) there and 0 elsewhere.
//
// topk_op.h makes these kernels attnpass::softmax_topk's own CPU kernels, with no Python on the call path.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifndef ATTNPASS_NS
#define ATTNPASS_NS attnpass_topk_default
#endif

namespace {

using at::vec::Vectorized;
using Vec = Vectorized<float>;

constexpr int64_t kBlock = 2048;  // floats: 8 KiB, read up to three times from L1
constexpr int64_t kMaxK = 64;
// select_small's domain: its cost is k passes over the row, the running buffer's k log(n/k) inserts
constexpr int64_t kSmallN = 512;
constexpr int kSmallK = 16;
constexpr unsigned kLanes = (1u << Vec::size()) - 1u;

// NaN ranks above every number (torch.topk's order).
inline bool greater(float a, float b) { return (a != a && b == b) || a > b; }

// max(a, b) that returns NaN if either is NaN.
inline float nan_max(float a, float b) { return (a != a || b != b) ? std::numeric_limits<float>::quiet_NaN() : std::max(a, b); }

// The last, partial vector of a block with the missing lanes set to `fill` (one masked load, no scalar tail).
inline Vec load_tail(const float* x, int64_t rem, float fill) { return Vec::set(Vec(fill), Vec::loadu(x, rem), rem); }

float block_max(const float* x, int64_t len) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  Vec vm(ninf);
  int64_t j = 0;
  for (; j + Vec::size() <= len; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + j));
  if (j < len) vm = at::vec::maximum(vm, load_tail(x + j, len - j, ninf));
  // shuffle-tree reduction; at::vec::maximum propagates NaN
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
}

// sum_j exp(x_j - m), vectorised; m finite or NaN.  While it computes, the next `ahead` bytes of the input
// from `next` are requested a cache line per vector, so that the next block's read overlaps this arithmetic
// instead of waiting on memory after it (the input is read once: there is no other reuse to hide it behind).
float block_sum_exp(const float* x, int64_t len, float m, const char* next = nullptr, int64_t ahead = 0) {
  int64_t j = 0;
  const Vec vm(m);
  Vec acc(0.f);
  for (int64_t line = 0; j + Vec::size() <= len; j += Vec::size(), line += 64) {
    if (line < ahead) __builtin_prefetch(next + line, 0, 2);
    acc = acc + (Vec::loadu(x + j) - vm).exp_u20();
  }
  if (j < len) acc = acc + (load_tail(x + j, len - j, -std::numeric_limits<float>::infinity()) - vm).exp_u20();
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
}

// The running online normaliser of one row.
struct Normaliser {
  float m = -std::numeric_limits<float>::infinity();
  float s = 0.f;

  void add_block(const float* x, int64_t len, float bmax, const char* next = nullptr, int64_t ahead = 0) {
    const float m_new = nan_max(m, bmax);
    if (m_new == -std::numeric_limits<float>::infinity()) return;  // only -inf so far: contributes 0
    if (m_new == std::numeric_limits<float>::infinity()) {         // lse is +inf whatever follows
      m = m_new;
      return;
    }
    if (m_new != m) s = m == -std::numeric_limits<float>::infinity() ? 0.f : s * std::exp(m - m_new);
    m = m_new;
    s += block_sum_exp(x, len, m, next, ahead);
  }

  float lse() const {
    if (m == std::numeric_limits<float>::infinity()) return m;
    if (m == -std::numeric_limits<float>::infinity()) return std::numeric_limits<float>::quiet_NaN();
    return m + std::log(s);
  }
};

// The k largest (value, index) pairs seen so far, sorted descending, ties in arrival order.
struct TopK {
  float val[kMaxK] = {};  // all kMaxK read by insert_full's vector compares (lanes past k masked off)
  int64_t idx[kMaxK] = {};
  int k = 0;
  int size = 0;

  void insert(float v, int64_t i) {
    int p = size < k ? size : k - 1;
    if (size < k) ++size;
    while (p > 0 && greater(v, val[p - 1])) {
      val[p] = val[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    val[p] = v;
    idx[p] = i;
  }

  // insert for a full buffer and a number v above the threshold: its place is the count of entries v does
  // not beat (vector compares, entries past k masked off), then one move of the tail; no compare per shift.
  void insert_full(float v, int64_t i) {
    const Vec vv(v);
    int pos = 0;
    for (int p0 = 0; p0 < k; p0 += Vec::size()) {
      const int lanes = std::min<int>(Vec::size(), k - p0);
      const unsigned keep = lanes == Vec::size() ? kLanes : (1u << lanes) - 1u;
      pos += __builtin_popcount(static_cast<unsigned>((vv > Vec::loadu(val + p0)).zero_mask()) & keep);
    }
    std::memmove(val + pos + 1, val + pos, (k - 1 - pos) * sizeof(float));
    std::memmove(idx + pos + 1, idx + pos, (k - 1 - pos) * sizeof(int64_t));
    val[pos] = v;
    idx[pos] = i;
  }

  float threshold() const { return val[k - 1]; }

  // Offer elements [j0, j1) of a block starting at row index base; the buffer is full.
  void scan(const float* x, int64_t j0, int64_t j1, int64_t base, float bmax) {
    if (!greater(bmax, threshold())) return;
    int64_t j = j0;
    if (bmax == bmax) {  // no NaN in the block: a plain vector compare finds the candidates
      for (; j + Vec::size() <= j1; j += Vec::size()) {
        const Vec vx = Vec::loadu(x + j);
        // zero_mask: a bit per lane that compared false; visit only the lanes that compared true
        unsigned above = ~static_cast<unsigned>((vx > Vec(threshold())).zero_mask()) & kLanes;
        while (above != 0) {
          const int l = __builtin_ctz(above);
          above &= above - 1;
          if (x[j + l] > threshold()) insert_full(x[j + l], base + j + l);
        }
      }
    }
    for (; j < j1; ++j)
      if (greater(x[j], threshold())) insert(x[j], base + j);
  }
};

// Short rows with small k (routers): k rounds of "find the largest, take it out" over a copy of the
// row, each a vectorised maximum and a vectorised search for its first position.  No branches that
// depend on the data order, where the running buffer above mispredicts on nearly every insert of a
// short row.  Same order: NaN first, then by value, lower index first among equals.
void select_small(const float* x, int64_t n, int k, float* work, TopK& top) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  std::copy(x, x + n, work);
  top.size = k;
  for (int t = 0; t < k; ++t) {
    const float mx = block_max(work, n);
    int64_t hit = -1;
    if (mx == ninf) {
      // only -inf left: the lowest-index -inf of x not taken yet (taken entries read -inf in work too)
      for (int64_t j = 0; j < n && hit < 0; ++j) {
        bool taken = false;
        for (int u = 0; u < t; ++u) taken = taken || top.idx[u] == j;
        if (!taken && x[j] == ninf) hit = j;
      }
    } else {
      const bool want_nan = mx != mx;
      const Vec vmx(mx);
      int64_t j = 0;
      for (; j + Vec::size() <= n && hit < 0; j += Vec::size()) {
        const Vec v = Vec::loadu(work + j);
        const unsigned eq = ~static_cast<unsigned>((want_nan ? (v != v) : (v == vmx)).zero_mask()) & kLanes;
        if (eq != 0) hit = j + __builtin_ctz(eq);
      }
      for (; j < n && hit < 0; ++j)
        if (want_nan ? work[j] != work[j] : work[j] == mx) hit = j;
    }
    top.val[t] = x[hit];
    top.idx[t] = hit;
    work[hit] = ninf;
  }
}

// V values of x as floats: bf16/fp16 widened V lanes at a time (a shift or F16C), not element by element.
template <typename T>
inline Vec load_float(const T* src) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(src);
  } else {
    Vec v;
    at::vec::load_to_float<T>(src, v);
    return v;
  }
}

template <typename T>
const float* as_float(const T* src, int64_t len, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    int64_t j = 0;
    for (; j + Vec::size() <= len; j += Vec::size()) load_float(src + j).store(buf + j);
    for (; j < len; ++j) buf[j] = static_cast<float>(src[j]);
    return buf;
  }
}

// One block of a row once the buffer is full, in a single read of the input: widen (into buf, reduced
// precision only), the running block maximum, and the top-k filter, all per vector.  A vector with no lane
// above the k-th value costs one compare; the few that beat it enter the buffer, and the threshold is
// re-read after each entry.  NaN lanes never compare above: when the block maximum says there is one, the
// block's NaNs are offered afterwards in index order (the buffer's order does not depend on when an entry
// arrives, only on value and index).  Returns the block maximum (NaN if any) and the block as floats.
template <typename T>
float block_pass(const T* xr, int64_t len, int64_t base, float* buf, TopK& top, const float** out) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  constexpr bool wide = !std::is_same_v<T, float>;
  const float* xb = wide ? buf : reinterpret_cast<const float*>(xr);
  Vec vm(ninf), vt(top.threshold());
  int64_t j = 0;
  for (; j + Vec::size() <= len; j += Vec::size()) {
    const Vec v = load_float(xr + j);
    if constexpr (wide) v.store(buf + j);
    vm = at::vec::maximum(vm, v);
    unsigned above = ~static_cast<unsigned>((v > vt).zero_mask()) & kLanes;
    if (above != 0) {
      while (above != 0) {
        const int l = __builtin_ctz(above);
        above &= above - 1;
        if (xb[j + l] > top.threshold()) top.insert_full(xb[j + l], base + j + l);
      }
      vt = Vec(top.threshold());
    }
  }
  float bmax = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  for (; j < len; ++j) {
    if constexpr (wide) buf[j] = static_cast<float>(xr[j]);
    bmax = nan_max(bmax, xb[j]);
    if (xb[j] > top.threshold()) top.insert_full(xb[j], base + j);
  }
  if (bmax != bmax)
    for (int64_t t = 0; t < len; ++t)
      if (xb[t] != xb[t] && greater(xb[t], top.threshold())) top.insert(xb[t], base + t);
  *out = xb;
  return bmax;
}

// The outputs of one row from its selection: p_j = exp(x_j - lse), or renormalised over the k.
template <typename T>
void write_row(const float* val, const int64_t* idx, int k, bool renormalize, float lse, T* pr, int64_t* ir) {
  if (renormalize) {
    const float top_v = val[0];
    float w[kMaxK];
    float total = 0.f;
    for (int j = 0; j < k; ++j) total += (w[j] = std::exp(val[j] - top_v));
    for (int j = 0; j < k; ++j) pr[j] = static_cast<T>(w[j] / total);
  } else {
    for (int j = 0; j < k; ++j) pr[j] = static_cast<T>(std::exp(val[j] - lse));
  }
  for (int j = 0; j < k; ++j) ir[j] = idx[j];
}

// One row: the online normaliser block by block, the running buffer (or select_small for short rows).
template <typename T>
void forward_row(const T* xr, int64_t n, int k, bool renormalize, T* pr, int64_t* ir, float* buf, float* work, TopK& top) {
  const bool small = n > Vec::size() && n <= kSmallN && k <= kSmallK;  // one vector or less: the buffer is cheaper
  Normaliser norm;
  top.k = k;
  top.size = 0;
  if (small) {
    const float* xb = as_float(xr, n, buf);
    norm.add_block(xb, n, block_max(xb, n));
    select_small(xb, n, k, work, top);
  }
  for (int64_t b0 = 0; b0 < n && !small; b0 += kBlock) {
    const int64_t len = std::min(kBlock, n - b0);
    const float* xb;
    float bmax;
    if (top.size == k) {
      bmax = block_pass(xr + b0, len, b0, buf, top, &xb);
    } else {  // the row's first block: the first k enter unconditionally
      xb = as_float(xr + b0, len, buf);
      bmax = block_max(xb, len);
      int64_t j = 0;
      for (; top.size < k && j < len; ++j) top.insert(xb[j], b0 + j);
      if (j < len) top.scan(xb, j, len, b0, bmax);
    }
    const int64_t ahead = std::min(kBlock, n - b0 - len) * static_cast<int64_t>(sizeof(T));  // this row's next block
    norm.add_block(xb, len, bmax, reinterpret_cast<const char*>(xr + b0 + len), ahead);
  }
  write_row(top.val, top.idx, k, renormalize, norm.lse(), pr, ir);
}

// Router rows: the tile paths (forward_tile_k), in their own file; see its first comment.
#include "topk_tiles.h"

template <typename T>
void forward_rows(const T* x, int64_t rows, int64_t n, int k, bool renormalize, T* probs, int64_t* indices) {
  constexpr int64_t V = Vec::size();
  const bool tiled = n <= kTileN && k <= kTileK && rows >= V;
  const int64_t unit = tiled ? V : 1;  // parallel over tiles of V rows, or over rows
  const int64_t units = (rows + unit - 1) / unit;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n * unit, 1));  // elements per task, as before
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : kBlock), work(n <= kSmallN ? n : 0);
    std::vector<float> tb(tiled ? 2 * n * V : 0);
    TopK top;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t r0 = u * unit, here = std::min(unit, rows - r0);
      const uint32_t redo = tiled ? forward_tile_k(x + r0 * n, here, n, k, renormalize, tb.data(), probs + r0 * k,
                                                   indices + r0 * k)
                                  : 1u;
      for (int64_t r = r0; r < r0 + here; ++r)
        if ((redo >> (r - r0)) & 1u)
          forward_row(x + r * n, n, k, renormalize, probs + r * k, indices + r * k, buf.data(), work.data(), top);
    }
  });
}

template <typename T>
void store_from_float(const float* src, int64_t len, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    if (src != dst) std::copy(src, src + len, dst);
  } else {
    for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<T>(src[j]);
  }
}

template <typename T>
void backward_rows(const T* grad, const T* x, const int64_t* indices, int64_t rows, int64_t n, int k, bool renormalize,
                   T* dx) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : kBlock), out(kBlock);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      const T* gr = grad + r * k;
      const int64_t* ir = indices + r * k;
      T* dr = dx + r * n;
      float p[kMaxK], g[kMaxK];
      float gp = 0.f;
      float coef = 0.f;  // dx_i = -coef * exp(x_i - lse) off the selection (renormalised: 0)
      float lse = 0.f;
      if (renormalize) {
        const float top_v = static_cast<float>(xr[ir[0]]);
        float total = 0.f;
        for (int j = 0; j < k; ++j) total += (p[j] = std::exp(static_cast<float>(xr[ir[j]]) - top_v));
        for (int j = 0; j < k; ++j) {
          p[j] /= total;
          g[j] = static_cast<float>(gr[j]);
          gp += g[j] * p[j];
        }
        for (int j = 0; j < k; ++j) p[j] = p[j] * (g[j] - gp);  // the selected entries' gradient
        std::fill(dr, dr + n, static_cast<T>(0.f));
      } else {
        Normaliser norm;
        for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
          const int64_t len = std::min(kBlock, n - b0);
          const float* xb = as_float(xr + b0, len, buf.data());
          norm.add_block(xb, len, block_max(xb, len));
        }
        lse = norm.lse();
        for (int j = 0; j < k; ++j) {
          p[j] = std::exp(static_cast<float>(xr[ir[j]]) - lse);
          g[j] = static_cast<float>(gr[j]);
          coef += g[j] * p[j];
        }
        const Vec vlse(lse), vneg(-coef);
        for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
          const int64_t len = std::min(kBlock, n - b0);
          const float* xb = as_float(xr + b0, len, buf.data());
          float* ob = std::is_same_v<T, float> ? reinterpret_cast<float*>(dr + b0) : out.data();
          int64_t j = 0;
          for (; j + Vec::size() <= len; j += Vec::size()) (vneg * (Vec::loadu(xb + j) - vlse).exp_u20()).store(ob + j);
          if (j < len) (vneg * (Vec::loadu(xb + j, len - j) - vlse).exp_u20()).store(ob + j, len - j);
          store_from_float(ob, len, dr + b0);
        }
        for (int j = 0; j < k; ++j) p[j] = g[j] * p[j] - coef * p[j];  // softmax_i = p_i at the selection
      }
      for (int j = 0; j < k; ++j) dr[ir[j]] = static_cast<T>(p[j]);
    }
  });
}

void check_rows(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "softmax_topk kernel: x must be [rows, n] contiguous, got ", x.sizes());
  TORCH_CHECK(k >= 1 && k <= kMaxK && k <= x.size(1), "softmax_topk kernel: k=", k, " must be in [1, min(64, ",
              x.size(1), ")]");
}

std::tuple<at::Tensor, at::Tensor> topk_fwd(const at::Tensor& x, int64_t k, bool renormalize) {
  check_rows(x, k);
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor probs = at::empty({rows, k}, x.options());
  at::Tensor indices = at::empty({rows, k}, x.options().dtype(at::kLong));
  const int kk = static_cast<int>(k);
  if (x.scalar_type() == at::kFloat) {
    forward_rows(x.data_ptr<float>(), rows, n, kk, renormalize, probs.data_ptr<float>(), indices.data_ptr<int64_t>());
  } else if (x.scalar_type() == at::kBFloat16) {
    forward_rows(x.data_ptr<at::BFloat16>(), rows, n, kk, renormalize, probs.data_ptr<at::BFloat16>(),
                 indices.data_ptr<int64_t>());
  } else if (x.scalar_type() == at::kHalf) {
    forward_rows(x.data_ptr<at::Half>(), rows, n, kk, renormalize, probs.data_ptr<at::Half>(), indices.data_ptr<int64_t>());
  } else {
    TORCH_CHECK(false, "softmax_topk kernel: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return {probs, indices};
}

at::Tensor topk_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& indices, bool renormalize) {
  const int64_t k = indices.size(1);
  check_rows(x, k);
  TORCH_CHECK(grad.is_contiguous() && indices.is_contiguous() && grad.sizes() == indices.sizes() &&
                  grad.size(0) == x.size(0) && grad.scalar_type() == x.scalar_type() && indices.scalar_type() == at::kLong,
              "softmax_topk kernel: grad and indices must be [rows, k] contiguous (grad in x's dtype, indices int64)");
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const int kk = static_cast<int>(k);
  if (x.scalar_type() == at::kFloat) {
    backward_rows(grad.data_ptr<float>(), x.data_ptr<float>(), indices.data_ptr<int64_t>(), rows, n, kk, renormalize,
                  dx.data_ptr<float>());
  } else if (x.scalar_type() == at::kBFloat16) {
    backward_rows(grad.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(), indices.data_ptr<int64_t>(), rows, n, kk,
                  renormalize, dx.data_ptr<at::BFloat16>());
  } else if (x.scalar_type() == at::kHalf) {
    backward_rows(grad.data_ptr<at::Half>(), x.data_ptr<at::Half>(), indices.data_ptr<int64_t>(), rows, n, kk, renormalize,
                  dx.data_ptr<at::Half>());
  } else {
    TORCH_CHECK(false, "softmax_topk kernel: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return dx;
}

}  // namespace

#include "topk_op.h"

TORCH_LIBRARY(ATTNPASS_NS, m) {
  m.def("softmax_topk_forward", &topk_fwd);
  m.def("softmax_topk_backward", &topk_bwd);
  m.def("set_dispatch", &set_dispatch);  // the attnpass ops' CPU kernels on / off (topk_op.h)
}
