// cuda_compat.h: the Metal vocabulary used by metal/*.metal, mapped onto CUDA so that the SAME
// kernel bodies compile through mx.fast.cuda_kernel. Prepended to a kernel's header on CUDA only
// (after MLX's own headers, so these macros never reach MLX code). Keep it small: add a name
// here only when a body needs it.
#pragma once

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

// Metal's bit reinterpretation between 32-bit types.
template <typename T>
__device__ inline T as_type(uint v);
template <>
__device__ inline float as_type<float>(uint v) {
  return __uint_as_float(v);
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
