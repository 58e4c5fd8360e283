// decode_attention: softmax(q k^T) v for a few queries (decode, Lq = 1; speculative verify,
// Lq <= 8) against the K/V a cache returns, read in place through their strides (a growing
// cache's slice, a wrapped sliding ring, or a KV-shared layer's source arrays). Scale 1.0
// (Gemma 4's q/k norms replace 1/sqrt(D)); GQA; head_dim up to 512; softmax in float32.
// Masks as the caches build them: none, "causal" (bottom-right aligned), or boolean
// [B or 1, 1, Lq, S] (ring-buffer order, window, left padding); a masked key's K and V are read
// but never used, so whatever its slot holds, and a row with no visible key comes out 0.
//
// Two passes (split-K "flash decoding"): the keys are cut into NSPLIT = threadgroups_per_grid.x
// chunks so that even one query row fills the GPU.
//   partial: grid (NSPLIT * 32 * NSG, rows); row = (b * Hq + hq) * Lq + lq. Each simdgroup walks
//     the chunk's keys KB at a time (blocks NSG apart), keeping an online softmax (max, sum,
//     acc[D] spread as EPT = D/32 consecutive values per lane, read as 16-byte words where VEC);
//     the NSG states merge in threadgroup memory and the split's (max, sum) and unnormalised acc
//     go to part_ml [rows, NSPLIT, 2], part_acc [rows, NSPLIT, D].
//   combine: grid (rows * TG); merges the NSPLIT states of a row and writes out [B, Lq, Hq * D],
//     the layout the output projection reads.
// FUSED_COMBINE (a define; CUDA only, for cuda_compat.h's arrive_last): the partial pass combines too.
//   Each split counts itself in at arrivals[row] (uint32, 0 between launches), and the split that
//   finishes its row last merges it and writes out: one launch a call instead of two. part_acc and
//   part_ml are then inputs, scratch the launches of a forward pass share (each output costs MLX's host
//   a buffer a call), written through a cast.
// Templates: T, D, NSG, HAS_MASK, CAUSAL, MAX_SPLITS, VEC (bfloat16 rows, EPT a multiple of 8)
// (partial); T, D, TG, MAX_SPLITS, HQ, LQ (combine).

