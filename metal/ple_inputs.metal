// ple_inputs: the per-layer-input (PLE) pipeline after the two lookups/matmuls,
//   out = (RMSNorm(context * hidden^-0.5) * w + tokens * sqrt(P)) * 2^-0.5
// In: tokens, context [B, L, layers * P] (gathered per-layer table rows; per_layer_model_projection
// output), w [P]. Out: [B, L, layers * P]. One simdgroup per (b, l, layer) row, ROWS_PER_TG rows
// per threadgroup; lanes stride over P. No threadgroup memory, no barrier.
// Templates: T, P, ROWS_PER_TG. Inputs: tokens, context, w,
// params float32 [hidden^-0.5, sqrt(P), 2^-0.5, eps].
// Each constant is first rounded to T, as the twin multiplies by mx.array(c, dtype=T).

// @kernel ple_inputs
  uint lane = thread_index_in_simdgroup;
  uint row = threadgroup_position_in_grid.x * ROWS_PER_TG + simdgroup_index_in_threadgroup;
  if (row >= uint(tokens_shape[0] * tokens_shape[1] * (tokens_shape[2] / P))) {
    return;  // whole simdgroup: the tail of the last threadgroup
  }
  float context_scale = round_to<T>(params[0]);
  float token_scale = round_to<T>(params[1]);
  float mix = round_to<T>(params[2]);
  size_t base = size_t(row) * P;
  float ss = 0.0f;
  for (uint i = lane; i < uint(P); i += 32) {
    float c = round_to<T>(static_cast<float>(context[base + i]) * context_scale);
    ss += c * c;
  }
  ss = simd_sum(ss);
  float r = metal::precise::rsqrt(ss / float(P) + params[3]);
  for (uint i = lane; i < uint(P); i += 32) {
    float c = round_to<T>(static_cast<float>(context[base + i]) * context_scale);
    float n = round_to<T>(c * r * static_cast<float>(w[i]));
    float tok = round_to<T>(static_cast<float>(tokens[base + i]) * token_scale);
    out[base + i] = static_cast<T>(round_to<T>(n + tok) * mix);
  }
