// The router tile paths of topk.cpp (forward_tile_k and what it uses): many short rows, one row per vector
// lane.  Not a standalone header: topk.cpp includes it once, inside its anonymous namespace, after the row
// path's helpers (Vec, kLanes, as_float, block_sum_exp) that it uses.  attnpass/kernels/cpu/__init__.py
// hashes this file with topk.cpp, so an edit here rebuilds the kernel.

#pragma once

// Router rows (short, k <= kTileK): Vec::size() rows at once, one row per lane.  The tile is transposed
// into `tb` (column j of the tile is one vector); one loop over the columns keeps K sorted slots per
// lane (value and index), updated branch-free: compare, then blend, each slot's update independent of
// the others.  Slot 0 ends as the row's maximum, so the normaliser needs one more pass over the tile
// (in L1) only without renormalisation.  The probabilities are computed lane-wise too (one vector exp
// per slot).  So no per-row reductions, no scalar exp, no data-dependent branches.  A slot is entered
// only by a value strictly greater, so equal values keep the lower index, as in TopK::insert.  A tile
// holding a NaN, or a row with fewer than k entries above -inf, is redone row by row (their order
// rules need the general path); these are rare and the result is the same either way.
#if defined(CPU_CAPABILITY_AVX512)
// AVX512 compares into a mask register and blends from it; at::vec's Vectorized<float> compare and
// blendv round-trip through an all-ones vector (two instructions each, on one port).
using Mask = __mmask16;
inline Mask gt(const Vec& a, const Vec& b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
inline Vec pick(Mask m, const Vec& a, const Vec& b) { return _mm512_mask_blend_ps(m, a, b); }  // m ? b : a
inline Mask no_lanes() { return 0; }
inline Mask unordered(const Vec& a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
inline Mask either(Mask a, Mask b) { return a | b; }
inline bool any_lane(Mask m) { return m != 0; }
#else
using Mask = Vec;
inline Mask gt(const Vec& a, const Vec& b) { return a > b; }
inline Vec pick(const Mask& m, const Vec& a, const Vec& b) { return Vec::blendv(a, b, m); }  // m ? b : a
inline Mask no_lanes() { return Vec(0.f); }
inline Mask unordered(const Vec& a) { return a != a; }
inline Mask either(const Mask& a, const Mask& b) { return a | b; }
inline bool any_lane(const Mask& m) { return (~static_cast<unsigned>(m.zero_mask()) & kLanes) != 0; }
#endif

// Rows -> columns for a tile: dst[j * V + r] = src[r * ld + j].  A full tile whose width is a multiple of 16
// is transposed 16 x 16 in registers (AVX512); anything else goes through at::vec's general transpose.
inline void transpose_tile(const float* src, int64_t ld, float* dst, int64_t rows, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if (rows == 16 && n % 16 == 0) {
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      __m512 a[16], b[16];
      for (int r = 0; r < 16; ++r) a[r] = _mm512_loadu_ps(src + r * ld + j0);
      for (int r = 0; r < 16; r += 2) {  // pairs of rows interleaved by 32 bits
        b[r] = _mm512_unpacklo_ps(a[r], a[r + 1]);
        b[r + 1] = _mm512_unpackhi_ps(a[r], a[r + 1]);
      }
      for (int r = 0; r < 16; r += 4) {  // then by 64 bits: 4 x 4 blocks within each 128-bit lane
        const auto d = [&](int q) { return _mm512_castps_pd(b[r + q]); };
        a[r] = _mm512_castpd_ps(_mm512_unpacklo_pd(d(0), d(2)));
        a[r + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(d(0), d(2)));
        a[r + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(d(1), d(3)));
        a[r + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(d(1), d(3)));
      }
      for (int r = 0; r < 16; r += 8) {  // then whole 128-bit lanes, twice
        for (int q = 0; q < 4; ++q) {
          b[r + q] = _mm512_shuffle_f32x4(a[r + q], a[r + q + 4], 0x88);
          b[r + q + 4] = _mm512_shuffle_f32x4(a[r + q], a[r + q + 4], 0xdd);
        }
      }
      for (int q = 0; q < 8; ++q) {
        _mm512_storeu_ps(dst + (j0 + q) * 16, _mm512_shuffle_f32x4(b[q], b[q + 8], 0x88));
        _mm512_storeu_ps(dst + (j0 + q + 8) * 16, _mm512_shuffle_f32x4(b[q], b[q + 8], 0xdd));
      }
    }
    return;
  }
#endif
  at::vec::transpose_mxn<float>(src, ld, dst, Vec::size(), static_cast<int>(rows), static_cast<int>(n));
}

constexpr int kTileK = 8;
constexpr int64_t kTileN = 1024;

template <int K, typename T>
bool forward_tile(const T* x, int64_t rows_here, int64_t n, int k, bool renormalize, float* tb, T* probs, int64_t* indices) {
  constexpr int V = Vec::size();
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  // rows -> columns with at::vec's blocked transpose (16 x 16 in registers on AVX512); reduced precision
  // is widened row by row first, into the second half of `tb`
  const float* src;
  if constexpr (std::is_same_v<T, float>) {
    src = x;
  } else {
    src = as_float(x, rows_here * n, tb + n * V);
  }
  if (rows_here < V) std::fill(tb, tb + n * V, 0.f);  // a partial tile's spare lanes: finite, ignored
  transpose_tile(src, n, tb, rows_here, n);
  Vec val[K], idx[K];
  for (int p = 0; p < K; ++p) {
    val[p] = Vec(ninf);
    idx[p] = Vec(-1.f);
  }
  Mask nan = no_lanes();
  for (int64_t j = 0; j < n; ++j) {
    // The slots are sorted, so c beats slot p exactly when it beats it directly (it then beats every later
    // slot too): slot p takes c if c beats p but not p - 1, else slot p - 1's entry if c beat p - 1.  Every
    // slot's update reads only the old slots: no chain from slot to slot within a column.  A NaN beats
    // nothing here; it is only noted, and its tile redone row by row.
    const Vec c = Vec::loadu(tb + j * V), ci(static_cast<float>(j));
    nan = either(nan, unordered(c));
    Mask win_prev = gt(c, val[0]);
    Vec v_prev = val[0], i_prev = idx[0];
    val[0] = pick(win_prev, val[0], c);
    idx[0] = pick(win_prev, idx[0], ci);
    for (int p = 1; p < K; ++p) {
      const Mask win = gt(c, val[p]);
      const Vec v = val[p], i = idx[p];
      val[p] = pick(win, v, pick(win_prev, c, v_prev));
      idx[p] = pick(win, i, pick(win_prev, ci, i_prev));
      win_prev = win;
      v_prev = v;
      i_prev = i;
    }
  }
  if (any_lane(nan)) return false;
  float lse[V];
  if (!renormalize) {  // slot 0 holds each row's maximum: one more pass, over the tile in L1, for the normaliser
    const Vec vm = val[0];
    float m[V], s[V];
    vm.store(m);
    Vec acc(0.f);
    for (int64_t j = 0; j < n; ++j) acc = acc + (Vec::loadu(tb + j * V) - vm).exp_u20();
    acc.store(s);
    for (int l = 0; l < V; ++l)
      lse[l] = m[l] == -ninf ? m[l] : m[l] == ninf ? std::numeric_limits<float>::quiet_NaN() : m[l] + std::log(s[l]);
  }
  float si[K][V];
  for (int p = 0; p < K; ++p) idx[p].store(si[p]);
  for (int l = 0; l < rows_here; ++l)
    if (si[k - 1][l] < 0.f) return false;
  // the probabilities lane-wise too: K vector exps per tile instead of K scalar exps per row
  float pv[K][V];
  if (renormalize) {
    Vec w[K], total(0.f);
    for (int p = 0; p < K; ++p) total = total + (w[p] = (val[p] - val[0]).exp());
    for (int p = 0; p < K; ++p) (w[p] / total).store(pv[p]);
  } else {
    const Vec vlse = Vec::loadu(lse);
    for (int p = 0; p < K; ++p) (val[p] - vlse).exp().store(pv[p]);
  }
  for (int l = 0; l < rows_here; ++l) {
    for (int p = 0; p < K; ++p) {
      probs[l * K + p] = static_cast<T>(pv[p][l]);
      indices[l * K + p] = static_cast<int64_t>(si[p][l]);
    }
  }
  return true;
}

// The order-preserving int32 key of a 16-bit float's bits (sign-extended to v) at index j; see below.
inline int32_t key_of(int32_t v, int64_t j) {
  const int32_t neg = v >> 31;
  const int32_t ordered = (v ^ (neg & 0x7FFF)) - neg;
  return static_cast<int32_t>((static_cast<uint32_t>(ordered) << 16) | static_cast<uint32_t>(0xFFFF - j));
}

using IVec = Vectorized<int32_t>;

// The K sorted key slots of each lane after every column (column(j) gives column j's V keys).
template <int K, typename ColumnFn>
void select_keys(int64_t n, IVec* slot, ColumnFn&& column) {
  for (int p = 0; p < K; ++p) slot[p] = IVec(std::numeric_limits<int32_t>::min());
  int64_t j0 = 0;
  if constexpr (K == 8) {
    // 8 columns at a time: sort them (19 compare-exchanges), keep the top 8 of them and the slots (8 maxima,
    // a bitonic sequence), sort that (12): 70 max/min per 8 columns instead of 8 x 15 by insertion.
    const auto cx = [](IVec& a, IVec& b) {
      const IVec hi = at::vec::maximum(a, b);
      b = at::vec::minimum(a, b);
      a = hi;
    };
    for (; j0 + 8 <= n; j0 += 8) {
      IVec c[8];
      for (int q = 0; q < 8; ++q) c[q] = column(j0 + q);
      // written out: constant indices keep every vector in a register
      cx(c[0], c[2]), cx(c[1], c[3]), cx(c[4], c[6]), cx(c[5], c[7]);
      cx(c[0], c[4]), cx(c[1], c[5]), cx(c[2], c[6]), cx(c[3], c[7]);
      cx(c[0], c[1]), cx(c[2], c[3]), cx(c[4], c[5]), cx(c[6], c[7]);
      cx(c[2], c[4]), cx(c[3], c[5]);
      cx(c[1], c[4]), cx(c[3], c[6]);
      cx(c[1], c[2]), cx(c[3], c[4]), cx(c[5], c[6]);
      for (int q = 0; q < 8; ++q) slot[q] = at::vec::maximum(slot[q], c[7 - q]);
      cx(slot[0], slot[4]), cx(slot[1], slot[5]), cx(slot[2], slot[6]), cx(slot[3], slot[7]);
      cx(slot[0], slot[2]), cx(slot[1], slot[3]), cx(slot[4], slot[6]), cx(slot[5], slot[7]);
      cx(slot[0], slot[1]), cx(slot[2], slot[3]), cx(slot[4], slot[5]), cx(slot[6], slot[7]);
    }
  }
  for (int64_t j = j0; j < n; ++j) {
    const IVec c = column(j);
    for (int p = K - 1; p > 0; --p) slot[p] = at::vec::maximum(slot[p], at::vec::minimum(c, slot[p - 1]));
    slot[0] = at::vec::maximum(slot[0], c);
  }
}

// Router tiles in bf16/fp16: a 16-bit value and a 10-bit index fit one int32 key whose integer order is the
// selection order: the value's bits made order-preserving (negatives' magnitude bits flipped, -0 folded onto
// +0) in the high half, 0xFFFF - index in the low half, so a larger key is a larger value or, among equal
// values, the lower index.  Keys are distinct, so the K sorted slots take a new column with one integer
// max and one min per slot (slot p becomes max(slot p, min(c, slot p - 1))), with no compares, blends or
// separate index slots: 2 operations per slot per V rows instead of 5 (k = 8: a sort and a merge of 8
// columns at a time, fewer still).  A full tile whose width is a multiple of 16 is transposed as 16-bit
// values (half the bytes of floats) and keyed column by column; otherwise the keys are made row by row and
// transposed as 32-bit words.  The normaliser, when needed, is one pass per row over the row in L1 with the
// row's maximum (slot 0).  As in forward_tile, a tile holding a NaN, or a row whose k-th is -inf, is redone
// row by row.
template <int K, typename T>
bool forward_tile_keyed(const T* x, int64_t rows_here, int64_t n, int k, bool renormalize, float* tb, T* probs,
                        int64_t* indices) {
  constexpr int V = Vec::size();
  static_assert(IVec::size() == V, "one key per float lane");
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  constexpr int32_t kInfBits = std::is_same_v<T, at::BFloat16> ? 0x7F80 : 0x7C00;  // |bits| above this: NaN
  IVec slot[K];
  if (V == 16 && rows_here == V && n % 16 == 0) {
    T* tt = reinterpret_cast<T*>(tb);  // [n][16] 16-bit values
    for (int64_t j = 0; j < n; j += 16) at::vec::transpose_mxn<T, 16, 16>(x + j, n, tt + j * 16, 16);
    const uint16_t* th = reinterpret_cast<const uint16_t*>(tt);
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i m7fff = _mm512_set1_epi32(0x7FFF);
    __m512i mag_max = _mm512_setzero_si512();
    select_keys<K>(n, slot, [&](int64_t j) {
      const __m512i v = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(th + j * 16)));
      const __m512i neg = _mm512_srai_epi32(v, 31);
      mag_max = _mm512_max_epi32(mag_max, _mm512_and_si512(v, m7fff));
      const __m512i ordered = _mm512_sub_epi32(_mm512_xor_si512(v, _mm512_and_si512(neg, m7fff)), neg);
      return IVec(_mm512_or_si512(_mm512_slli_epi32(ordered, 16), _mm512_set1_epi32(static_cast<int32_t>(0xFFFF - j))));
    });
    if (_mm512_reduce_max_epi32(mag_max) > kInfBits) return false;
#else
    int32_t mag_max = 0;
    select_keys<K>(n, slot, [&](int64_t j) {
      int32_t keys[V];
      for (int l = 0; l < V; ++l) {
        const int32_t v = static_cast<int16_t>(th[j * 16 + l]);
        mag_max = std::max(mag_max, v & 0x7FFF);
        keys[l] = key_of(v, j);
      }
      return IVec::loadu(keys);
    });
    if (mag_max > kInfBits) return false;
#endif
  } else {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
    int32_t* row_keys = reinterpret_cast<int32_t*>(tb + n * V);
    int32_t nan = 0;
    for (int64_t r = 0; r < rows_here; ++r) {
      const uint16_t* br = bits + r * n;
      int32_t* kr = row_keys + r * n;
      for (int64_t j = 0; j < n; ++j) {  // plain integer arithmetic: the compiler vectorises it
        const int32_t v = static_cast<int16_t>(br[j]);
        nan |= static_cast<int32_t>((v & 0x7FFF) > kInfBits);
        kr[j] = key_of(v, j);
      }
    }
    if (nan != 0) return false;
    if (rows_here < V) std::fill(tb, tb + n * V, 0.f);  // a partial tile's spare lanes: ignored
    at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(row_keys), n, tb, V, static_cast<int>(rows_here),
                                  static_cast<int>(n));
    select_keys<K>(n, slot, [&](int64_t j) { return IVec::loadu(tb + j * V); });
  }
  int32_t sk[K][V];
  float sv[K][V], si[K][V];
  for (int p = 0; p < K; ++p) slot[p].store(sk[p]);
  for (int p = 0; p < K; ++p) {
    for (int l = 0; l < V; ++l) {
      const int32_t ordered = sk[p][l] >> 16, neg = ordered >> 31;
      const auto b = static_cast<uint16_t>((ordered + neg) ^ (neg & 0x7FFF));
      sv[p][l] = l < rows_here ? static_cast<float>(T(b, T::from_bits())) : 0.f;
      si[p][l] = static_cast<float>(0xFFFF - (sk[p][l] & 0xFFFF));
    }
  }
  for (int l = 0; l < rows_here; ++l)
    if (sv[k - 1][l] == ninf) return false;
  float pv[K][V];
  if (renormalize) {
    Vec w[K], total(0.f);
    const Vec top = Vec::loadu(sv[0]);
    for (int p = 0; p < K; ++p) total = total + (w[p] = (Vec::loadu(sv[p]) - top).exp());
    for (int p = 0; p < K; ++p) (w[p] / total).store(pv[p]);
  } else {
    float lse[V] = {};
    float* row = tb + n * V;  // the row keys are transposed already: reuse their space for one widened row
    for (int l = 0; l < rows_here; ++l) {
      const float m = sv[0][l];
      lse[l] = m == -ninf ? m : m + std::log(block_sum_exp(as_float(x + l * n, n, row), n, m));
    }
    const Vec vlse = Vec::loadu(lse);
    for (int p = 0; p < K; ++p) (Vec::loadu(sv[p]) - vlse).exp().store(pv[p]);
  }
  for (int l = 0; l < rows_here; ++l) {
    for (int p = 0; p < K; ++p) {
      probs[l * K + p] = static_cast<T>(pv[p][l]);
      indices[l * K + p] = static_cast<int64_t>(si[p][l]);
    }
  }
  return true;
}