// @kernel decode_attention_partial
  constexpr int EPT = (D + 31) / 32;
  // Keys a simdgroup loads before it uses any: their K and V rows are in flight together, as a
  // walk of one key at a time waited on memory for every key.
  constexpr int KB = EPT <= 8 ? 4 : 2;
  uint split = threadgroup_position_in_grid.x;
  uint nsplit = threadgroups_per_grid.x;
  uint row = threadgroup_position_in_grid.y;
  uint t = thread_position_in_threadgroup.x;
  uint lane = thread_index_in_simdgroup;
  uint sg = simdgroup_index_in_threadgroup;
  threadgroup float sm_m[NSG];
  threadgroup float sm_l[NSG];
  threadgroup float sm_acc[NSG * D];

  int Hq = q_shape[1];
  int Lq = q_shape[2];
  int Hkv = k_shape[1];
  int S = k_shape[2];
  int lq = int(row) % Lq;
  int hq = (int(row) / Lq) % Hq;
  int b = int(row) / (Lq * Hq);
  int hkv = hq / (Hq / Hkv);

  const device T* qp = q + b * q_strides[0] + hq * q_strides[1] + lq * q_strides[2];
  const device T* kp = k + b * k_strides[0] + hkv * k_strides[1];
  const device T* vp = v + b * v_strides[0] + hkv * v_strides[1];
  int64_t k_row = k_strides[2];
  int64_t v_row = v_strides[2];
  int64_t mask_base = 0;
  int64_t mask_step = 0;
  if (HAS_MASK) {
    mask_base = (mask_shape[0] == 1 ? 0 : b * mask_strides[0]) + lq * mask_strides[2];
    mask_step = mask_strides[3];
  }
  int last_visible = S - Lq + lq;  // "causal": query lq sits at key S - Lq + lq

  // Lane `lane` holds elements [lane * EPT, lane * EPT + EPT) of q, of each K and V row and of acc.
  int span = int(lane) * EPT;
  float qv[EPT];
  float acc[EPT];
  load_span<EPT, VEC>(qp, span, D, qv);
  for (int i = 0; i < EPT; i++) {
    acc[i] = 0.0f;
  }
  float m = GEMMA_NEG_BIG;
  float l = 0.0f;

  int chunk = (S + int(nsplit) - 1) / int(nsplit);
  int start = int(split) * chunk;
  int stop = metal::min(S, start + chunk);
  for (int j0 = start + int(sg) * KB; j0 < stop; j0 += NSG * KB) {
    // A key past the chunk or hidden by the mask is loaded (from a row inside the buffer) but
    // never used, so its values, whatever they hold, reach neither the max nor acc.
    bool live[KB];
    float kv[KB][EPT];
    float vv[KB][EPT];
    for (int u = 0; u < KB; u++) {
      int j = metal::min(j0 + u, stop - 1);
      live[u] = j0 + u < stop;
      if (HAS_MASK) {
        live[u] = live[u] && mask[mask_base + j * mask_step];
      }
      if (CAUSAL) {
        live[u] = live[u] && j <= last_visible;
      }
      load_span<EPT, VEC>(kp + j * k_row, span, D, kv[u]);
      load_span<EPT, VEC>(vp + j * v_row, span, D, vv[u]);
    }
    float s[KB];
    for (int u = 0; u < KB; u++) {
      s[u] = 0.0f;
      for (int i = 0; i < EPT; i++) {
        s[u] += qv[i] * kv[u][i];
      }
    }
    float m_new = m;
    for (int u = 0; u < KB; u++) {
      s[u] = simd_sum(s[u]);
      m_new = live[u] ? metal::max(m_new, s[u]) : m_new;
    }
    float corr = metal::exp(m - m_new);
    l *= corr;
    for (int i = 0; i < EPT; i++) {
      acc[i] *= corr;
    }
    for (int u = 0; u < KB; u++) {
      if (live[u]) {  // uniform across the simdgroup
        float p = metal::exp(s[u] - m_new);
        l += p;
        for (int i = 0; i < EPT; i++) {
          acc[i] += p * vv[u][i];
        }
      }
    }
    m = m_new;
  }

  // Merge the NSG simdgroup states of this split.
  if (lane == 0) {
    sm_m[sg] = m;
    sm_l[sg] = l;
  }
  for (int i = 0; i < EPT; i++) {
    if (span + i < D) {
      sm_acc[sg * D + span + i] = acc[i];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float mmax = GEMMA_NEG_BIG;
  for (int g = 0; g < NSG; g++) {
    mmax = metal::max(mmax, sm_m[g]);
  }
#if FUSED_COMBINE
  device float* split_acc = const_cast<device float*>(part_acc);
  device float* split_ml = const_cast<device float*>(part_ml);
#else
  device float* split_acc = part_acc;
  device float* split_ml = part_ml;
#endif
  size_t part = size_t(row) * nsplit + split;
  for (int d = int(t); d < D; d += NSG * 32) {
    float a = 0.0f;
    for (int g = 0; g < NSG; g++) {
      a += sm_acc[g * D + d] * metal::exp(sm_m[g] - mmax);
    }
    split_acc[part * D + d] = a;
  }
  if (t == 0) {
    float total = 0.0f;
    for (int g = 0; g < NSG; g++) {
      total += sm_l[g] * metal::exp(sm_m[g] - mmax);
    }
    split_ml[part * 2] = mmax;
    split_ml[part * 2 + 1] = total;
  }
#if FUSED_COMBINE
  threadgroup uint finishes_row[1];
  threadgroup float weight[MAX_SPLITS];
  if (threadgroup_arrives_last(arrivals + row, nsplit, finishes_row, t)) {
    // Volatile: other threadgroups of this launch wrote the splits.
    const volatile device float* row_ml = part_ml + size_t(row) * nsplit * 2;
    const volatile device float* row_acc = part_acc + size_t(row) * nsplit * D;
    size_t out_base = ((size_t(b) * Lq + lq) * Hq + hq) * D;
    combine_splits<T, D, NSG * 32>(row_ml, row_acc, int(nsplit), out + out_base, weight, sm_m, t);
  }
#endif

// @kernel decode_attention_combine
  uint row = threadgroup_position_in_grid.x;
  int nsplit = part_ml_shape[1];
  threadgroup float weight[MAX_SPLITS];
  threadgroup float buf[TG / 32];
  // row = (b * HQ + head) * LQ + query -> out[b, query, head, :]
  uint head = (row / LQ) % HQ;
  size_t out_base = ((size_t(row / (LQ * HQ)) * LQ + row % LQ) * HQ + head) * D;
  combine_splits<T, D, TG>(part_ml + size_t(row) * nsplit * 2, part_acc + size_t(row) * nsplit * D, nsplit,
                           out + out_base, weight, buf,
                           thread_position_in_threadgroup.x);
