// Paged attention for CPU: queries read K/V straight from the paged cache, so no gathered copy of
// the context is ever made. KV cache per layer: [S, Hkv, D] (S = num_blocks * block_size slots, a
// slot = block_id * block_size + offset). Query head h reads KV head h / G (G = H / Hkv), as
// transformers' repeat_kv.
//
// paged_decode(q [B, Hkv, G, D], k, v, slots [B, Lmax] int64, lens [B] int64, scale)
//     one query per sequence over explicit context slots (the transformers-module path).
// paged_attention(q [T, H, D], k, v, block_tables [N, max_blocks] int32,
//                 query_start_loc [N + 1] int32, seq_lens [N] int32, block_size, scale)
//     varlen, causal: sequence n owns query rows [qsl[n], qsl[n+1]); they are the last
//     q_len = qsl[n+1] - qsl[n] of its seq_lens[n] tokens (whose K/V are already stored), so row i
//     of it attends to the first seq_lens[n] - q_len + i + 1 tokens. Decode (q_len 1), prefill over
//     cached context and speculative verification are one call. A sequence with seq_len 0 gives
//     zeros (padding rows of a static batch), as do rows no sequence owns.
// store_kv(k [T, Hkv, D], v, k_cache, v_cache, slot_mapping [T] int64): slot -1 writes nowhere.
//
// float32 and bfloat16 (K/V widened to float32 as they are read; scores, softmax and sums in
// float32).
//
// How the work is cut: a "query vector" is one (row, query head) pair. A work item is up to 16
// query vectors of one sequence that share a KV head (the G heads of a row, then the next rows:
// a prefill chunk's rows share their context), for one KV head or for all of them. An item walks
// the context in tiles of 16 positions; each K/V row of a tile is read once for all of the
// item's query vectors and all of its heads, block by block in slot order. Per tile and vector:
// 16 dot products, vectorized along D, then reduced to one vector of 16 scores by a transpose
// tree (no horizontal sum per dot product); online softmax (running max and sum, the
// accumulator rescaled when the max grows); P @ V into float32 accumulators. A prefill tile's
// bfloat16 K/V rows are widened once into scratch, a decode tile's as they are loaded. Items are
// sorted by cost and taken from a shared counter by torch's intra-op threads (at::parallel_for),
// so a long prefill chunk beside short decodes does not leave a thread idle. Scratch buffers
// are per thread and reused across calls.
//
// Vectors are GCC/Clang vector extensions (16 floats): AVX-512 registers where the compiler
// targets it (-march=native), pairs of AVX2 or quads of SSE/NEON registers elsewhere. The few
// cross-lane steps have an AVX-512 version and a portable one.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;    // floats per vector = positions per tile
constexpr int kMaxVecs = 16;  // query vectors per work item

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf splat(float x) { return vf{} + x; }

inline vf load(const float* p) {
  vf r;
  std::memcpy(&r, p, sizeof(vf));
  return r;
}

inline vf load(const at::BFloat16* p) {
#if defined(__AVX512F__)
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
#else
  uint16_t raw[kLanes];
  std::memcpy(raw, p, sizeof(raw));
  vi r;
  for (int i = 0; i < kLanes; ++i) r[i] = static_cast<int32_t>(static_cast<uint32_t>(raw[i]) << 16);
  vf f;
  std::memcpy(&f, &r, sizeof(f));
  return f;
#endif
}

inline float hsum(vf x) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(x);
#else
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
#endif
}

inline float hmax(vf x) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(x);
#else
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = x[i] > m ? x[i] : m;
  return m;
#endif
}

