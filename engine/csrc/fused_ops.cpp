// Fused elementwise ops of the own model code on CPU (built by engine/cpu_kernels.py).
//
// rotary_store_kv: one pass over a layer's merged QKV projection [T, (H + 2*Hkv) * D] that rotates
// the q and k heads in place (half-split rotary, cos/sin looked up by position) and copies the
// rotated k rows and the v rows into their KV-cache slots (slot -1 writes nowhere). It replaces
// the table lookup, chunk, four multiplies, add, subtract and cat of the torch path, and store_kv.
//
// add_rms_norm: the residual add of a pre-norm block and the RMSNorm after it, one pass per row:
// residual += x (in place), y = w * residual / sqrt(mean(residual^2) + eps). It replaces the add
// and the ~15 aten ops F.rms_norm runs on CPU (pow, mean = sum + div, add, rsqrt, two muls, casts).
//
// Exactness: each element is computed as the torch path computes it, op by op:
//   o1 = x1*c - x2*s,  o2 = x2*c + x1*s
// with no fused multiply-add (built with -ffp-contract=off), so float32 results are bitwise the
// torch path's (and so transformers' q*cos + rotate_half(q)*sin). For bfloat16 every product and
// sum is rounded to bfloat16 as torch's bfloat16 elementwise ops do.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>
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

// ceil(log2(x)), at least 1 (c10's CeilLog2, which aten's cascade sum uses).
inline int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

// Sum of s[0..n) in aten's order for a contiguous inner reduction of float32
// (ATen/native/cpu/SumKernel.cpp: vectorized_inner_sum -> row_sum -> multi_row_sum) with
// Vectorized<float> of W lanes: the row is read as vectors of W, those as rows of 4 (four
// interleaved accumulators), summed in a cascade of levels of 2^level_power, the four accumulators
// then added in order, the scalar tail added to 0 first and the W lanes after it. Each vector add
// is W lane-wise float adds, emulated here lane by lane: the same roundings in the same order.
template <int W>
float aten_row_sum(const float* s, int64_t n) {
  constexpr int ILP = 4, LEVELS = 4;
  const int64_t vec_size = n / W;
  const int64_t size_ilp = vec_size / ILP;
  float acc[LEVELS][ILP][W] = {};
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size_ilp) / LEVELS);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  auto add_vec = [](float* a, const float* b) {
    for (int l = 0; l < W; ++l) a[l] += b[l];
  };
  int64_t i = 0;
  for (; i + level_step <= size_ilp;) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < ILP; ++k) add_vec(acc[0][k], s + (i * ILP + k) * W);
    for (int j = 1; j < LEVELS; ++j) {
      for (int k = 0; k < ILP; ++k) {
        add_vec(acc[j][k], acc[j - 1][k]);
        for (int l = 0; l < W; ++l) acc[j - 1][k][l] = 0.f;
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size_ilp; ++i)
    for (int k = 0; k < ILP; ++k) add_vec(acc[0][k], s + (i * ILP + k) * W);
  for (int j = 1; j < LEVELS; ++j)
    for (int k = 0; k < ILP; ++k) add_vec(acc[0][k], acc[j][k]);
  for (int64_t v = size_ilp * ILP; v < vec_size; ++v) add_vec(acc[0][0], s + v * W);
  for (int k = 1; k < ILP; ++k) add_vec(acc[0][0], acc[0][k]);
  float total = 0.f;
  for (int64_t k = vec_size * W; k < n; ++k) total += s[k];
  for (int l = 0; l < W; ++l) total += acc[0][0][l];
  return total;
}

// One row: F.rms_norm's composite (ATen/native/layer_norm.cpp rms_norm_symint): upcast to float,
// pow(2), mean (sum, then divide by n), + eps, rsqrt, * rstd, * weight, cast back.
template <typename T, int W>
void add_rms_norm_row(T* x, T* r, const T* w, T* y, float* sq, int64_t n, float eps) {
  const T* src = x;
  if (r != nullptr) {
    for (int64_t i = 0; i < n; ++i)
      r[i] = static_cast<T>(static_cast<float>(r[i]) + static_cast<float>(x[i]));
    src = r;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(src[i]);
    sq[i] = v * v;
  }
  const float mean = aten_row_sum<W>(sq, n) / static_cast<float>(n);
  const float rstd = 1.f / std::sqrt(mean + eps);
  for (int64_t i = 0; i < n; ++i) {
    const float a = static_cast<float>(src[i]) * rstd;
    y[i] = static_cast<T>(a * static_cast<float>(w[i]));
  }
}

template <typename T, int W>
void add_rms_norm_impl(torch::Tensor& x, torch::Tensor* r, const torch::Tensor& w,
                       torch::Tensor& y, double eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  T* xp = x.data_ptr<T>();
  T* rp = r != nullptr ? r->data_ptr<T>() : nullptr;
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const float e = static_cast<float>(eps);
  // A few hundred rows per task: a decode step's 32 rows stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> sq(n);
    for (int64_t t = begin; t < end; ++t)
      add_rms_norm_row<T, W>(xp + t * n, rp != nullptr ? rp + t * n : nullptr, wp, yp + t * n,
                             sq.data(), n, e);
  });
}

}  // namespace

// x [T, n]; residual [T, n] or None; weight [n]. With a residual: residual += x, returns
// rms_norm(residual); without: rms_norm(x). ``vec_width``: lanes of aten's Vectorized<float> in the
// sum kernel this torch build dispatches to (8 for AVX2, 16 for AVX-512), found by the caller.
torch::Tensor add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual,
                           torch::Tensor weight, double eps, int64_t vec_width) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x [T, n], contiguous");
  const int64_t n = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n && weight.is_contiguous(), "weight [n]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "one dtype for x and weight");
  torch::Tensor* r = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type(),
                "residual: x's shape and dtype, contiguous");
    r = &residual.value();
  }
  auto y = torch::empty_like(x);
  const auto dt = x.scalar_type();
  TORCH_CHECK(vec_width == 8 || vec_width == 16, "vec_width 8 or 16");
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16, "add_rms_norm: float32 or bfloat16");
  if (dt == torch::kFloat32) {
    if (vec_width == 8) add_rms_norm_impl<float, 8>(x, r, weight, y, eps);
    else add_rms_norm_impl<float, 16>(x, r, weight, y, eps);
  } else {
    if (vec_width == 8) add_rms_norm_impl<at::BFloat16, 8>(x, r, weight, y, eps);
    else add_rms_norm_impl<at::BFloat16, 16>(x, r, weight, y, eps);
  }
  return y;
}

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
  m.def("add_rms_norm", &add_rms_norm, py::call_guard<py::gil_scoped_release>());
}