// Router tiles in float32 with k >= kKeyedK: the same int32 keys, from a value that no longer fits beside the
// index: the float's bits made order-preserving, their low 10 bits (a bucket of 2^-13 relative width)
// replaced by 1023 - index.  Selection on these keys is exact except inside one bucket, where it orders by
// index instead of by value; a row is handed back to the exact row path (its bit in the returned mask) when
// that can matter: two selected entries share a bucket with different values, or an unselected entry of the
// k-th's bucket is above a selected one.  Both are checked exactly (one compare pass over the tile in L1) and
// are rare, since a bucket is narrow; float32 values that came from bf16 (low bits zero) never hit them.
// The whole tile is handed back on a NaN or a row whose k-th is -inf, as in forward_tile.
constexpr int kKeyedK = 5;

template <int K>
uint32_t forward_tile_f32_keyed(const float* x, int64_t rows_here, int64_t n, int k, bool renormalize, float* tb,
                                float* probs, int64_t* indices) {
  constexpr int V = Vec::size();
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  const uint32_t all = rows_here >= 32 ? ~0u : (1u << rows_here) - 1u;
  if (rows_here < V) std::fill(tb, tb + n * V, 0.f);  // a partial tile's spare lanes: finite, ignored
  transpose_tile(x, n, tb, rows_here, n);
  const int32_t* bits = reinterpret_cast<const int32_t*>(tb);
  int32_t* keys = reinterpret_cast<int32_t*>(tb + n * V);
  int32_t mag_max[V] = {};  // per lane, so that the loop stays vertical
  for (int64_t j = 0; j < n; ++j) {  // plain integer arithmetic: the compiler vectorises it
    for (int l = 0; l < V; ++l) {
      const int32_t v = bits[j * V + l], neg = v >> 31, mag = v & 0x7FFFFFFF;
      mag_max[l] = std::max(mag_max[l], mag);
      const int32_t ordered = (v ^ (neg & 0x7FFFFFFF)) - neg;  // -|v| or |v|: -0 and +0 both 0
      keys[j * V + l] = static_cast<int32_t>((static_cast<uint32_t>(ordered) & ~0x3FFu) | static_cast<uint32_t>(1023 - j));
    }
  }
  if (*std::max_element(mag_max, mag_max + V) > 0x7F800000) return all;  // a NaN
  IVec slot[K];
  select_keys<K>(n, slot, [&](int64_t j) { return IVec::loadu(keys + j * V); });
  int32_t sk[K][V];
  float sv[K][V], si[K][V], low[V];
  for (int p = 0; p < K; ++p) slot[p].store(sk[p]);
  uint32_t redo = 0;
  for (int l = 0; l < V; ++l) {
    low[l] = std::numeric_limits<float>::infinity();
    for (int p = 0; p < K; ++p) {
      const int32_t i = l < rows_here ? 1023 - (sk[p][l] & 0x3FF) : 0;
      sv[p][l] = l < rows_here ? x[l * n + i] : 0.f;
      si[p][l] = static_cast<float>(i);
      if ((sk[p][l] >> 10) == (sk[K - 1][l] >> 10)) low[l] = std::min(low[l], sv[p][l]);  // the k-th bucket's lowest
      if (p > 0 && (sk[p][l] >> 10) == (sk[p - 1][l] >> 10) && sv[p][l] != sv[p - 1][l]) redo |= 1u << l;
    }
  }
  for (int l = 0; l < rows_here; ++l)
    if (sv[k - 1][l] == ninf) return all;
  int32_t kth[V], flag[V] = {};
  for (int l = 0; l < V; ++l) kth[l] = sk[K - 1][l];
  for (int64_t j = 0; j < n; ++j)  // an unselected entry above a selected one: only in the k-th's bucket
    for (int l = 0; l < V; ++l) flag[l] |= static_cast<int32_t>(keys[j * V + l] < kth[l]) & static_cast<int32_t>(tb[j * V + l] > low[l]);
  for (int l = 0; l < rows_here; ++l)
    if (flag[l] != 0) redo |= 1u << l;
  float pv[K][V];
  if (renormalize) {
    Vec w[K], total(0.f);
    const Vec top = Vec::loadu(sv[0]);
    for (int p = 0; p < K; ++p) total = total + (w[p] = (Vec::loadu(sv[p]) - top).exp());
    for (int p = 0; p < K; ++p) (w[p] / total).store(pv[p]);
  } else {  // slot 0 is each row's maximum (rows not handed back): one more pass over the tile in L1
    const Vec vm = Vec::loadu(sv[0]);
    float m[V], sum[V], lse[V];
    vm.store(m);
    Vec acc(0.f);
    for (int64_t j = 0; j < n; ++j) acc = acc + (Vec::loadu(tb + j * V) - vm).exp_u20();
    acc.store(sum);
    for (int l = 0; l < V; ++l) lse[l] = m[l] == -ninf ? m[l] : m[l] + std::log(sum[l]);
    const Vec vlse = Vec::loadu(lse);
    for (int p = 0; p < K; ++p) (Vec::loadu(sv[p]) - vlse).exp().store(pv[p]);
  }
  for (int l = 0; l < rows_here; ++l) {
    for (int p = 0; p < K; ++p) {
      probs[l * K + p] = pv[p][l];
      indices[l * K + p] = static_cast<int64_t>(si[p][l]);
    }
  }
  return redo;
}

