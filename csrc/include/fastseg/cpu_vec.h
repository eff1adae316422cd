// Vectorized helpers for the CPU kernels (compiled per CPU capability).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace fastseg::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// exp(x) for x <= 0 (softmax arguments are shifted by the max), inlined: ATen's exp() calls
// out to Sleef (about 3x slower here) and exp_u20() is off by up to 4 ulp. Cody-Waite range
// reduction x = n ln2 + r, |r| <= ln2 / 2, and a degree-7 Taylor polynomial (truncation
// 6e-9 relative) give <= 1 ulp measured on [-87, 0]. Below -87.3 the result would be
// subnormal; it is clamped there (absolute error < 1e-38). NaN propagates.
inline Vectorized<float> exp_nonpositive(Vectorized<float> x) {
  using V = Vectorized<float>;
  const V clamped = at::vec::maximum(x, V(-87.3f));
  const V n = (clamped * V(1.44269504088896341f)).round();
  V r = at::vec::fmadd(n, V(-0.693145751953125f), clamped);  // ln2 split: exact hi part
  r = at::vec::fmadd(n, V(-1.428606765330187e-06f), r);
  V p = V(1.0f / 5040.0f);
  p = at::vec::fmadd(p, r, V(1.0f / 720.0f));
  p = at::vec::fmadd(p, r, V(1.0f / 120.0f));
  p = at::vec::fmadd(p, r, V(1.0f / 24.0f));
  p = at::vec::fmadd(p, r, V(1.0f / 6.0f));
  p = at::vec::fmadd(p, r, V(0.5f));
  p = at::vec::fmadd(p, r, V(1.0f));
  p = at::vec::fmadd(p, r, V(1.0f));
  // 2^n from the exponent bits; n is in [-126, 0] after the clamp.
  const auto bits = (at::vec::convert_to_int_of_same_size(n) + Vectorized<int32_t>(127))
                    << Vectorized<int32_t>(23);
  return p * at::vec::cast<float>(bits);
}

inline Vectorized<double> exp_nonpositive(Vectorized<double> x) { return x.exp(); }

// max(a, b) that may drop a NaN (one instruction instead of ATen's three): used for the
// softmax shift only, where a NaN logit still reaches the result through exp(x - max).
template <typename T>
inline Vectorized<T> max_for_shift(Vectorized<T> a, Vectorized<T> b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_max_ps(a, b);
#endif
  return at::vec::maximum(a, b);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastseg::cpu
