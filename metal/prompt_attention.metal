// prompt_attention: softmax(q k^T) v for a prompt chunk's queries against the K/V a cache
// returns, on the tensor cores (common.h's mma_* helpers: simdgroup matrices on Metal, mma.sync
// on CUDA), in one launch where MLX's unfused SDPA (its fused kernels stop short of head_dim 256
// and 512) takes about 8 and writes the [heads, L, S] scores to memory. Scale 1.0 (Gemma 4's
// q/k norms replace 1/sqrt(D)); GQA; masks as the caches build them: none, "causal" (bottom-right
// aligned) or boolean [B or 1, 1, L, S]. A row with no visible key comes out 0.
//
// A threadgroup of NSG = 4 simdgroups owns BQ consecutive queries of one head and walks the keys
// BK at a time with an online softmax (flash attention), keeping its queries in threadgroup
// memory and taking K and V DC head_dim values at a time (all of them where threadgroup memory
// allows: each chunk is a wait on memory), each chunk's loads in flight while the chunk before
// is multiplied:
//   scores: each simdgroup multiplies its part of the BQ x BK tile over all of D (q_tile x K^T);
//   softmax: THREADS / BQ threads a row update its (max, sum) in float32, write the weights
//     rounded to T to p_tile and the factor that rescales the row's output to row_scale;
//   output: each simdgroup owns a quarter of every DC columns of the BQ x D output, rescales
//     them and adds p_tile x V.
// A tile of keys that no query of the threadgroup sees is skipped (causal: not even visited).
// Keys past S and masked keys are read (rows past S as row S - 1) with weight 0: their K and V
// must be finite, as the caches' zero-filled buffers are.
// In: q [B, Hq, L, D]; k, v [B, Hkv, S, D], read through their strides (each row of D
// contiguous and 16-byte aligned); mask (bool, read only where HAS_MASK). Out: [B, L, Hq * D],
// the layout the output projection reads.
// Grid: ceil(L / BQ) x (B * Hq) threadgroups of 32 * NSG threads.
// Templates: T (bfloat16 or float16), D, BQ (16 or 32), BK (32), DC (64 or 256, dividing D),
// HAS_MASK, CAUSAL.

