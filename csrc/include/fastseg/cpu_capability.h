// Run-time choice among the per-capability builds of a csrc/cpu kernel file (setup.py
// compiles each file with CPU_CAPABILITY = DEFAULT, AVX2 and AVX512 on x86-64). The choice
// follows ATen's own (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY), so a
// fastseg kernel never uses instructions ATen decided against on this machine.
#pragma once

#include <ATen/Version.h>

#include <string>

namespace fastseg::cpu {

enum class Capability { kDefault, kAvx2, kAvx512 };

inline Capability capability() {
  static const Capability chosen = [] {
    const std::string name = at::get_cpu_capability();
#ifdef FASTSEG_HAVE_CPU_AVX512
    if (name == "AVX512") return Capability::kAvx512;
#endif
#ifdef FASTSEG_HAVE_CPU_AVX2
    if (name == "AVX512" || name == "AVX2") return Capability::kAvx2;
#endif
    return Capability::kDefault;
  }();
  return chosen;
}

inline const char* capability_name() {
  switch (capability()) {
    case Capability::kAvx512: return "AVX512";
    case Capability::kAvx2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace fastseg::cpu

// Declares the kernels of the other capability builds (call in the DEFAULT build only).
#define FASTSEG_DECLARE_CPU_VARIANTS(...) \
  FASTSEG_DECLARE_CPU_VARIANT_AVX2(__VA_ARGS__) FASTSEG_DECLARE_CPU_VARIANT_AVX512(__VA_ARGS__)
#ifdef FASTSEG_HAVE_CPU_AVX2
#define FASTSEG_DECLARE_CPU_VARIANT_AVX2(...) namespace AVX2 { __VA_ARGS__ }
#define FASTSEG_CPU_CASE_AVX2(fn, ...) \
  case ::fastseg::cpu::Capability::kAvx2: return AVX2::fn(__VA_ARGS__);
#else
#define FASTSEG_DECLARE_CPU_VARIANT_AVX2(...)
#define FASTSEG_CPU_CASE_AVX2(fn, ...)
#endif
#ifdef FASTSEG_HAVE_CPU_AVX512
#define FASTSEG_DECLARE_CPU_VARIANT_AVX512(...) namespace AVX512 { __VA_ARGS__ }
#define FASTSEG_CPU_CASE_AVX512(fn, ...) \
  case ::fastseg::cpu::Capability::kAvx512: return AVX512::fn(__VA_ARGS__);
#else
#define FASTSEG_DECLARE_CPU_VARIANT_AVX512(...)
#define FASTSEG_CPU_CASE_AVX512(fn, ...)
#endif

// Calls fn from the build that matches this machine (inside namespace fastseg::cpu).
#define FASTSEG_CPU_CALL(fn, ...)                                 \
  [&] {                                                           \
    switch (::fastseg::cpu::capability()) {                       \
      FASTSEG_CPU_CASE_AVX512(fn, __VA_ARGS__)                    \
      FASTSEG_CPU_CASE_AVX2(fn, __VA_ARGS__)                      \
      default: return DEFAULT::fn(__VA_ARGS__);                   \
    }                                                             \
  }()
