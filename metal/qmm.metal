// qmm: out = x @ dequantize(w).T for prompt chunks, on the tensor cores, with MLX's affine 4- and
// 8-bit layout as qmv.metal reads it (each row of w packs K BITS-bit values low bits first into
// uint32 words; value q of group g stands for scales[n, g] * q + biases[n, g]). At 128 rows MLX's
// CUDA quantized_matmul runs the 31B's projections at 100-140 TFLOPs on an H100 (metal/README.md).
// A threadgroup owns a BM x BN tile of out; its WM x WN simdgroups own (BM / WM) x (BN / WN) parts
// of it, as FM x FN accumulators of 16 x 8 (common.h's mma_* helpers: simdgroup matrices on
// Metal, mma.sync on CUDA). For each BK = 64 values of K, the threadgroup copies BM rows of x to
// threadgroup memory and dequantizes BN rows of w there, rounded to T as MLX's dequantize
// rounds them (4-bit values two at a time: dequantize_pairs). The next step's loads are issued
// before this step's products, so that they are in flight while the tensor cores run. Sums in
// float32.
// In: x [..., K] (T: bfloat16 or float16; rows past the last are read as the last, never
// stored), w [N, K * BITS / 32] uint32, scales, biases [N, K / GROUP] (T).
// Out: [..., N] in T; with SPLITS > 1, [SPLITS, M, N] float32 partial sums for the caller to
// add: split z of K's steps goes to out[z] (split K: a narrow N leaves most of the GPU idle).
// K a multiple of 64, GROUP a multiple of 32.
// Grid: ceil(M / BM) x ceil(N / BN) x SPLITS threadgroups of 32 * WM * WN threads.
// Templates: T, BITS, GROUP, BM, BN, WM, WN (BN * 64 / (32 * WM * WN), a thread's run of w, 16 or
// 32), SPLITS.