// @kernel prompt_attention
  constexpr int NSG = 4;
  constexpr int THREADS = 32 * NSG;
  constexpr int CHUNKS = D / DC;
  constexpr int Q_STRIDE = D + 8;  // padded rows: a simdgroup's fragment loads hit 32 distinct banks
  constexpr int KV_STRIDE = DC + 8;
  constexpr int P_STRIDE = BK + 8;
  constexpr int S_STRIDE = BK + 4;
  constexpr int ROW_THREADS = THREADS / BQ;
  constexpr int ROW_KEYS = BK / ROW_THREADS;
  constexpr int SM = BQ / 16;  // 16-row blocks of the tile
  constexpr int S_FRAGS = SM * (BK / 8) / NSG;  // 16 x 8 score accumulators a simdgroup holds
  constexpr int ON = DC / NSG / 8;  // 16 x 8 output accumulators a simdgroup holds per chunk
  constexpr int KV_LOADS = BK * DC / 8 / THREADS;  // 16-byte words of a K or V chunk a thread loads
  static_assert(D % DC == 0 && BK % 16 == 0 && (BK / 8) % S_FRAGS == 0, "a simdgroup's scores share one row block");
  static_assert(ROW_THREADS <= 32 && ROW_KEYS >= 1, "a row's threads are lanes of one simdgroup");
  static_assert(BK * DC / 8 % THREADS == 0, "every thread loads as many words of a chunk");
  threadgroup T q_tile[BQ * Q_STRIDE];
  threadgroup T kv_tile[BK * KV_STRIDE];
  threadgroup float s_tile[BQ * S_STRIDE];
  threadgroup T p_tile[BQ * P_STRIDE];
  threadgroup float row_scale[BQ];
  threadgroup int tile_seen[1];

  const int Hq = q_shape[1];
  const int L = q_shape[2];
  const int Hkv = k_shape[1];
  const int S = k_shape[2];
  const uint t = thread_position_in_threadgroup.x;
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const int b = int(threadgroup_position_in_grid.y) / Hq;
  const int h = int(threadgroup_position_in_grid.y) % Hq;
  const int hkv = h / (Hq / Hkv);
  const int row0 = int(threadgroup_position_in_grid.x) * BQ;
  const int rows = metal::min(BQ, L - row0);
  const device T* qp = q + b * q_strides[0] + h * q_strides[1];
  const device T* kp = k + b * k_strides[0] + hkv * k_strides[1];
  const device T* vp = v + b * v_strides[0] + hkv * v_strides[1];

  for (int i = int(t); i < BQ * D / 8; i += THREADS) {
    const int r = i / (D / 8);
    const int c = i % (D / 8) * 8;
    const int src = metal::min(row0 + r, L - 1);
    *((TG_ADDR uint4*)(q_tile + r * Q_STRIDE + c)) = *((const device uint4*)(qp + src * q_strides[2] + c));
  }

  // This thread's part of the softmax: row `r`, keys [key0, key0 + ROW_KEYS) of each tile.
  const int r = int(t) / ROW_THREADS;
  const int key0 = int(t) % ROW_THREADS * ROW_KEYS;
  const int position = row0 + r;
  const int last_visible = S - L + position;  // "causal": query `position` sits at key S - L + position
  int64_t mask_row = 0;
  if (HAS_MASK) {
    mask_row = (mask_shape[0] == 1 ? 0 : b * mask_strides[0]) + metal::min(position, L - 1) * mask_strides[2];
  }
  float m = GEMMA_NEG_BIG;
  float l = 0.0f;

  // This simdgroup's score accumulators: row block s_block, columns s_col0 + 8 * f.
  const int s_block = int(sg) * S_FRAGS / (BK / 8);
  const int s_col0 = int(sg) * S_FRAGS % (BK / 8) * 8;
  mma_frag_c out_acc[CHUNKS][SM][ON];
  for (int c = 0; c < CHUNKS; c++) {
    for (int i = 0; i < SM; i++) {
      for (int n = 0; n < ON; n++) {
        mma_clear(out_acc[c][i][n]);
      }
    }
  }

  const int key_end = CAUSAL ? metal::min(S, S - L + row0 + rows) : S;
  for (int k0 = 0; k0 < key_end; k0 += BK) {
    bool visible[ROW_KEYS];
    bool any = false;
    for (int e = 0; e < ROW_KEYS; e++) {
      const int j = k0 + key0 + e;
      bool seen = j < S && r < rows;
      if (CAUSAL) {
        seen = seen && j <= last_visible;
      }
      if (HAS_MASK) {
        seen = seen && mask[mask_row + metal::min(j, S - 1) * mask_strides[3]];
      }
      visible[e] = seen;
      any = any || seen;
    }
    if (HAS_MASK) {
      threadgroup_barrier(mem_flags::mem_threadgroup);  // every thread has read the last tile's flag
      if (t == 0) {
        tile_seen[0] = 0;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (any) {
        tile_seen[0] = 1;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (tile_seen[0] == 0) {
        continue;
      }
    }

    // Steps 0 .. CHUNKS - 1 take K's chunks into the scores, then the softmax; steps CHUNKS ..
    // 2 * CHUNKS - 1 take V's chunks into the output. Each step's chunk was loaded to registers
    // during the step before (step -1 only loads), so that its loads are in flight meanwhile.
    mma_frag_c scores[S_FRAGS];
    for (int f = 0; f < S_FRAGS; f++) {
      mma_clear(scores[f]);
    }
    uint4 staged[KV_LOADS];
    for (int step = -1; step < 2 * CHUNKS; step++) {
      if (step >= 0) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // kv_tile is free; p_tile and row_scale are written
        for (int i = 0; i < KV_LOADS; i++) {
          const int word = int(t) + i * THREADS;
          *((TG_ADDR uint4*)(kv_tile + word / (DC / 8) * KV_STRIDE + word % (DC / 8) * 8)) = staged[i];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      const int next = step + 1;
      if (next < 2 * CHUNKS) {
        const device T* src = next < CHUNKS ? kp : vp;
        const int64_t src_row = next < CHUNKS ? k_strides[2] : v_strides[2];
        for (int i = 0; i < KV_LOADS; i++) {
          const int word = int(t) + i * THREADS;
          const int key = metal::min(k0 + word / (DC / 8), S - 1);
          staged[i] = *((const device uint4*)(src + key * src_row + next % CHUNKS * DC + word % (DC / 8) * 8));
        }
      }
      if (step < 0) {
        continue;
      }
      const int c = step % CHUNKS;
      if (step < CHUNKS) {
        for (int kk = 0; kk < DC; kk += 16) {
          mma_frag_a<T> a;
          mma_load_a(a, q_tile + s_block * 16 * Q_STRIDE + c * DC + kk, Q_STRIDE, lane);
          for (int f = 0; f < S_FRAGS; f++) {
            mma_frag_b<T> kf;
            mma_load_b(kf, kv_tile + (s_col0 + 8 * f) * KV_STRIDE + kk, KV_STRIDE, lane);
            mma_fma(scores[f], a, kf);
          }
        }
        if (step == CHUNKS - 1) {
          for (int f = 0; f < S_FRAGS; f++) {
            mma_store_scores(scores[f], s_tile + s_block * 16 * S_STRIDE + s_col0 + 8 * f, S_STRIDE, lane);
          }
          threadgroup_barrier(mem_flags::mem_threadgroup);
          float s[ROW_KEYS];
          float tile_max = GEMMA_NEG_BIG;
          for (int e = 0; e < ROW_KEYS; e++) {
            s[e] = visible[e] ? s_tile[r * S_STRIDE + key0 + e] : GEMMA_NEG_BIG;
            tile_max = metal::max(tile_max, s[e]);
          }
          for (int o = ROW_THREADS / 2; o > 0; o /= 2) {
            tile_max = metal::max(tile_max, simd_shuffle_xor(tile_max, o));
          }
          const float m_new = metal::max(m, tile_max);
          const float alpha = metal::exp(m - m_new);
          float tile_sum = 0.0f;
          for (int e = 0; e < ROW_KEYS; e++) {
            const float p = visible[e] ? metal::exp(s[e] - m_new) : 0.0f;
            tile_sum += p;
            p_tile[r * P_STRIDE + key0 + e] = static_cast<T>(p);
          }
          for (int o = ROW_THREADS / 2; o > 0; o /= 2) {
            tile_sum += simd_shuffle_xor(tile_sum, o);
          }
          l = l * alpha + tile_sum;
          m = m_new;
          if (key0 == 0) {
            row_scale[r] = alpha;
          }
        }
      } else {
        for (int i = 0; i < SM; i++) {
          for (int n = 0; n < ON; n++) {
            mma_scale_rows(out_acc[c][i][n], row_scale + 16 * i, lane);
          }
          for (int kk = 0; kk < BK; kk += 16) {
            mma_frag_a<T> a;
            mma_load_a(a, p_tile + 16 * i * P_STRIDE + kk, P_STRIDE, lane);
            for (int n = 0; n < ON; n++) {
              mma_frag_b<T> vf;
              mma_load_b_kn(vf, kv_tile + kk * KV_STRIDE + (int(sg) * ON + n) * 8, KV_STRIDE, lane);
              mma_fma(out_acc[c][i][n], a, vf);
            }
          }
        }
      }
    }
  }

  threadgroup_barrier(mem_flags::mem_threadgroup);  // the last tile's row_scale is read
  if (key0 == 0) {
    row_scale[r] = l > 0.0f ? 1.0f / l : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int out_stride = Hq * D;
  for (int c = 0; c < CHUNKS; c++) {
    for (int i = 0; i < SM; i++) {
      for (int n = 0; n < ON; n++) {
        mma_scale_rows(out_acc[c][i][n], row_scale + 16 * i, lane);
        const int first = row0 + 16 * i;
        const int col = c * DC + (int(sg) * ON + n) * 8;
        mma_store(out_acc[c][i][n], out + (size_t(b) * L + first) * out_stride + h * D + col, out_stride,
                  rows - 16 * i, 8, lane);
      }
    }
  }
