// Softmax followed by top-k in one read of the input (Milakov & Gimelshein, "Online normalizer
// calculation for softmax", 2018, algorithm 4), forward and backward, for the CPU.
//
// Compiled once per CPU capability like attention.cpp (attnpass/kernels/cpu/__init__.py), each
// variant its own library and op namespace (ATTNPASS_NS).
//
// Layout: x [rows, n] contiguous, float / bfloat16 / half; all arithmetic in float.  Rows run in
// parallel (at::parallel_for).  Each row is walked once, in blocks that fit L1 (a bf16/fp16 block
// is widened into a per-thread float buffer first).  Per block:
//   1. the block maximum (vectorised);
//   2. the running maximum m and normaliser s: s is rescaled by exp(m_old - m_new) only when the
//      maximum grows, then s += sum exp(x - m) (vectorised exp);
//   3. the running top-k: a sorted buffer of (value, index), k <= 64.  A block whose maximum does
//      not beat the k-th value is skipped with no further work (after the first blocks of a long
//      row almost all are); otherwise a vectorised compare finds the few lanes that beat it.
// The outputs are p_j = exp(x_j - lse) with lse = m + log(s) (renormalised: exp(x_j - x_top) over
// the sum of the k of them), written for k entries per row only.
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

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
constexpr unsigned kLanes = (1u << Vec::size()) - 1u;

// NaN ranks above every number (torch.topk's order).
inline bool greater(float a, float b) { return (a != a && b == b) || a > b; }

// max(a, b) that returns NaN if either is NaN.
inline float nan_max(float a, float b) { return (a != a || b != b) ? std::numeric_limits<float>::quiet_NaN() : std::max(a, b); }

float block_max(const float* x, int64_t len) {
  int64_t j = 0;
  float mx = -std::numeric_limits<float>::infinity();
  if (len >= Vec::size()) {
    Vec vm = Vec::loadu(x);
    for (j = Vec::size(); j + Vec::size() <= len; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + j));
    float lanes[Vec::size()];
    vm.store(lanes);
    for (int l = 0; l < Vec::size(); ++l) mx = nan_max(mx, lanes[l]);
  }
  for (; j < len; ++j) mx = nan_max(mx, x[j]);
  return mx;
}

// sum_j exp(x_j - m), vectorised; m finite or NaN.
float block_sum_exp(const float* x, int64_t len, float m) {
  int64_t j = 0;
  float total = 0.f;
  const Vec vm(m);
  Vec acc(0.f);
  for (; j + Vec::size() <= len; j += Vec::size()) acc = acc + (Vec::loadu(x + j) - vm).exp_u20();
  float lanes[Vec::size()];
  acc.store(lanes);
  for (int l = 0; l < Vec::size(); ++l) total += lanes[l];
  for (; j < len; ++j) total += std::exp(x[j] - m);
  return total;
}

// The running online normaliser of one row.
struct Normaliser {
  float m = -std::numeric_limits<float>::infinity();
  float s = 0.f;

  void add_block(const float* x, int64_t len, float bmax) {
    const float m_new = nan_max(m, bmax);
    if (m_new == -std::numeric_limits<float>::infinity()) return;  // only -inf so far: contributes 0
    if (m_new == std::numeric_limits<float>::infinity()) {         // lse is +inf whatever follows
      m = m_new;
      return;
    }
    if (m_new != m) s = m == -std::numeric_limits<float>::infinity() ? 0.f : s * std::exp(m - m_new);
    m = m_new;
    s += block_sum_exp(x, len, m);
  }

  float lse() const {
    if (m == std::numeric_limits<float>::infinity()) return m;
    if (m == -std::numeric_limits<float>::infinity()) return std::numeric_limits<float>::quiet_NaN();
    return m + std::log(s);
  }
};

// The k largest (value, index) pairs seen so far, sorted descending, ties in arrival order.
struct TopK {
  float val[kMaxK];
  int64_t idx[kMaxK];
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
          if (greater(x[j + l], threshold())) insert(x[j + l], base + j + l);
        }
      }
    }
    for (; j < j1; ++j)
      if (greater(x[j], threshold())) insert(x[j], base + j);
  }
};

template <typename T>
const float* as_float(const T* src, int64_t len, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<float>(src[j]);
    return buf;
  }
}

template <typename T>
void forward_rows(const T* x, int64_t rows, int64_t n, int k, bool renormalize, T* probs, int64_t* indices) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : kBlock);
    TopK top;
    top.k = k;
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      Normaliser norm;
      top.size = 0;
      for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
        const int64_t len = std::min(kBlock, n - b0);
        const float* xb = as_float(xr + b0, len, buf.data());
        const float bmax = block_max(xb, len);
        norm.add_block(xb, len, bmax);
        int64_t j = 0;
        for (; top.size < k && j < len; ++j) top.insert(xb[j], b0 + j);  // the first k enter unconditionally
        if (j < len) top.scan(xb, j, len, b0, bmax);
      }
      T* pr = probs + r * k;
      int64_t* ir = indices + r * k;
      if (renormalize) {
        const float top_v = top.val[0];
        float w[kMaxK];
        float total = 0.f;
        for (int j = 0; j < k; ++j) total += (w[j] = std::exp(top.val[j] - top_v));
        for (int j = 0; j < k; ++j) pr[j] = static_cast<T>(w[j] / total);
      } else {
        const float lse = norm.lse();
        for (int j = 0; j < k; ++j) pr[j] = static_cast<T>(std::exp(top.val[j] - lse));
      }
      for (int j = 0; j < k; ++j) ir[j] = top.idx[j];
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
          for (; j < len; ++j) ob[j] = -coef * std::exp(xb[j] - lse);
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

TORCH_LIBRARY(ATTNPASS_NS, m) {
  m.def("softmax_topk_forward", &topk_fwd);
  m.def("softmax_topk_backward", &topk_bwd);
}