// out[i] = sum of the lanes of in[i], for 16 vectors: a transpose tree (halves, quarters, pairs,
// singles), 15 vector adds instead of 16 horizontal sums.
inline vf hsum16(const vf* in) {
#if defined(__AVX512F__)
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i) {  // [a.q0 a.q1 b.q0 b.q1] + [a.q2 a.q3 b.q2 b.q3]
    const __m512 a = in[2 * i], b = in[2 * i + 1];
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int j = 0; j < 4; ++j) {  // 4-lane partials of 4 inputs, one per quarter
    const __m512 x = t[2 * j], y = t[2 * j + 1];
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int k = 0; k < 2; ++k) {  // pairs within each quarter
    const __m512 x = u[2 * k], y = u[2 * k + 1];
    w[k] = _mm512_add_ps(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4 * q + j of r holds input 4 * j + q
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
#else
  vf r;
  for (int i = 0; i < kLanes; ++i) r[i] = hsum(in[i]);
  return r;
#endif
}

// exp(x) for x <= 0 (scores minus their max), vectorized (std::exp is not, without
// -ffast-math): x = n*ln2 + g with n = round(x / ln2), |g| <= ln2 / 2, e^g by its Taylor series
// to degree 7 (relative error < 1e-8 on that range), times 2^n through the exponent bits. Below
// -87 the result is e^-87 (~1.6e-38); callers zero the lanes that must weigh nothing.
inline vf exp_nonpos(vf x) {
  const vf lo = splat(-87.f);
  x = x < lo ? lo : x;
  const vf round = splat(12582912.f);  // 1.5 * 2^23: adding and subtracting rounds to nearest
  const vf n = (x * 1.44269504088896341f + round) - round;
  const vf g = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
  vf p = splat(1.f / 5040.f);
  p = p * g + 1.f / 720.f;
  p = p * g + 1.f / 120.f;
  p = p * g + 1.f / 24.f;
  p = p * g + 1.f / 6.f;
  p = p * g + 0.5f;
  p = p * g + 1.f;
  p = p * g + 1.f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

const vi kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Where a sequence's context positions live: block tables (paged_attention) or one explicit
// slot per position (paged_decode).
struct BlockTableSlots {
  const int32_t* bt;
  int64_t max_blocks, block_size;
  void fill(int64_t n, int64_t p0, int64_t count, int64_t* out) const {
    const int32_t* row = bt + n * max_blocks;
    int64_t b = p0 / block_size, o = p0 % block_size;
    for (int64_t p = 0; p < count; ++p) {
      out[p] = static_cast<int64_t>(row[b]) * block_size + o;
      if (++o == block_size) o = 0, ++b;
    }
  }
};

struct ExplicitSlots {
  const int64_t* slots;
  int64_t lmax;
  void fill(int64_t n, int64_t p0, int64_t count, int64_t* out) const {
    std::memcpy(out, slots + n * lmax + p0, count * sizeof(int64_t));
  }
};

struct Item {
  int32_t n;       // sequence
  int32_t v0, v1;  // query vectors [v0, v1) of the sequence: vector v = row (v / G), head (v % G)
  int32_t h0, h1;  // KV heads
  int64_t cost;
};

// Per-thread buffers, grown on demand and kept across calls.
struct Scratch {
  std::vector<vf> q, acc, kt, vt;  // [heads][vecs][DV], [heads][vecs][DV], [16][DV] x2
  std::vector<float> mx, sum;      // [heads][vecs]
};

thread_local Scratch tls_scratch;

struct Shape {
  int64_t H, Hkv, G, D, DV;  // DV = vectors per head row (D rounded up to 16)
};

// One work item. DV_T > 0 fixes the vectors per head row at compile time (D = 64, 128).
template <int DV_T, typename T, typename Slots>
void run_item(const Item& it, const Shape& s, const T* qp, const T* kp, const T* vp, T* op,
              const int32_t* qs, const int32_t* sl, const Slots& slots, float scale) {
  const int64_t DV = DV_T > 0 ? DV_T : s.DV;
  const int64_t D = s.D, G = s.G, H = s.H, Hkv = s.Hkv;
  const int64_t M = it.v1 - it.v0, NH = it.h1 - it.h0;
  const int64_t q_len = qs[it.n + 1] - qs[it.n];
  const int64_t ctx0 = sl[it.n] - q_len;  // context before the first row
  const int64_t row0 = qs[it.n];

  Scratch& sc = tls_scratch;
  const size_t state = static_cast<size_t>(NH * M * DV);
  if (sc.q.size() < state) sc.q.resize(state), sc.acc.resize(state);
  if (sc.mx.size() < static_cast<size_t>(NH * M)) sc.mx.resize(NH * M), sc.sum.resize(NH * M);
  if (sc.kt.size() < static_cast<size_t>(kLanes * DV))
    sc.kt.resize(kLanes * DV), sc.vt.resize(kLanes * DV);
  vf* qv = sc.q.data();
  vf* acc = sc.acc.data();
  float* mx = sc.mx.data();
  float* sum = sc.sum.data();

  int64_t lim[kMaxVecs];  // context length of each vector's row
  int64_t lmax = 0;
  for (int64_t m = 0; m < M; ++m) {
    lim[m] = ctx0 + (it.v0 + m) / G + 1;
    lmax = std::max(lmax, lim[m]);
  }
  for (int64_t hh = 0; hh < NH; ++hh) {
    for (int64_t m = 0; m < M; ++m) {
      const int64_t v = it.v0 + m;
      const T* src = qp + (row0 + v / G) * H * D + ((it.h0 + hh) * G + v % G) * D;
      vf* dst = qv + (hh * M + m) * DV;
      float tmp[kLanes];
      for (int64_t c = 0; c < DV; ++c) {
        const int64_t w = std::min<int64_t>(kLanes, D - c * kLanes);
        for (int i = 0; i < kLanes; ++i)
          tmp[i] = i < w ? static_cast<float>(src[c * kLanes + i]) : 0.f;
        dst[c] = load(tmp) * scale;
      }
      for (int64_t c = 0; c < DV; ++c) acc[(hh * M + m) * DV + c] = vf{};
      mx[hh * M + m] = -std::numeric_limits<float>::infinity();
      sum[hh * M + m] = 0.f;
    }
  }

  const int64_t row_stride = Hkv * D;
  int64_t tile_slots[kLanes];
  vf part[kLanes];
  alignas(64) float w[kLanes];
  // The query vectors of one head against one tile, K/V rows given as pointers to float32 or
  // bfloat16 rows (widened as they are loaded).
  auto tile = [&](int64_t hh, int64_t p0, int64_t nv, auto* const* krow, auto* const* vrow) {
    for (int64_t m = 0; m < M; ++m) {
      if (lim[m] <= p0) continue;  // this vector's context ended before the tile
      const int64_t valid = std::min(nv, lim[m] - p0);
      const vf* q = qv + (hh * M + m) * DV;
      // scores of the tile's positions: dot products along D, then one transpose tree
      if (nv == kLanes) {
        for (int p = 0; p < kLanes; ++p) {
          vf a = q[0] * load(krow[p]);
          for (int64_t c = 1; c < DV; ++c) a += q[c] * load(krow[p] + c * kLanes);
          part[p] = a;
        }
      } else {
        for (int64_t p = 0; p < kLanes; ++p) {
          vf a = vf{};
          if (p < nv)
            for (int64_t c = 0; c < DV; ++c) a += q[c] * load(krow[p] + c * kLanes);
          part[p] = a;
        }
      }
      vf sv = hsum16(part);
      const vi in_ctx = kIota < static_cast<int32_t>(valid);
      sv = in_ctx ? sv : splat(-std::numeric_limits<float>::infinity());
      // online softmax: rescale what was summed so far when the running max grows
      float& m_run = mx[hh * M + m];
      float& z = sum[hh * M + m];
      vf* a = acc + (hh * M + m) * DV;
      const float m_new = std::max(m_run, hmax(sv));
      if (m_new > m_run && z > 0.f) {
        const float corr = std::exp(m_run - m_new);
        z *= corr;
        for (int64_t c = 0; c < DV; ++c) a[c] *= corr;
      }
      m_run = m_new;
      vf pv = exp_nonpos(sv - m_new);
      pv = in_ctx ? pv : vf{};
      z += hsum(pv);
      std::memcpy(w, &pv, sizeof(w));
      if (DV_T > 0) {
        vf r[DV_T > 0 ? DV_T : 1];
        for (int64_t c = 0; c < DV; ++c) r[c] = a[c];
        for (int64_t p = 0; p < valid; ++p)
          for (int64_t c = 0; c < DV; ++c) r[c] += w[p] * load(vrow[p] + c * kLanes);
        for (int64_t c = 0; c < DV; ++c) a[c] = r[c];
      } else {
        for (int64_t p = 0; p < valid; ++p)
          for (int64_t c = 0; c < DV; ++c) a[c] += w[p] * load(vrow[p] + c * kLanes);
      }
    }
  };
  // Rows are read in place when D is whole vectors; bfloat16 rows are widened into scratch
  // first when enough query vectors share them (a prefill tile), else as they are loaded.
  const bool in_place = D % kLanes == 0 && (std::is_same<T, float>::value || M <= 4);
  const T* krow_t[kLanes];
  const T* vrow_t[kLanes];
  const float* krow_f[kLanes];
  const float* vrow_f[kLanes];
  for (int64_t p0 = 0; p0 < lmax; p0 += kLanes) {
    const int64_t nv = std::min<int64_t>(kLanes, lmax - p0);
    slots.fill(it.n, p0, nv, tile_slots);
    for (int64_t hh = 0; hh < NH; ++hh) {
      const int64_t head_off = (it.h0 + hh) * D;
      if (in_place) {
        for (int64_t p = 0; p < nv; ++p) {
          krow_t[p] = kp + tile_slots[p] * row_stride + head_off;
          vrow_t[p] = vp + tile_slots[p] * row_stride + head_off;
        }
        tile(hh, p0, nv, krow_t, vrow_t);
      } else {
        for (int64_t p = 0; p < nv; ++p) {
          const T* ks = kp + tile_slots[p] * row_stride + head_off;
          const T* vs = vp + tile_slots[p] * row_stride + head_off;
          vf* kd = sc.kt.data() + p * DV;
          vf* vd = sc.vt.data() + p * DV;
          if (D % kLanes == 0) {
            for (int64_t c = 0; c < DV; ++c)
              kd[c] = load(ks + c * kLanes), vd[c] = load(vs + c * kLanes);
          } else {
            for (int64_t c = 0; c < DV; ++c)
              for (int i = 0; i < kLanes; ++i) {
                const int64_t d = c * kLanes + i;
                kd[c][i] = d < D ? static_cast<float>(ks[d]) : 0.f;
                vd[c][i] = d < D ? static_cast<float>(vs[d]) : 0.f;
              }
          }
          krow_f[p] = reinterpret_cast<const float*>(kd);
          vrow_f[p] = reinterpret_cast<const float*>(vd);
        }
        tile(hh, p0, nv, krow_f, vrow_f);
      }
    }
  }

  for (int64_t hh = 0; hh < NH; ++hh) {
    for (int64_t m = 0; m < M; ++m) {
      const int64_t v = it.v0 + m;
      T* dst = op + (row0 + v / G) * H * D + ((it.h0 + hh) * G + v % G) * D;
      const float z = sum[hh * M + m];
      const float inv = z > 0.f ? 1.f / z : 0.f;  // no context: zeros
      const float* a = reinterpret_cast<const float*>(acc + (hh * M + m) * DV);
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(a[d] * inv);
    }
  }
}

// q/out [T, H, D]; sequence n owns rows [qs[n], qs[n+1]) and has sl[n] tokens of context.
template <typename T, typename Slots>
void attend(const T* qp, const T* kp, const T* vp, T* op, int64_t T_rows, const Shape& s,
            const int32_t* qs, const int32_t* sl, int64_t N, const Slots& slots, float scale) {
  const int64_t row_elems = s.H * s.D;
  // Rows no live sequence owns (padding) give zeros.
  std::vector<char> owned(T_rows, 0);
  std::vector<Item> items;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t q_len = qs[n + 1] - qs[n];
    if (q_len <= 0 || sl[n] <= 0) continue;
    std::fill(owned.begin() + qs[n], owned.begin() + qs[n + 1], 1);
    const int64_t nvec = q_len * s.G;
    for (int64_t v0 = 0; v0 < nvec; v0 += kMaxVecs) {
      const int64_t v1 = std::min(nvec, v0 + kMaxVecs);
      const int64_t ctx = std::max<int64_t>(0, sl[n] - q_len + (v1 - 1) / s.G + 1);
      items.push_back({static_cast<int32_t>(n), static_cast<int32_t>(v0),
                       static_cast<int32_t>(v1), 0, static_cast<int32_t>(s.Hkv),
                       (v1 - v0) * ctx * s.Hkv});
    }
  }
  for (int64_t t = 0; t < T_rows; ++t)
    if (!owned[t]) std::fill(op + t * row_elems, op + (t + 1) * row_elems, static_cast<T>(0.f));

  const int64_t threads = at::get_num_threads();
  if (static_cast<int64_t>(items.size()) < 4 * threads && s.Hkv > 1) {
    // Too few items to keep every thread busy: one KV head per item.
    std::vector<Item> split;
    for (const Item& it : items)
      for (int32_t h = 0; h < s.Hkv; ++h)
        split.push_back({it.n, it.v0, it.v1, h, h + 1, it.cost / s.Hkv});
    items.swap(split);
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(items.size());
  at::parallel_for(0, std::min(threads, count), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
      if (s.DV == 4)
        run_item<4>(items[i], s, qp, kp, vp, op, qs, sl, slots, scale);
      else if (s.DV == 8)
        run_item<8>(items[i], s, qp, kp, vp, op, qs, sl, slots, scale);
      else
        run_item<0>(items[i], s, qp, kp, vp, op, qs, sl, slots, scale);
    }
  });
}

}  // namespace

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                              torch::Tensor block_tables, torch::Tensor query_start_loc,
                              torch::Tensor seq_lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q [T,H,D], k/v [S,Hkv,D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type());
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "KV cache must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 &&
                  query_start_loc.scalar_type() == torch::kInt32 &&
                  seq_lens.scalar_type() == torch::kInt32,
              "block_tables, query_start_loc, seq_lens: int32");
  TORCH_CHECK(q.size(1) % k.size(1) == 0 && q.size(2) == k.size(2));
  TORCH_CHECK(query_start_loc.size(0) == seq_lens.size(0) + 1);
  TORCH_CHECK(block_size > 0);
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  query_start_loc = query_start_loc.contiguous();
  seq_lens = seq_lens.contiguous();
  auto out = torch::empty_like(q);
  const int64_t H = q.size(1), D = q.size(2), Hkv = k.size(1);
  const Shape s{H, Hkv, H / Hkv, D, (D + kLanes - 1) / kLanes};
  const BlockTableSlots slots{block_tables.data_ptr<int32_t>(), block_tables.size(1), block_size};
  const int32_t* qs = query_start_loc.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  const int64_t N = seq_lens.size(0);
  TORCH_CHECK(qs[N] <= q.size(0), "query_start_loc past the last query row");
  const float sc = static_cast<float>(scale);
  if (q.scalar_type() == torch::kFloat32) {
    attend<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                  out.data_ptr<float>(), q.size(0), s, qs, sl, N, slots, sc);
  } else if (q.scalar_type() == torch::kBFloat16) {
    attend<at::BFloat16>(q.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(),
                         v.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), q.size(0), s,
                         qs, sl, N, slots, sc);
  } else {
    TORCH_CHECK(false, "paged_attention: float32 or bfloat16");
  }
  return out;
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
                           torch::Tensor lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
                  v.scalar_type() == torch::kFloat32,
              "paged_decode: float32 only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 3 && v.dim() == 3, "q [B,Hkv,G,D], k/v [S,Hkv,D]");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && lens.scalar_type() == torch::kInt64);
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && slots.is_contiguous());
  q = q.contiguous();
  lens = lens.contiguous();
  const int64_t B = q.size(0), Hkv = q.size(1), G = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(1) == Hkv && k.size(2) == D);
  auto out = torch::empty_like(q);
  const Shape s{Hkv * G, Hkv, G, D, (D + kLanes - 1) / kLanes};
  std::vector<int32_t> qs(B + 1), sl(B);
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    qs[b + 1] = static_cast<int32_t>(b + 1);
    TORCH_CHECK(lp[b] <= slots.size(1), "paged_decode: a length exceeds the slot table");
    sl[b] = static_cast<int32_t>(lp[b]);
  }
  attend<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                out.data_ptr<float>(), B, s, qs.data(), sl.data(), B,
                ExplicitSlots{slots.data_ptr<int64_t>(), slots.size(1)},
                static_cast<float>(scale));
  return out;
}

void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping) {
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64);
  k = k.contiguous();
  v = v.contiguous();
  const int64_t T = k.size(0), row = k.size(1) * k.size(2), S = k_cache.size(0);
  TORCH_CHECK(k_cache.size(1) * k_cache.size(2) == row);
  const int64_t* sp = slot_mapping.data_ptr<int64_t>();
  const int64_t bytes = row * k.element_size();
  auto* kd = static_cast<char*>(k_cache.data_ptr());
  auto* vd = static_cast<char*>(v_cache.data_ptr());
  const auto* ks = static_cast<const char*>(k.data_ptr());
  const auto* vs = static_cast<const char*>(v.data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = sp[t];
    if (s < 0) continue;
    TORCH_CHECK(s < S, "slot out of range");
    std::memcpy(kd + s * bytes, ks + t * bytes, bytes);
    std::memcpy(vd + s * bytes, vs + t * bytes, bytes);
  }
}

// The kernels touch no Python object, so they run without the GIL: on a serving replica the
// engine loop shares its process with Serve's event loop, which streams tokens meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("paged_attention", &paged_attention, release());
  m.def("paged_decode", &paged_decode, release());
  m.def("store_kv", &store_kv, release());
}
