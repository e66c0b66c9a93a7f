// Paged decode attention for CPU (float32): one query token per sequence reads its K/V straight
// from the paged cache, so no gathered copy of the context is ever made.
//   q:      [B, Hkv, G, D]   (query head h = kv_head * G + g, as transformers' repeat_kv)
//   k, v:   [S, Hkv, D]      (S = num_blocks * block_size slots)
//   slots:  [B, Lmax] int64  (context slot of each position; only the first lens[b] are read)
//   lens:   [B] int64
// out:      [B, Hkv, G, D]
// Work is split over sequences with at::parallel_for (torch's intra-op threads).
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
  // One task per sequence: each context slot's K (then V) row holds every KV head back to back
  // ([Hkv, D] floats), so a task streams whole rows in slot order instead of H strided passes.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(H * G * Lmax);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = lp[b];
      const int64_t* sb = sp + b * Lmax;
      const float* qb = qp + b * H * G * D;
      float* ob = op + b * H * G * D;
      for (int64_t l = 0; l < L; ++l) {
        const float* kslot = kp + sb[l] * H * D;
        for (int64_t h = 0; h < H; ++h) {
          const float* kr = kslot + h * D;
          for (int64_t g = 0; g < G; ++g) {
            const float* qr = qb + (h * G + g) * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qr[d] * kr[d];
            scores[(h * G + g) * L + l] = s * sc;
          }
        }
      }
      for (int64_t hg = 0; hg < H * G; ++hg) {
        float* sg = scores.data() + hg * L;
        float m = -INFINITY;
        for (int64_t l = 0; l < L; ++l) m = sg[l] > m ? sg[l] : m;
        float z = 0.f;
        for (int64_t l = 0; l < L; ++l) { sg[l] = std::exp(sg[l] - m); z += sg[l]; }
        const float inv = 1.f / z;
        for (int64_t l = 0; l < L; ++l) sg[l] *= inv;
      }
      for (int64_t i = 0; i < H * G * D; ++i) ob[i] = 0.f;
      for (int64_t l = 0; l < L; ++l) {
        const float* vslot = vp + sb[l] * H * D;
        for (int64_t h = 0; h < H; ++h) {
          const float* vr = vslot + h * D;
          for (int64_t g = 0; g < G; ++g) {
            const float w = scores[(h * G + g) * L + l];
            float* og = ob + (h * G + g) * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) og[d] += w * vr[d];
          }
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode", &paged_decode); }
