// norm_residual: out = (residual + RMSNorm(x) * w) * scale, the end of every Gemma 4 decoder
// sub-block: post-attention norm + residual, post-feedforward norm + residual (times
// layer_scalar when the layer has no PLE), and the PLE epilogue RMSNorm(per_layer_projection)
// * w + residual, times layer_scalar. With NEXT_NORMS > 0 it also writes normed =
// RMSNorm(out) * next_w, the norm the next sub-block starts with (pre-feedforward, the next
// layer's input norm, or the final norm), so that norm costs no launch of its own; a MoE
// layer's post-attention block also writes the router's and the experts' input norms
// (normed_2 with next_w_2, normed_3 with next_w_3), which read the same out.
// In: x, residual [..., N] (rows of N = hidden_size), w [N], scale [1], then next_w, next_w_2,
// next_w_3 [N] up to NEXT_NORMS of them, params float32 [eps].
// Out: out like residual, then normed, normed_2, normed_3 like residual up to NEXT_NORMS.
// NEXT_NORMS (0-3) is a #define the wrapper puts before the body: the inputs and outputs a
// build lacks must not be named at all.
// Grid: one threadgroup of TG threads per row (TG a multiple of 32, TG <= 1024); each thread
// keeps its PER_THREAD = ceil(N / TG) consecutive values in registers for the second norm.
// Templates: T, N, TG, HAS_SCALE, VEC (T is bfloat16 and N, PER_THREAD multiples of 8: rows and
// spans are read as 16-byte words), W_BF16 (w and next_w are bfloat16: read so too where VEC).
// Rounding follows the twin: normed value, sum and product are each stored in T.

// @kernel norm_residual
  constexpr int PER_THREAD = (N + TG - 1) / TG;
  uint row = threadgroup_position_in_grid.x;
  uint t = thread_position_in_threadgroup.x;
  uint lane = thread_index_in_simdgroup;
  uint sg = simdgroup_index_in_threadgroup;
  threadgroup float buf[32];

  // Each thread owns PER_THREAD consecutive values and loads every input before the first
  // reduction: one wait on memory a launch, not one per phase (a launch is a single threadgroup,
  // so that latency is its whole time).
  size_t base = size_t(row) * N;
  int first = int(t) * PER_THREAD;
  float xs[PER_THREAD];
  float res[PER_THREAD];
  float ws[PER_THREAD];
  load_span<PER_THREAD, VEC>(x + base, first, N, xs);
  load_span<PER_THREAD, VEC>(residual + base, first, N, res);
  load_span<PER_THREAD, VEC && W_BF16>(w, first, N, ws);
#if NEXT_NORMS > 0
  float next_ws[PER_THREAD];
  load_span<PER_THREAD, VEC && W_BF16>(next_w, first, N, next_ws);
#endif
  float eps = params[0];
  float sc = HAS_SCALE ? static_cast<float>(scale[0]) : 1.0f;
  float ss = 0.0f;
  for (int k = 0; k < PER_THREAD; k++) {
    ss += xs[k] * xs[k];
  }
  float r = metal::precise::rsqrt(block_sum<TG / 32>(ss, buf, lane, sg) / float(N) + eps);
  float ss_out = 0.0f;
  for (int k = 0; k < PER_THREAD; k++) {
    int i = first + k;
    if (i < N) {
      float h = residual_value<T, HAS_SCALE>(xs[k], r, ws[k], res[k], sc);
      out[base + i] = static_cast<T>(h);
      xs[k] = h;
      ss_out += h * h;
    }
  }
#if NEXT_NORMS > 0
  float r_out = metal::precise::rsqrt(block_sum<TG / 32>(ss_out, buf, lane, sg) / float(N) + eps);
  for (int k = 0; k < PER_THREAD; k++) {
    int i = first + k;
    if (i < N) {
      float v = xs[k] * r_out;
      normed[base + i] = static_cast<T>(v * next_ws[k]);
#if NEXT_NORMS > 1
      normed_2[base + i] = static_cast<T>(v * static_cast<float>(next_w_2[i]));
#endif
#if NEXT_NORMS > 2
      normed_3[base + i] = static_cast<T>(v * static_cast<float>(next_w_3[i]));
#endif
    }
  }
#endif

