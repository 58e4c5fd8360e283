// common.h: helpers shared by the kernel bodies in metal/*.metal. Valid Metal; on CUDA it is
// preceded by cuda_compat.h, which defines the address-space and function macros below.
#pragma once

#ifndef TG_ADDR
#define TG_ADDR threadgroup
#endif
#ifndef DEV_ADDR
#define DEV_ADDR device
#endif
#ifndef GEMMA_FN
#define GEMMA_FN inline
#endif

// Lowest score a softmax tracks: finite, so exp(m_old - m_new) never sees (-inf) - (-inf).
#define GEMMA_NEG_BIG (-3.0e38f)

// Sum (IS_MAX false) or max of v over a threadgroup of NSG simdgroups; every thread of the
// group must call it. `buf` holds at least NSG floats of threadgroup memory; the result
// reaches every thread.
template <int NSG, bool IS_MAX>
GEMMA_FN float block_reduce(float v, TG_ADDR float* buf, uint lane, uint sg) {
  v = IS_MAX ? simd_max(v) : simd_sum(v);
  if (NSG > 1) {
    if (lane == 0) {
      buf[sg] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float part = lane < uint(NSG) ? buf[lane] : (IS_MAX ? GEMMA_NEG_BIG : 0.0f);
    v = IS_MAX ? simd_max(part) : simd_sum(part);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  return v;
}

template <int NSG>
GEMMA_FN float block_sum(float v, TG_ADDR float* buf, uint lane, uint sg) {
  return block_reduce<NSG, false>(v, buf, lane, sg);
}

template <int NSG>
GEMMA_FN float block_max(float v, TG_ADDR float* buf, uint lane, uint sg) {
  return block_reduce<NSG, true>(v, buf, lane, sg);
}

// Round a float32 value through the storage type T and back: where the MLX twin stores an
// intermediate in T, the kernel rounds there too, so the two agree to the last bit more often.
template <typename T>
GEMMA_FN float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}
