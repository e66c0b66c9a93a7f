// Fused elementwise ops of the own model code on CPU (built by engine/cpu_kernels.py).
//
// rotary_store_kv: one pass over a layer's merged QKV projection [T, (H + 2*Hkv) * D] that rotates
// the q and k heads in place (half-split rotary, cos/sin looked up by position) and copies the
// rotated k rows and the v rows into their KV-cache slots (slot -1 writes nowhere). It replaces
// the table lookup, chunk, four multiplies, add, subtract and cat of the torch path, and store_kv.
//
// Exactness: each element is computed as the torch path computes it, op by op:
//   o1 = x1*c - x2*s,  o2 = x2*c + x1*s
// with no fused multiply-add (built with -ffp-contract=off), so float32 results are bitwise the
// torch path's (and so transformers' q*cos + rotate_half(q)*sin). For bfloat16 every product and
// sum is rounded to bfloat16 as torch's bfloat16 elementwise ops do.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>

namespace {

template <typename T>
inline void rotate_head(T* x, const T* c, const T* s, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]);
    const float x2 = static_cast<float>(x[i + half]);
    const float ci = static_cast<float>(c[i]);
    const float si = static_cast<float>(s[i]);
    if constexpr (std::is_same_v<T, float>) {
      const float a = x1 * ci;
      const float b = x2 * si;
      const float d = x2 * ci;
      const float e = x1 * si;
      x[i] = a - b;
      x[i + half] = d + e;
    } else {
      // Round after every op, as torch's bfloat16 mul/sub/add do.
      const float a = static_cast<float>(static_cast<T>(x1 * ci));
      const float b = static_cast<float>(static_cast<T>(x2 * si));
      const float d = static_cast<float>(static_cast<T>(x2 * ci));
      const float e = static_cast<float>(static_cast<T>(x1 * si));
      x[i] = static_cast<T>(a - b);
      x[i + half] = static_cast<T>(d + e);
    }
  }
}

template <typename T>
void rotary_store_impl(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                       const torch::Tensor& positions, torch::Tensor& k_cache,
                       torch::Tensor& v_cache, const torch::Tensor& slot_mapping, int64_t H,
                       int64_t Hkv, int64_t D) {
  const int64_t T_ = qkv.size(0), row_stride = qkv.stride(0), half = D / 2;
  const int64_t P = cos.size(0), S = k_cache.size(0), kv_row = Hkv * D;
  T* base = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  for (int64_t t = 0; t < T_; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "position out of the rotary table");
    TORCH_CHECK(slots[t] < S, "slot out of range");
  }
  // ~(H + 2*Hkv) * D elements per row: small rows, so many per task.
  const int64_t grain = std::max<int64_t>(1, 16384 / ((H + 2 * Hkv) * D));
  at::parallel_for(0, T_, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* row = base + t * row_stride;
      const T* c = cp + pos[t] * half;
      const T* s = sp + pos[t] * half;
      for (int64_t h = 0; h < H + Hkv; ++h) rotate_head(row + h * D, c, s, half);
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      std::memcpy(kc + slot * kv_row, row + H * D, kv_row * sizeof(T));
      std::memcpy(vc + slot * kv_row, row + (H + Hkv) * D, kv_row * sizeof(T));
    }
  });
}

}  // namespace

void rotary_store_kv(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                     torch::Tensor positions, torch::Tensor k_cache, torch::Tensor v_cache,
                     torch::Tensor slot_mapping, int64_t num_heads, int64_t num_kv_heads,
                     int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv [T, (H + 2*Hkv) * D], rows contiguous");
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim, "qkv width");
  TORCH_CHECK(head_dim % 2 == 0, "head_dim must be even");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
                  cos.dim() == 2 && cos.size(1) == head_dim / 2,
              "cos/sin [P, D/2], contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  TORCH_CHECK(k_cache.size(1) * k_cache.size(2) == num_kv_heads * head_dim, "KV cache row");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.is_contiguous() &&
                  slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous(),
              "positions, slot_mapping: contiguous int64");
  TORCH_CHECK(positions.size(0) == qkv.size(0) && slot_mapping.size(0) == qkv.size(0));
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(cos.scalar_type() == dt && k_cache.scalar_type() == dt &&
                  v_cache.scalar_type() == dt,
              "one dtype for qkv, cos/sin and the KV cache");
  if (dt == torch::kFloat32) {
    rotary_store_impl<float>(qkv, cos, sin, positions, k_cache, v_cache, slot_mapping, num_heads,
                             num_kv_heads, head_dim);
  } else if (dt == torch::kBFloat16) {
    rotary_store_impl<at::BFloat16>(qkv, cos, sin, positions, k_cache, v_cache, slot_mapping,
                                    num_heads, num_kv_heads, head_dim);
  } else {
    TORCH_CHECK(false, "rotary_store_kv: float32 or bfloat16");
  }
}

// Runs without the GIL, as the attention kernels do (csrc/paged_attention.cpp).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rotary_store_kv", &rotary_store_kv, py::call_guard<py::gil_scoped_release>());
}