// moe_norm_residual: the end of a MoE layer's feed-forward block in one launch. The experts'
// outputs are summed with their router weights, the dense MLP's output and that sum are each
// RMS-normed (post_feedforward_layernorm_1 / _2) and added, and the result goes through
// norm_residual as above (post_feedforward_layernorm, residual, layer_scalar, the next norm).
// In: dense [rows, N], experts [rows, K, 1, N], weights float32 [rows, K], dense_w, experts_w, w
// [N], residual [rows, N], scale [1], next weights and params as norm_residual's. Out: as
// norm_residual's. Templates: T, N, K, TG, HAS_SCALE; NEXT_NORMS as norm_residual's. Rounding
// follows the twin: each weighted expert output, their sum, both normed branches and their sum
// are stored in T.

// @kernel moe_norm_residual
  constexpr int PER_THREAD = (N + TG - 1) / TG;
  uint row = threadgroup_position_in_grid.x;
  uint t = thread_position_in_threadgroup.x;
  uint lane = thread_index_in_simdgroup;
  uint sg = simdgroup_index_in_threadgroup;
  threadgroup float buf[32];

  size_t base = size_t(row) * N;
  float dense_kept[PER_THREAD];
  float mixed_kept[PER_THREAD];
  float ss_dense = 0.0f;
  float ss_mixed = 0.0f;
  for (int k = 0; k < PER_THREAD; k++) {
    uint i = t + uint(k) * TG;
    dense_kept[k] = 0.0f;
    mixed_kept[k] = 0.0f;
    if (i < uint(N)) {
      float mixed = 0.0f;
      for (int j = 0; j < K; j++) {
        float weight = round_to<T>(weights[size_t(row) * K + j]);
        mixed += round_to<T>(weight * static_cast<float>(experts[(size_t(row) * K + j) * N + i]));
      }
      dense_kept[k] = static_cast<float>(dense[base + i]);
      mixed_kept[k] = round_to<T>(mixed);
      ss_dense += dense_kept[k] * dense_kept[k];
      ss_mixed += mixed_kept[k] * mixed_kept[k];
    }
  }
  float r_dense = metal::precise::rsqrt(block_sum<TG / 32>(ss_dense, buf, lane, sg) / float(N) + params[0]);
  float r_mixed = metal::precise::rsqrt(block_sum<TG / 32>(ss_mixed, buf, lane, sg) / float(N) + params[0]);
  float ss = 0.0f;
  for (int k = 0; k < PER_THREAD; k++) {
    uint i = t + uint(k) * TG;
    if (i < uint(N)) {
      float a = round_to<T>(dense_kept[k] * r_dense * static_cast<float>(dense_w[i]));
      float b = round_to<T>(mixed_kept[k] * r_mixed * static_cast<float>(experts_w[i]));
      dense_kept[k] = round_to<T>(a + b);
      ss += dense_kept[k] * dense_kept[k];
    }
  }
  float r = metal::precise::rsqrt(block_sum<TG / 32>(ss, buf, lane, sg) / float(N) + params[0]);
  float sc = HAS_SCALE ? static_cast<float>(scale[0]) : 1.0f;
  float ss_out = 0.0f;
  for (int k = 0; k < PER_THREAD; k++) {
    uint i = t + uint(k) * TG;
    if (i < uint(N)) {
      float h = residual_value<T, HAS_SCALE>(dense_kept[k], r, static_cast<float>(w[i]),
                                             static_cast<float>(residual[base + i]), sc);
      out[base + i] = static_cast<T>(h);
      mixed_kept[k] = h;
      ss_out += h * h;
    }
  }
#if NEXT_NORMS > 0
  float r_out = metal::precise::rsqrt(block_sum<TG / 32>(ss_out, buf, lane, sg) / float(N) + params[0]);
  for (int k = 0; k < PER_THREAD; k++) {
    uint i = t + uint(k) * TG;
    if (i < uint(N)) {
      float v = mixed_kept[k] * r_out;
      normed[base + i] = static_cast<T>(v * static_cast<float>(next_w[i]));
#if NEXT_NORMS > 1
      normed_2[base + i] = static_cast<T>(v * static_cast<float>(next_w_2[i]));
#endif
#if NEXT_NORMS > 2
      normed_3[base + i] = static_cast<T>(v * static_cast<float>(next_w_3[i]));
#endif
    }
  }
#endif
