// rope_norm: the attention projection's epilogue for a whole layer, in one launch: q and k
// RMSNorm with their weights, v's scale-free norm, per-layer RoPE on q and k, and the
// [B, L, H, D] -> [B, H, L, D] transpose attention reads.
// In: x [B, L, HIN * D], the fused q|k|v projection output as the matmul writes it (HIN = NQ +
// NKV, plus NKV more when v has its own projection). Out: queries [B, NQ, L, D], keys and values
// [B, NKV, L, D]. NKV = 0: a KV-shared layer, queries only (keys and values hold no heads).
// V_FROM_K (attention_k_eq_v): v is the norm of the k projection's raw output.
// Grid: one threadgroup of TG = max(32, D/2) threads per (b, l, output head: q heads, then k
// heads, then v heads); thread t owns the NeoX pair (t, t + D/2). RoPE angle = (pos[b] + l) * inv_freq[t];
// inv_freq is 0 on pairs that pass through (proportional partial RoPE), which rotates them by exactly 0.
// Templates: T (dtype), D (head_dim), TG, NQ, NKV, V_FROM_K. QUERIES_ONLY (a define, NKV = 0):
// the build without the keys and values outputs, as each output costs MLX's host a buffer.
// INTO_CACHE (a define with QUERIES_ONLY; CUDA only, one query): K and V go into the inputs
// k_cache, v_cache [B, NKV, slots, D] at slot int32 [1] in place of a scatter launch each.
// Inputs: x, q_w [D], k_w [D], pos int32 [B], inv_freq float32 [2, D/2] (value, remainder),
// params float32 [eps].

// @kernel rope_norm
  constexpr int HALF = D / 2;
  constexpr int HOUT = NQ + 2 * NKV;
  uint row = threadgroup_position_in_grid.x;  // (b * L + l) * HOUT + head
  uint t = thread_position_in_threadgroup.x;
  uint lane = thread_index_in_simdgroup;
  uint sg = simdgroup_index_in_threadgroup;
  threadgroup float buf[32];

  uint HIN = uint(x_shape[2]) / uint(D);
  uint L = uint(x_shape[1]);
  uint head = row % HOUT;
  uint l = (row / HOUT) % L;
  uint b = row / (HOUT * L);
  // Sections: q heads [0, NQ), k heads [NQ, NQ + NKV), v heads after.
  bool is_v = head >= uint(NQ + NKV);
  bool is_k = !is_v && head >= uint(NQ);
  uint in_head = (is_v && V_FROM_K) ? head - NKV : head;

  bool active = t < uint(HALF);
  size_t in_base = ((size_t(b) * L + l) * HIN + in_head) * D;
  float x1 = active ? static_cast<float>(x[in_base + t]) : 0.0f;
  float x2 = active ? static_cast<float>(x[in_base + t + HALF]) : 0.0f;
  float ss = block_sum<TG / 32>(x1 * x1 + x2 * x2, buf, lane, sg);
  if (!active) {
    return;  // after the last barrier
  }
  float r = metal::precise::rsqrt(ss / float(D) + params[0]);
  float w1 = is_v ? 1.0f : static_cast<float>(is_k ? k_w[t] : q_w[t]);
  float w2 = is_v ? 1.0f : static_cast<float>(is_k ? k_w[t + HALF] : q_w[t + HALF]);
  float o1;
  float o2;
  norm_rotate_pair<T>(x1, x2, r, w1, w2, !is_v, float(pos[b] + int(l)), inv_freq[t], inv_freq[HALF + t], &o1, &o2);
  uint section_head = is_v ? head - NQ - NKV : (is_k ? head - NQ : head);
  uint section_heads = (is_v || is_k) ? uint(NKV) : uint(NQ);
  size_t out_base = ((size_t(b) * section_heads + section_head) * L + l) * D;
#if INTO_CACHE
  // K and V go to slot[0] of the cache buffers, [B, NKV, slots, D], written through a cast (L = 1).
  device T* out = is_v ? const_cast<device T*>(v_cache) : (is_k ? const_cast<device T*>(k_cache) : queries);
  if (is_v || is_k) {
    out_base = ((size_t(b) * NKV + section_head) * size_t(k_cache_shape[2]) + size_t(slot[0])) * D;
  }
#elif QUERIES_ONLY
  device T* out = queries;
#else
  device T* out = is_v ? values : (is_k ? keys : queries);
#endif
  out[out_base + t] = static_cast<T>(o1);
  out[out_base + t + HALF] = static_cast<T>(o2);
