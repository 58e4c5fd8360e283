// cuda_compat.h: the Metal vocabulary used by metal/*.metal, mapped onto CUDA so that the SAME
// kernel bodies compile through mx.fast.cuda_kernel. Prepended to a kernel's header on CUDA only
// (after MLX's own headers, so these macros never reach MLX code). Keep it small: add a name
// here only when a body needs it.
#pragma once

#define GEMMA_CUDA 1
typedef unsigned int uint;

// Address spaces. Metal qualifies pointers (`device T*`, `threadgroup float*`); CUDA qualifies
// only declarations (`__shared__ float buf[32]`), so helper-function pointer parameters use
// TG_ADDR / DEV_ADDR / THREAD_ADDR, which are empty here and the Metal qualifier in common.h.
#define TG_ADDR
#define DEV_ADDR
#define THREAD_ADDR
#define threadgroup __shared__
#define device
#define constant

// Helpers in common.h are device functions on CUDA, plain inline functions on Metal.
#define GEMMA_FN __device__ inline

// Thread coordinates (Metal attribute names -> CUDA built-ins). Threadgroup = block, simdgroup = warp.
#define thread_position_in_grid \
  make_uint3(blockIdx.x * blockDim.x + threadIdx.x, blockIdx.y * blockDim.y + threadIdx.y, \
             blockIdx.z * blockDim.z + threadIdx.z)
#define thread_position_in_threadgroup threadIdx
#define threadgroup_position_in_grid blockIdx
#define threads_per_threadgroup blockDim
#define threadgroups_per_grid gridDim
#define thread_index_in_simdgroup (threadIdx.x & 31u)
#define simdgroup_index_in_threadgroup (threadIdx.x >> 5)

namespace mem_flags {
enum { mem_none = 0, mem_threadgroup = 1, mem_device = 2 };
}
__device__ inline void threadgroup_barrier(int) { __syncthreads(); }

// Simdgroup reductions over a full warp (every body launches whole warps).
__device__ inline float simd_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ inline float simd_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ inline float simd_shuffle_xor(float v, uint mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

// Whether this threadgroup is the last of `count` to arrive at `counter` (one thread calls it,
// after a barrier over the threadgroup's device writes): the last one then reads what every
// threadgroup wrote, and leaves the counter 0 for the next launch, so MLX sees an input that
// never changes. CUDA only: Metal's device-scope fences are untested here (decode_attention).
__device__ inline bool arrive_last(const unsigned int* counter, unsigned int count) {
  unsigned int* arrived = const_cast<unsigned int*>(counter);
  __threadfence();
  bool last = atomicAdd(arrived, 1u) == count - 1u;
  if (last) {
    *arrived = 0u;
    __threadfence();
  }
  return last;
}

// arrive_last for a whole threadgroup, after its device writes: its first thread (tid 0) asks,
// and every thread gets the answer through `answer`, one uint of threadgroup memory.
__device__ inline bool threadgroup_arrives_last(const unsigned int* counter, unsigned int count, unsigned int* answer,
                                                unsigned int tid) {
  __syncthreads();
  if (tid == 0) {
    answer[0] = arrive_last(counter, count) ? 1u : 0u;
  }
  __syncthreads();
  return answer[0] != 0u;
}

// A flag one threadgroup of a launch raises for others that wait on it (one thread of each calls
// these): raise_flag after a barrier over the raiser's device writes; wait_flag returns once it is
// raised, and the waiter then reads those writes. The raiser must never wait on a waiter, and the
// waiters must be few enough to leave the GPU room for the raiser. CUDA only, as arrive_last.
__device__ inline void raise_flag(const unsigned int* flag) {
  __threadfence();
  atomicExch(const_cast<unsigned int*>(flag), 1u);
}
__device__ inline void wait_flag(const unsigned int* flag) {
  const volatile unsigned int* raised = flag;
  while (*raised == 0u) {
    __nanosleep(100);
  }
  __threadfence();
}

// Metal's bit reinterpretation between 32-bit types.
template <typename T>
__device__ inline T as_type(uint v);
template <>
__device__ inline float as_type<float>(uint v) {
  return __uint_as_float(v);
}

// Tensor-core tiles (qmm.metal; common.h has them as simdgroup matrices on Metal): a simdgroup's
// 16x16 fragment of A (rows x K, row-major in threadgroup memory), 16x8 of B (K x columns, read
// from an [n][k] tile) and 16x8 float32 accumulator, each lane's share as mma.sync.m16n8k16 holds
// it. T is __nv_bfloat16 or __half; `stride` is the tile's row length in T values.
template <typename T>
struct mma_frag_a {
  uint v[4];
};
template <typename T>
struct mma_frag_b {
  uint v[2];
};
struct mma_frag_c {
  float v[4];
};
__device__ inline void mma_clear(mma_frag_c& c) {
  for (int i = 0; i < 4; i++) c.v[i] = 0.0f;
}
// ldmatrix: each lane names one row of 8 values (16-byte aligned) of the 8x8 matrices it loads.
template <typename T>
__device__ inline void mma_load_a(mma_frag_a<T>& a, const T* src, int stride, uint lane) {
  const T* row_start = src + (lane & 15) * stride + (lane >> 4) * 8;
  const unsigned row = static_cast<unsigned>(__cvta_generic_to_shared(row_start));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(a.v[0]), "=r"(a.v[1]), "=r"(a.v[2]), "=r"(a.v[3]) : "r"(row));
}
template <typename T>
__device__ inline void mma_load_b(mma_frag_b<T>& b, const T* src, int stride, uint lane) {
  const T* row_start = src + (lane & 7) * stride + (lane >> 3 & 1) * 8;
  const unsigned row = static_cast<unsigned>(__cvta_generic_to_shared(row_start));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(b.v[0]), "=r"(b.v[1]) : "r"(row));
}
// mma_load_b from a [k][n] tile (rows of K, each `stride` apart): ldmatrix transposes as it loads.
template <typename T>
__device__ inline void mma_load_b_kn(mma_frag_b<T>& b, const T* src, int stride, uint lane) {
  const unsigned row = static_cast<unsigned>(__cvta_generic_to_shared(src + (lane & 15) * stride));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(b.v[0]), "=r"(b.v[1]) : "r"(row));
}
#define GEMMA_MMA_M16N8K16(TYPE)                                                                   \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 "                        \
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                             \
               : "+f"(c.v[0]), "+f"(c.v[1]), "+f"(c.v[2]), "+f"(c.v[3])                             \
               : "r"(a.v[0]), "r"(a.v[1]), "r"(a.v[2]), "r"(a.v[3]), "r"(b.v[0]), "r"(b.v[1]))
