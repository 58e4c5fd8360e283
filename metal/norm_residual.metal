// norm_residual: out = (residual + RMSNorm(x) * w) * scale, the end of every Gemma 4 decoder
// sub-block: post-attention norm + residual, post-feedforward norm + residual (times
// layer_scalar when the layer has no PLE), and the PLE epilogue RMSNorm(per_layer_projection)
// * w + residual, times layer_scalar.
// In: x, residual [..., N] (rows of N = hidden_size), w [N], scale [1]. Out: like residual.
// Grid: one threadgroup of TG threads per row (TG a multiple of 32, TG <= 1024).
// Templates: T, N, TG, HAS_SCALE. Inputs: x, w, residual, scale, params float32 [eps].
// Rounding follows the twin: normed value, sum and product are each stored in T.

// @kernel norm_residual
  uint row = threadgroup_position_in_grid.x;
  uint t = thread_position_in_threadgroup.x;
  uint lane = thread_index_in_simdgroup;
  uint sg = simdgroup_index_in_threadgroup;
  threadgroup float buf[32];

  size_t base = size_t(row) * N;
  float ss = 0.0f;
  for (uint i = t; i < uint(N); i += TG) {
    float v = static_cast<float>(x[base + i]);
    ss += v * v;
  }
  ss = block_sum<TG / 32>(ss, buf, lane, sg);
  float r = metal::precise::rsqrt(ss / float(N) + params[0]);
  float sc = HAS_SCALE ? static_cast<float>(scale[0]) : 1.0f;
  for (uint i = t; i < uint(N); i += TG) {
    float n = round_to<T>(static_cast<float>(x[base + i]) * r * static_cast<float>(w[i]));
    float h = round_to<T>(static_cast<float>(residual[base + i]) + n);
    out[base + i] = static_cast<T>(HAS_SCALE ? h * sc : h);
  }
