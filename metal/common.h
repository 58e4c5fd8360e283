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

#ifndef THREAD_ADDR
#define THREAD_ADDR thread
#endif

// gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
GEMMA_FN float gelu_tanh(float x) {
  float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + metal::precise::tanh(inner));
}

// N consecutive values of T at `src` as floats: as 16-byte words where BF16 (T is bfloat16, the
// high half of a float; `src` 16-byte aligned), value by value otherwise.
template <typename T, int N, bool BF16>
GEMMA_FN void load_floats(const DEV_ADDR T* src, THREAD_ADDR float* dst) {
  if (BF16) {
    for (int q = 0; q < N / 8; q++) {
      uint4 raw = *((const DEV_ADDR uint4*)(src) + q);
      uint parts[4] = {raw.x, raw.y, raw.z, raw.w};
      for (int p = 0; p < 4; p++) {
        dst[q * 8 + 2 * p] = as_type<float>(parts[p] << 16);
        dst[q * 8 + 2 * p + 1] = as_type<float>(parts[p] & 0xFFFF0000u);
      }
    }
  } else {
    for (int j = 0; j < N; j++) {
      dst[j] = static_cast<float>(src[j]);
    }
  }
}

// Merges one row's flash-decoding splits into out[0, D): split s left its (max, sum) at
// ml[2 s], ml[2 s + 1] and its unnormalised acc at acc[s D, (s + 1) D). TG threads of one
// threadgroup call it; `weight` holds nsplit floats of threadgroup memory. P is a float pointer:
// volatile where other threadgroups of the same launch wrote the splits (the fused combine).
template <typename T, int D, int TG, typename P>
GEMMA_FN void combine_splits(P ml, P acc, int nsplit, DEV_ADDR T* out, TG_ADDR float* weight, uint t) {
  // Every thread finds the row's max and sum (nsplit reads, from cache).
  float row_max = GEMMA_NEG_BIG;
  for (int s = 0; s < nsplit; s++) {
    row_max = metal::max(row_max, ml[2 * s]);
  }
  float total = 0.0f;
  for (int s = 0; s < nsplit; s++) {
    total += ml[2 * s + 1] * metal::exp(ml[2 * s] - row_max);
  }
  float inv = total > 0.0f ? 1.0f / total : 0.0f;  // no visible key: 0, not NaN
  for (int s = int(t); s < nsplit; s += TG) {
    weight[s] = metal::exp(ml[2 * s] - row_max) * inv;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int d = int(t); d < D; d += TG) {
    float a = 0.0f;
    for (int s = 0; s < nsplit; s++) {
      a += acc[s * D + d] * weight[s];
    }
    out[d] = static_cast<T>(a);
  }
}