__device__ inline void mma_fma(mma_frag_c& c, const mma_frag_a<__nv_bfloat16>& a, const mma_frag_b<__nv_bfloat16>& b) {
  GEMMA_MMA_M16N8K16("bf16");
}
__device__ inline void mma_fma(mma_frag_c& c, const mma_frag_a<__half>& a, const mma_frag_b<__half>& b) {
  GEMMA_MMA_M16N8K16("f16");
}
// Stores the accumulator at dst (row-major, `stride` apart), only its first `rows` x `cols`.
template <typename T>
__device__ inline void mma_store(const mma_frag_c& c, T* dst, int stride, int rows, int cols, uint lane) {
  const int row = int(lane >> 2);
  const int col = int(lane & 3) * 2;
  for (int h = 0; h < 2; h++) {
    for (int e = 0; e < 2; e++) {
      if (row + 8 * h < rows && col + e < cols) {
        dst[(row + 8 * h) * stride + col + e] = static_cast<T>(c.v[2 * h + e]);
      }
    }
  }
}
// Multiplies row r of the accumulator by factor[r] (16 floats of threadgroup memory).
__device__ inline void mma_scale_rows(mma_frag_c& c, const float* factor, uint lane) {
  for (int h = 0; h < 2; h++) {
    const float f = factor[(lane >> 2) + 8 * h];
    c.v[2 * h] *= f;
    c.v[2 * h + 1] *= f;
  }
}
// The whole accumulator into a float32 tile of threadgroup memory.
__device__ inline void mma_store_scores(const mma_frag_c& c, float* dst, int stride, uint lane) {
  mma_store(c, dst, stride, 16, 8, lane);
}
// Two values rounded to T, packed as a 32-bit word (the first in the low half).
template <typename T>
__device__ inline uint pack_pair(float a, float b);
template <>
__device__ inline uint pack_pair<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 pair = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint*>(&pair);
}
template <>
__device__ inline uint pack_pair<__half>(float a, float b) {
  __half2 pair = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint*>(&pair);
}

// The 8 4-bit values of `word` dequantized (scale * q + bias, rounded once to T) as 4 packed
// pairs, values (i, i + 4) in pair i: a mask puts two values into the mantissas of OFFSET (its
// bits: MAGIC), and two paired instructions take the offset away and apply scale and bias.
template <typename T>
struct mma_pair;
template <>
struct mma_pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr uint MAGIC = 0x43004300u;
  static constexpr float OFFSET = 128.0f;
};
template <>
struct mma_pair<__half> {
  using type = __half2;
  static constexpr uint MAGIC = 0x64006400u;
  static constexpr float OFFSET = 1024.0f;
};
template <typename T>
__device__ inline void dequantize_pairs(uint word, T scale, T bias, uint* pairs) {
  using T2 = typename mma_pair<T>::type;
  const T offset = static_cast<T>(mma_pair<T>::OFFSET);
  for (int i = 0; i < 4; i++) {
    uint placed = ((word >> (4 * i)) & 0x000F000Fu) | mma_pair<T>::MAGIC;
    T2 v = __hfma2(__hsub2(*reinterpret_cast<T2*>(&placed), T2(offset, offset)), T2(scale, scale), T2(bias, bias));
    pairs[i] = *reinterpret_cast<uint*>(&v);
  }
}

namespace metal {
__device__ inline float exp(float x) { return expf(x); }
__device__ inline float tanh(float x) { return tanhf(x); }
__device__ inline float cos(float x) { return cosf(x); }
__device__ inline float sin(float x) { return sinf(x); }
__device__ inline float max(float a, float b) { return fmaxf(a, b); }
__device__ inline float min(float a, float b) { return fminf(a, b); }
__device__ inline int max(int a, int b) { return a > b ? a : b; }
__device__ inline int min(int a, int b) { return a < b ? a : b; }
__device__ inline float fma(float a, float b, float c) { return fmaf(a, b, c); }
namespace precise {
__device__ inline float rsqrt(float x) { return rsqrtf(x); }
__device__ inline float tanh(float x) { return tanhf(x); }
__device__ inline float cos(float x) { return cosf(x); }
__device__ inline float sin(float x) { return sinf(x); }
}  // namespace precise
namespace fast {
__device__ inline float exp(float x) { return __expf(x); }
}  // namespace fast
}  // namespace metal
