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

// One value of a sub-block's end, (residual + RMSNorm(x) * w) * scale, given x's inverse RMS r:
// the normed value, the sum and the scaled sum each rounded to T, as the twin stores them.
template <typename T, bool HAS_SCALE>
GEMMA_FN float residual_value(float x, float r, float w, float residual, float scale) {
  float h = round_to<T>(residual + round_to<T>(x * r * w));
  return HAS_SCALE ? round_to<T>(h * scale) : h;
}

#ifndef THREAD_ADDR
#define THREAD_ADDR thread
#endif

// One NeoX pair (x1 at t, x2 at t + D/2) of a head as rope_norm leaves it: normed by the inverse
// RMS r times the weights w1, w2 (1 for v's scale-free norm) and rounded to T, as the twin stores
// the normed tensor; then, where `rotate`, rotated by position p at inv_freq = high + low. The
// rounding error of the float32 angle (from fma) and the low part make a small remainder,
// applied to first order.
template <typename T>
GEMMA_FN void norm_rotate_pair(float x1, float x2, float r, float w1, float w2, bool rotate, float p, float high,
                               float low, THREAD_ADDR float* o1, THREAD_ADDR float* o2) {
  float n1 = round_to<T>(x1 * r * w1);
  float n2 = round_to<T>(x2 * r * w2);
  if (!rotate) {
    *o1 = n1;
    *o2 = n2;
    return;
  }
  float angle = p * high;
  float rest = metal::fma(p, low, metal::fma(p, high, -angle));
  float c = metal::precise::cos(angle);
  float s = metal::precise::sin(angle);
  float cr = c - s * rest;
  float sr = s + c * rest;
  *o1 = n1 * cr - n2 * sr;
  *o2 = n2 * cr + n1 * sr;
}

// gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
GEMMA_FN float gelu_tanh(float x) {
  float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + metal::precise::tanh(inner));
}

// The 8 values of a 16-bit T in 4 words (16 bytes) as floats: bfloat16 as the high half of a
// float where BF16, through T otherwise.
template <typename T, bool BF16>
GEMMA_FN void unpack_floats(const THREAD_ADDR uint* words, THREAD_ADDR float* dst) {
  if (BF16) {
    for (int p = 0; p < 4; p++) {
      dst[2 * p] = as_type<float>(words[p] << 16);
      dst[2 * p + 1] = as_type<float>(words[p] & 0xFFFF0000u);
    }
  } else {
    const THREAD_ADDR T* values = (const THREAD_ADDR T*)(words);
    for (int j = 0; j < 8; j++) {
      dst[j] = static_cast<float>(values[j]);
    }
  }
}

// N consecutive values of T at `src` as floats: as 16-byte words where BF16 (T is bfloat16, the
// high half of a float; `src` 16-byte aligned), value by value otherwise.
template <typename T, int N, bool BF16>
GEMMA_FN void load_floats(const DEV_ADDR T* src, THREAD_ADDR float* dst) {
  if (BF16) {
    for (int q = 0; q < N / 8; q++) {
      uint4 raw = *((const DEV_ADDR uint4*)(src) + q);
      uint parts[4] = {raw.x, raw.y, raw.z, raw.w};
      unpack_floats<T, true>(parts, dst + q * 8);
    }
  } else {
    for (int j = 0; j < N; j++) {
      dst[j] = static_cast<float>(src[j]);
    }
  }
}

// PT consecutive values of T at src[first, first + PT) as floats, 0 at and past `limit`: as
// 16-byte words where VEC (T is bfloat16, first and PT multiples of 8, src 16-byte aligned) and
// the span lies before `limit`, value by value otherwise.
template <int PT, bool VEC, typename T>
GEMMA_FN void load_span(const DEV_ADDR T* src, int first, int limit, THREAD_ADDR float* dst) {
  if (VEC && first + PT <= limit) {
    load_floats<T, PT, true>(src + first, dst);
  } else {
    for (int j = 0; j < PT; j++) {
      dst[j] = first + j < limit ? static_cast<float>(src[first + j]) : 0.0f;
    }
  }
}

// Merges one row's flash-decoding splits into out[0, D): split s left its (max, sum) at
// ml[2 s], ml[2 s + 1] and its unnormalised acc at acc[s D, (s + 1) D). TG threads of one
// threadgroup call it; `weight` holds nsplit floats of threadgroup memory, `buf` TG / 32. P is a
// float pointer: volatile where other threadgroups of the same launch wrote the splits (the fused
// combine). Thread s reads split s's (max, sum), and the acc reads go out SPLITS_IN_FLIGHT at a
// time: a read per split in turn waited on memory for each.
template <typename T, int D, int TG, typename P>
GEMMA_FN void combine_splits(P ml, P acc, int nsplit, DEV_ADDR T* out, TG_ADDR float* weight, TG_ADDR float* buf,
                             uint t) {
  constexpr int SPLITS_IN_FLIGHT = 8;
  uint lane = t % 32;
  uint sg = t / 32;
  // A thread's splits' sums, relative to the largest of their maxima: the (max, sum) pairs are
  // read once, together, and the row's total needs no second read.
  float split_max = GEMMA_NEG_BIG;
  float split_total = 0.0f;
  for (int s = int(t); s < nsplit; s += TG) {
    const float split_m = ml[2 * s];
    const float split_l = ml[2 * s + 1];
    const float top = metal::max(split_max, split_m);
    split_total = split_total * metal::exp(split_max - top) + split_l * metal::exp(split_m - top);
    split_max = top;
    weight[s] = split_m;
  }
  float row_max = block_max<TG / 32>(split_max, buf, lane, sg);
  float total = block_sum<TG / 32>(split_total * metal::exp(split_max - row_max), buf, lane, sg);
  for (int s = int(t); s < nsplit; s += TG) {
    weight[s] = metal::exp(weight[s] - row_max);
  }
  float inv = total > 0.0f ? 1.0f / total : 0.0f;  // no visible key: 0, not NaN
  threadgroup_barrier(mem_flags::mem_threadgroup);  // every split's weight is written
  for (int d = int(t); d < D; d += TG) {
    float a = 0.0f;
    for (int s0 = 0; s0 < nsplit; s0 += SPLITS_IN_FLIGHT) {
      float parts[SPLITS_IN_FLIGHT];
      for (int u = 0; u < SPLITS_IN_FLIGHT; u++) {
        parts[u] = s0 + u < nsplit ? acc[(s0 + u) * D + d] : 0.0f;
      }
      for (int u = 0; u < SPLITS_IN_FLIGHT; u++) {
        a += s0 + u < nsplit ? parts[u] * weight[s0 + u] : 0.0f;
      }
    }
    out[d] = static_cast<T>(a * inv);
  }
}