// Which rows of the tile the row path must (re)do: bit l for row l; 0 when the tile path did them all.
template <int K, typename T>
uint32_t forward_tile_any(const T* x, int64_t rows_here, int64_t n, int k, bool renormalize, float* tb, T* probs,
                          int64_t* indices) {
  const uint32_t all = rows_here >= 32 ? ~0u : (1u << rows_here) - 1u;
  if constexpr (!std::is_same_v<T, float>) {
    return forward_tile_keyed<K>(x, rows_here, n, k, renormalize, tb, probs, indices) ? 0u : all;
  } else if constexpr (K >= kKeyedK) {
    return forward_tile_f32_keyed<K>(x, rows_here, n, k, renormalize, tb, probs, indices);
  } else {
    return forward_tile<K>(x, rows_here, n, k, renormalize, tb, probs, indices) ? 0u : all;
  }
}

template <typename T>
uint32_t forward_tile_k(const T* x, int64_t rows_here, int64_t n, int k, bool renormalize, float* tb, T* probs,
                        int64_t* indices) {
  switch (k) {  // K slots kept in registers: one instantiation per k (unused slots would cost work each)
    case 1: return forward_tile_any<1>(x, rows_here, n, k, renormalize, tb, probs, indices);
    case 2: return forward_tile_any<2>(x, rows_here, n, k, renormalize, tb, probs, indices);
    case 3: return forward_tile_any<3>(x, rows_here, n, k, renormalize, tb, probs, indices);
    case 4: return forward_tile_any<4>(x, rows_here, n, k, renormalize, tb, probs, indices);
    case 5: return forward_tile_any<5>(x, rows_here, n, k, renormalize, tb, probs, indices);
    case 6: return forward_tile_any<6>(x, rows_here, n, k, renormalize, tb, probs, indices);
    case 7: return forward_tile_any<7>(x, rows_here, n, k, renormalize, tb, probs, indices);
    default: return forward_tile_any<8>(x, rows_here, n, k, renormalize, tb, probs, indices);
  }
}
