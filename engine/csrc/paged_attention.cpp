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
//     zeros (padding rows of a static batch).
// store_kv(k [T, Hkv, D], v, k_cache, v_cache, slot_mapping [T] int64): slot -1 writes nowhere.
//
// float32 and bfloat16 (scores and sums in float32). Work is split over query rows with
// at::parallel_for (torch's intra-op threads); each row streams whole [Hkv, D] K then V rows in
// slot order instead of H strided passes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * static_cast<float>(b[d]);
  return s;
}

template <typename T>
inline void axpy(float w, const T* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += w * static_cast<float>(x[d]);
}

// exp(x) for x <= 0 (scores minus their max), written so the softmax loop vectorizes (std::exp
// does not without -ffast-math): x = n*ln2 + g with n = round(x / ln2), |g| <= ln2 / 2, and e^g
// by its Taylor series to degree 7 (relative error < 1e-8 on that range), times 2^n through the
// exponent bits. Below -87 the result is flushed to e^-87 (~1.6e-38: weight 0 after
// normalisation either way).
inline float exp_nonpos(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float g = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
  float p = 1.f / 5040.f;
  p = p * g + 1.f / 720.f;
  p = p * g + 1.f / 120.f;
  p = p * g + 1.f / 24.f;
  p = p * g + 1.f / 6.f;
  p = p * g + 0.5f;
  p = p * g + 1.f;
  p = p * g + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// One query row (all H heads) over L context positions given by slot_of(l).
template <typename T, typename SlotFn>
inline void attend_row(const T* qrow, const T* kp, const T* vp, T* orow, int64_t L, int64_t Hkv,
                       int64_t G, int64_t D, float scale, SlotFn slot_of,
                       std::vector<float>& scores, std::vector<int64_t>& slots,
                       std::vector<float>& qf, std::vector<float>& acc) {
  const int64_t H = Hkv * G;
  if (L <= 0) {
    for (int64_t i = 0; i < H * D; ++i) orow[i] = static_cast<T>(0.f);
    return;
  }
  if (static_cast<int64_t>(scores.size()) < H * L) scores.resize(H * L);
  if (static_cast<int64_t>(slots.size()) < L) slots.resize(L);
  for (int64_t l = 0; l < L; ++l) slots[l] = slot_of(l);
  for (int64_t i = 0; i < H * D; ++i) qf[i] = static_cast<float>(qrow[i]) * scale;
  for (int64_t l = 0; l < L; ++l) {
    const T* kslot = kp + slots[l] * Hkv * D;
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t g = 0; g < G; ++g)
        scores[(h * G + g) * L + l] = dot(qf.data() + (h * G + g) * D, kslot + h * D, D);
  }
  for (int64_t hg = 0; hg < H; ++hg) {
    float* sg = scores.data() + hg * L;
    float m = -INFINITY;
    for (int64_t l = 0; l < L; ++l) m = sg[l] > m ? sg[l] : m;
    float z = 0.f;
#pragma omp simd reduction(+ : z)
    for (int64_t l = 0; l < L; ++l) {
      sg[l] = exp_nonpos(sg[l] - m);
      z += sg[l];
    }
    const float inv = 1.f / z;
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) sg[l] *= inv;
  }
  std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t l = 0; l < L; ++l) {
    const T* vslot = vp + slots[l] * Hkv * D;
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t g = 0; g < G; ++g)
        axpy(scores[(h * G + g) * L + l], vslot + h * D, acc.data() + (h * G + g) * D, D);
  }
  for (int64_t i = 0; i < H * D; ++i) orow[i] = static_cast<T>(acc[i]);
}

template <typename scalar_t>
void varlen_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                 torch::Tensor& out, const torch::Tensor& bt, const torch::Tensor& qsl,
                 const torch::Tensor& seq_lens, int64_t block_size, float scale) {
  const int64_t num_rows = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), G = H / Hkv;
  const int64_t N = seq_lens.size(0), max_blocks = bt.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int32_t* btp = bt.data_ptr<int32_t>();
  const int32_t* qs = qsl.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  std::vector<int32_t> seq_of(num_rows, -1);
  for (int64_t n = 0; n < N; ++n)
    for (int32_t t = qs[n]; t < qs[n + 1]; ++t) seq_of[t] = static_cast<int32_t>(n);
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf(H * D), acc(H * D);
    std::vector<int64_t> slots;
    for (int64_t t = begin; t < end; ++t) {
      const int32_t n = seq_of[t];
      int64_t L = 0;
      if (n >= 0) {
        const int64_t q_len = qs[n + 1] - qs[n];
        L = sl[n] - q_len + (t - qs[n]) + 1;
      }
      const int32_t* row_bt = btp + (n >= 0 ? n : 0) * max_blocks;
      auto slot_of = [&](int64_t l) -> int64_t {
        return static_cast<int64_t>(row_bt[l / block_size]) * block_size + l % block_size;
      };
      attend_row<scalar_t>(qp + t * H * D, kp, vp, op + t * H * D, L, Hkv, G, D, scale, slot_of,
                           scores, slots, qf, acc);
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
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  auto out = torch::empty_like(q);
  if (q.scalar_type() == torch::kFloat32) {
    varlen_impl<float>(q, k, v, out, block_tables, query_start_loc, seq_lens, block_size,
                       static_cast<float>(scale));
  } else if (q.scalar_type() == torch::kBFloat16) {
    varlen_impl<at::BFloat16>(q, k, v, out, block_tables, query_start_loc, seq_lens, block_size,
                              static_cast<float>(scale));
  } else {
    TORCH_CHECK(false, "paged_attention: float32 or bfloat16");
  }
  return out;
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
                           torch::Tensor lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32,
              "paged_decode: float32 only");
  q = q.contiguous();
  const int64_t B = q.size(0), Hkv = q.size(1), G = q.size(2), D = q.size(3);
  const int64_t Lmax = slots.size(1);
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && slots.is_contiguous());
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf(Hkv * G * D), acc(Hkv * G * D);
    std::vector<int64_t> slots;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* sb = sp + b * Lmax;
      attend_row<float>(qp + b * Hkv * G * D, kp, vp, op + b * Hkv * G * D, lp[b], Hkv, G, D, sc,
                        [&](int64_t l) { return sb[l]; }, scores, slots, qf, acc);
    }
  });
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention);
  m.def("paged_decode", &paged_decode);
  m.def("store_kv", &store_kv);
}