#ifndef GEMMA_CUDA
// Tensor-core tiles on Metal (qmm.metal; cuda_compat.h has them for mma.sync): a simdgroup's
// 16x16 fragment of A (rows x K, row-major in threadgroup memory), 16x8 of B (K x columns, read
// from an [n][k] tile) and 16x8 float32 accumulator, as 8x8 simdgroup matrices.
template <typename T>
struct mma_frag_a {
  simdgroup_matrix<T, 8, 8> m[2][2];  // [row block][K block]
};
template <typename T>
struct mma_frag_b {
  simdgroup_matrix<T, 8, 8> m[2];  // [K block]
};
struct mma_frag_c {
  simdgroup_matrix<float, 8, 8> m[2];  // [row block]
};
inline void mma_clear(thread mma_frag_c& c) {
  c.m[0] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  c.m[1] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}
template <typename T>
inline void mma_load_a(thread mma_frag_a<T>& a, const threadgroup T* src, int stride, uint lane) {
  for (int i = 0; i < 2; i++) {
    for (int j = 0; j < 2; j++) {
      simdgroup_load(a.m[i][j], src + 8 * i * stride + 8 * j, stride);
    }
  }
}
template <typename T>
inline void mma_load_b(thread mma_frag_b<T>& b, const threadgroup T* src, int stride, uint lane) {
  for (int j = 0; j < 2; j++) {
    simdgroup_load(b.m[j], src + 8 * j, stride, ulong2(0, 0), true);
  }
}
// mma_load_b from a [k][n] tile (rows of K, each `stride` apart).
template <typename T>
inline void mma_load_b_kn(thread mma_frag_b<T>& b, const threadgroup T* src, int stride, uint lane) {
  for (int j = 0; j < 2; j++) {
    simdgroup_load(b.m[j], src + 8 * j * stride, stride);
  }
}
template <typename T>
inline void mma_fma(thread mma_frag_c& c, thread const mma_frag_a<T>& a, thread const mma_frag_b<T>& b) {
  for (int i = 0; i < 2; i++) {
    for (int j = 0; j < 2; j++) {
      simdgroup_multiply_accumulate(c.m[i], a.m[i][j], b.m[j], c.m[i]);
    }
  }
}
// Stores the accumulator at dst (row-major, `stride` apart), only its first `rows` x `cols`. A
// lane holds two neighbours of each 8x8 matrix, at the place Apple GPUs give it (as MLX's steel
// kernels read them).
template <typename T>
inline void mma_store(thread const mma_frag_c& c, device T* dst, int stride, int rows, int cols, uint lane) {
  const int quad = int(lane) / 4;
  const int row = (quad & 4) + int(lane) / 2 % 4;
  const int col = (quad & 2) * 2 + int(lane) % 2 * 2;
  for (int i = 0; i < 2; i++) {
    const auto values = c.m[i].thread_elements();
    for (int e = 0; e < 2; e++) {
      if (8 * i + row < rows && col + e < cols) {
        dst[(8 * i + row) * stride + col + e] = static_cast<T>(values[e]);
      }
    }
  }
}
// Multiplies row r of the accumulator by factor[r] (16 floats of threadgroup memory).
inline void mma_scale_rows(thread mma_frag_c& c, const threadgroup float* factor, uint lane) {
  const int row = (int(lane) / 4 & 4) + int(lane) / 2 % 4;
  for (int i = 0; i < 2; i++) {
    c.m[i].thread_elements() *= factor[8 * i + row];
  }
}
// The whole accumulator into a float32 tile of threadgroup memory.
inline void mma_store_scores(thread const mma_frag_c& c, threadgroup float* dst, int stride, uint lane) {
  for (int i = 0; i < 2; i++) {
    simdgroup_store(c.m[i], dst + 8 * i * stride, stride);
  }
}
// Two values rounded to T, packed as a 32-bit word (the first in the low half).
template <typename T>
inline uint pack_pair(float a, float b) {
  return as_type<uint>(vec<T, 2>(static_cast<T>(a), static_cast<T>(b)));
}
// The 8 4-bit values of `word` dequantized (scale * q + bias, rounded once to T) as 4 packed
// pairs, values (i, i + 4) in pair i (cuda_compat.h's order).
template <typename T>
inline void dequantize_pairs(uint word, T scale, T bias, thread uint* pairs) {
  for (int i = 0; i < 4; i++) {
    const float lo = float((word >> (4 * i)) & 15u);
    const float hi = float((word >> (4 * i + 16)) & 15u);
    pairs[i] = pack_pair<T>(metal::fma(lo, float(scale), float(bias)), metal::fma(hi, float(scale), float(bias)));
  }
}
#endif
