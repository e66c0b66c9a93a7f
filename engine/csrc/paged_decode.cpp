// Paged decode attention for CPU (float32): one query token per sequence reads its K/V straight
// from the paged cache, so no gathered copy of the context is ever made.
//   q:      [B, Hkv, G, D]   (query head h = kv_head * G + g, as transformers' repeat_kv)
//   k, v:   [S, Hkv, D]      (S = num_blocks * block_size slots)
//   slots:  [B, Lmax] int64  (context slot of each position; only the first lens[b] are read)
//   lens:   [B] int64
// out:      [B, Hkv, G, D]
// Work is split over (sequence, kv head) pairs with at::parallel_for (torch's intra-op threads).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
                           torch::Tensor lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32,
              "paged_decode: float32 only");
  q = q.contiguous();
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3);
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
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * Lmax);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / H, h = idx % H, L = lp[b];
      const float* qb = qp + idx * G * D;
      float* ob = op + idx * G * D;
      for (int64_t l = 0; l < L; ++l) {
        const float* kr = kp + (sp[b * Lmax + l] * H + h) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qr = qb + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qr[d] * kr[d];
          scores[g * L + l] = s * sc;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        float m = -INFINITY;
        for (int64_t l = 0; l < L; ++l) m = sg[l] > m ? sg[l] : m;
        float z = 0.f;
        for (int64_t l = 0; l < L; ++l) { sg[l] = std::exp(sg[l] - m); z += sg[l]; }
        const float inv = 1.f / z;
        for (int64_t l = 0; l < L; ++l) sg[l] *= inv;
      }
      for (int64_t i = 0; i < G * D; ++i) ob[i] = 0.f;
      for (int64_t l = 0; l < L; ++l) {
        const float* vr = vp + (sp[b * Lmax + l] * H + h) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float w = scores[g * L + l];
          float* og = ob + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) og[d] += w * vr[d];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode", &paged_decode); }
