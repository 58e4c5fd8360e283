// rope_norm: q/k RMSNorm (with weight) or the scale-free v norm, then RoPE, for one attention
// projection. In: x [B, L, H, D] (the projection output, reshaped). Out: [B, H, L, D], the layout
// attention reads, so the transpose costs nothing.
// Grid: one threadgroup of TG = max(32, D/2) threads per (b, l, h) row; thread t owns the NeoX
// pair (t, t + D/2). RoPE angle = (pos[b] + l) * inv_freq[t]; inv_freq is 0 on pairs that pass
// through (proportional partial RoPE), which rotates them by exactly 0.
// Templates: T (dtype), D (head_dim), TG, HAS_WEIGHT (q/k norms), ROTATE (q/k; false for v).
// Inputs: x, w [D], pos int32 [B], inv_freq float32 [D/2], params float32 [eps].

// @kernel rope_norm
  constexpr int HALF = D / 2;
  uint row = threadgroup_position_in_grid.x;  // (b * L + l) * H + h
  uint t = thread_position_in_threadgroup.x;
  uint lane = thread_index_in_simdgroup;
  uint sg = simdgroup_index_in_threadgroup;
  threadgroup float buf[32];

  uint H = uint(x_shape[2]);
  uint L = uint(x_shape[1]);
  uint h = row % H;
  uint l = (row / H) % L;
  uint b = row / (H * L);

  bool active = t < uint(HALF);
  size_t in_base = size_t(row) * D;
  float x1 = active ? static_cast<float>(x[in_base + t]) : 0.0f;
  float x2 = active ? static_cast<float>(x[in_base + t + HALF]) : 0.0f;
  float ss = block_sum<TG / 32>(x1 * x1 + x2 * x2, buf, lane, sg);
  if (!active) {
    return;  // after the last barrier
  }
  float r = metal::precise::rsqrt(ss / float(D) + params[0]);
  float n1 = x1 * r;
  float n2 = x2 * r;
  if (HAS_WEIGHT) {
    n1 *= static_cast<float>(w[t]);
    n2 *= static_cast<float>(w[t + HALF]);
  }
  // The twin stores the normed tensor in T before rotating it.
  n1 = round_to<T>(n1);
  n2 = round_to<T>(n2);
  float o1 = n1;
  float o2 = n2;
  if (ROTATE) {
    float angle = float(pos[b] + int(l)) * inv_freq[t];
    float c = metal::precise::cos(angle);
    float s = metal::precise::sin(angle);
    o1 = n1 * c - n2 * s;
    o2 = n2 * c + n1 * s;
  }
  size_t out_base = ((size_t(b) * H + h) * L + l) * D;
  out[out_base + t] = static_cast<T>(o1);
  out[out_base + t + HALF] = static_cast<T>(o2);