// @kernel qmm
  constexpr int BK = 64;
  constexpr int STRIDE = BK + 8;  // padded rows: a simdgroup's fragment loads hit 32 distinct banks
  constexpr int THREADS = 32 * WM * WN;
  constexpr int FM = BM / WM / 16;
  constexpr int FN = BN / WN / 8;
  constexpr int RUN = BN * BK / THREADS;  // values of one row of w a thread dequantizes per step
  constexpr int WORDS = RUN * BITS / 32;
  constexpr int X_LOADS = BM * BK / 8 / THREADS;  // 16-byte words of x a thread copies per step
  constexpr uint MASK = (1u << BITS) - 1u;
  static_assert(RUN == 16 || RUN == 32, "a run is 2-8 words of w, within one group");
  const int K = int(w_shape[1]) * 32 / BITS;
  const int N = int(w_shape[0]);
  int M = 1;
  for (int d = 0; d < int(x_ndim) - 1; d++) {
    M *= int(x_shape[d]);
  }
  const int GROUPS = K / GROUP;
  const uint t = thread_position_in_threadgroup.x;
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const int row0 = int(threadgroup_position_in_grid.x) * BM;
  const int col0 = int(threadgroup_position_in_grid.y) * BN;
  const int split = int(threadgroup_position_in_grid.z);
  const int first_step = split * (K / BK) / SPLITS;
  const int steps = (split + 1) * (K / BK) / SPLITS - first_step;
  const int warp_row = int(sg) / WN * (BM / WM);
  const int warp_col = int(sg) % WN * (BN / WN);
  threadgroup T x_tile[BM * STRIDE];
  threadgroup T w_tile[BN * STRIDE];
  // This thread's run of w: row w_row of the tile (rows past N read row N - 1, never stored).
  const int w_row = int(t) / (BK / RUN);
  const int w_col = int(t) % (BK / RUN) * RUN;
  const int w_n = metal::min(col0 + w_row, N - 1);
  const device uint* w_src = w + size_t(w_n) * (K * BITS / 32);
  uint4 x_next[X_LOADS];
  uint words[WORDS];
  T scale_next = static_cast<T>(0.0f);
  T bias_next = static_cast<T>(0.0f);
  mma_frag_c acc[FM][FN];
  for (int fm = 0; fm < FM; fm++) {
    for (int fn = 0; fn < FN; fn++) {
      mma_clear(acc[fm][fn]);
    }
  }
  // Both tiles hold K in the order of dequantize_pairs' pairs: values (i, i + 4) of each 8 side
  // by side, which a product over K does not see.
  // Step s stores the loads of step s - 1 in the tiles, issues the loads of step s, then takes
  // the products of step s - 1.
  for (int step = 0; step <= steps; step++) {
    if (step > 0) {
      threadgroup_barrier(mem_flags::mem_threadgroup);  // the last products have read the tiles
      for (int i = 0; i < X_LOADS; i++) {
        const int q = int(t) + i * THREADS;
        const uint4 v = x_next[i];
        uint4 stored;
        stored.x = (v.x & 0xFFFFu) | (v.z << 16);
        stored.y = (v.x >> 16) | (v.z & 0xFFFF0000u);
        stored.z = (v.y & 0xFFFFu) | (v.w << 16);
        stored.w = (v.y >> 16) | (v.w & 0xFFFF0000u);
        *((TG_ADDR uint4*)(x_tile + q / 8 * STRIDE + q % 8 * 8)) = stored;
      }
      for (int p = 0; p < RUN / 8; p++) {
        uint packed[4];
        if (BITS == 4) {
          dequantize_pairs(words[p], scale_next, bias_next, packed);
        } else {
          for (int h = 0; h < 4; h++) {
            float pair[2];
            for (int e = 0; e < 2; e++) {
              const int j = p * 8 + h + 4 * e;
              // OR-ing 0x4B000000 makes the float 2^23 + q: no integer-to-float conversion.
              const uint q = ((words[j * BITS / 32] >> (j * BITS % 32)) & MASK) | 0x4B000000u;
              pair[e] = metal::fma(as_type<float>(q) - 8388608.0f, static_cast<float>(scale_next),
                                   static_cast<float>(bias_next));
            }
            packed[h] = pack_pair<T>(pair[0], pair[1]);
          }
        }
        uint4 stored;
        stored.x = packed[0];
        stored.y = packed[1];
        stored.z = packed[2];
        stored.w = packed[3];
        *((TG_ADDR uint4*)(w_tile + w_row * STRIDE + w_col + p * 8)) = stored;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (step < steps) {
      const int k0 = (first_step + step) * BK;
      for (int i = 0; i < X_LOADS; i++) {
        const int q = int(t) + i * THREADS;
        const int r = metal::min(row0 + q / 8, M - 1);
        x_next[i] = *((const device uint4*)(x + size_t(r) * K + k0 + q % 8 * 8));
      }
      for (int i = 0; i < WORDS / 2; i++) {
        uint2 packed = *((const device uint2*)(w_src + (k0 + w_col) * BITS / 32) + i);
        words[2 * i] = packed.x;
        words[2 * i + 1] = packed.y;
      }
      scale_next = scales[w_n * GROUPS + (k0 + w_col) / GROUP];
      bias_next = biases[w_n * GROUPS + (k0 + w_col) / GROUP];
    }
    if (step > 0) {
      for (int kk = 0; kk < BK; kk += 16) {
        mma_frag_b<T> b[FN];
        for (int fn = 0; fn < FN; fn++) {
          mma_load_b(b[fn], w_tile + (warp_col + fn * 8) * STRIDE + kk, STRIDE, lane);
        }
        for (int fm = 0; fm < FM; fm++) {
          mma_frag_a<T> a;
          mma_load_a(a, x_tile + (warp_row + fm * 16) * STRIDE + kk, STRIDE, lane);
          for (int fn = 0; fn < FN; fn++) {
            mma_fma(acc[fm][fn], a, b[fn]);
          }
        }
      }
    }
  }
  for (int fm = 0; fm < FM; fm++) {
    for (int fn = 0; fn < FN; fn++) {
      const int r = row0 + warp_row + fm * 16;
      const int c = col0 + warp_col + fn * 8;
      mma_store(acc[fm][fn], out + (size_t(split) * M + r) * N + c, N, M - r, N - c, lane);
    }
  }
