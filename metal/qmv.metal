// qmv: out = x @ dequantize(w).T for a few rows of x (decode, MAX_DECODE_QUERIES at most), with
// MLX's affine quantization: each row of w packs K BITS-bit values low bits first into uint32
// words, and value q of group g (GROUP values along K) stands for scales[n, g] * q + biases[n, g].
// BITS 16: w holds the values themselves, [N, K] of a 16-bit float type WT (scales and biases
// unread): MLX's bf16 matrix-vector product is one launch too, so it takes this path only where
// the kernel saves a launch (GATED, NORM_RESIDUAL).
// A threadgroup owns RPS rows; its SIMDS simdgroups split K between them (interleaved 16-byte
// loads per lane, VPT values all in one group) and add their sums through threadgroup memory,
// so even a 5376-row projection keeps every SM busy. x is read as 16-byte words where T is
// bfloat16: value-by-value reads of x, 64 bytes apart across a simdgroup's lanes, held an
// earlier version below MLX's speed in a chain of dependent calls (metal/README.md).
// Sums in float32: per step, scale * sum(x q) + bias * sum(x), as MLX's own qmv does. A 4-bit
// product is bound by the instructions per weight, so no q is shifted alone or converted from an
// integer (see the two inner loops).
// GATED (a define): x is gelu_tanh(gate) * up, rounded to T as gelu_gate's output is, made as it
// is loaded: the MLP's down projection reads the gate|up halves of one array, the PLE projection
// the gate and its layer's columns of the per-layer inputs, with no gelu_gate launch between.
// GELU_HALVES (a define): w's N rows are a gate half and an up half (the MLP's fused gate|up
// projection). A threadgroup takes RPS / 2 rows of each, the same rows of both, and writes out
// [M, N / 2] = gelu_tanh(gate) * up of its pairs, as gelu_gate makes it of the rounded product:
// the down projection then reads its x as it is, where GATED remakes it in every threadgroup.
// NORM_RESIDUAL (a define; CUDA only, for cuda_compat.h's arrive_last): the launch ends a
// sub-block as norm_residual does, on the product's rows: out = (residual + RMSNorm(product) *
// norm_w) * scale, and with NEXT_NORMS (a define, 0-3) normed = RMSNorm(out) * next_w, normed_2
// and normed_3 likewise with next_w_2 and next_w_3. Each threadgroup leaves its rows of the
// product, rounded to T, in the float32 scratch input `projected` [M * N]; the last to finish
// reads them back. Extra inputs: residual [M, N], norm_w [N], scale [1], next_w, next_w_2,
// next_w_3 [N] (up to NEXT_NORMS), params float32 [eps], arrivals uint32 (0 between launches),
// projected. Extra templates: HAS_SCALE, HIDDEN (N).
// ROPE_NORM (a define; CUDA only, for arrive_last): the launch is attention's q|k|v projection
// and its rope_norm (rope_norm.metal), on the product's rows: w's N rows are HIN heads of D, q
// heads, then k heads, then v heads (none where V_FROM_K: v is the scale-free norm of the raw k
// heads). Each threadgroup leaves its rows, rounded to T, in `projected` as NORM_RESIDUAL does,
// and the last of a head's to finish norms and rotates it: queries [B, NQ, L, D] out; with
// INTO_CACHE (a define; L = 1) keys and values into k_cache, v_cache [B, NKV, slots, D] at slot
// int32 [1]. Extra inputs: q_w, k_w [D], pos int32 [B], inv_freq float32 [2, D/2], params float32
// [eps], arrivals uint32 [HIN] (0 between launches), projected [M * N], INTO_CACHE: k_cache,
// v_cache, slot. Extra templates: D, NQ, NKV, V_FROM_K; RPS divides D.
// THEN_QMV (a define, with NORM_RESIDUAL and no next norm): the launch also makes the next
// projection of its output, then_out [M, P] = out @ dequantize(then_w).T (a PLE layer's gate):
// THEN_TGS threadgroups past the product's wait for the last one's out, a simdgroup a row of
// then_w. Extra inputs: then_w [P, HIDDEN * THEN_BITS / 32] uint32 (or [P, HIDDEN] of WT where
// THEN_BITS is 16), then_scales, then_biases; arrivals [3]: the product's, the flag out is written
// under, the waiters'. Extra templates: THEN_BITS, THEN_GROUP, THEN_TGS.
// In: x [M, x columns] (T; GATED: the gate, its first K columns), GATED: up [M, up columns] and
// up_column int32 [1] (up's first column), w [N, K * BITS / 32] uint32 (or [N, K]), scales,
// biases [N, K / GROUP]. K is w's. Rows of x and up 16-byte aligned where T is bfloat16.
// Out: [M, N] in T (GELU_HALVES: [M, N / 2]; NORM_RESIDUAL: out, then the NEXT_NORMS normed outputs).
// Grid: ceil(N / RPS) threadgroups of SIMDS simdgroups (THEN_QMV: THEN_TGS more).
// Templates: T, WT (w's type), M, BITS, GROUP, RPS, SIMDS, X_BF16 (T is bfloat16), W_BF16 (WT is
// bfloat16); K and N are read from the shapes, so one build serves every projection of a model.

// @kernel qmv
  constexpr int VPT = 128 / BITS;
  constexpr bool DENSE = BITS == 16;
  constexpr int QBITS = DENSE ? 4 : BITS;  // the quantized loops' width (compiled, unrun, where DENSE)
  const int K = DENSE ? int(w_shape[1]) : int(w_shape[1]) * 32 / BITS;
  const int N = int(w_shape[0]);
  const int GROUPS = DENSE ? 1 : K / GROUP;
  const int x_row = int(x_shape[x_ndim - 1]);
#if GATED
  const int up_row = int(up_shape[up_ndim - 1]);
#endif
  constexpr uint MASK = (1u << QBITS) - 1u;
  // 16-bit outputs take the paired loop, whose error (about 2^-16 of the output at 4 bits, 2^-14
  // at 8) is far under their rounding; float32 outputs keep the exact loop.
  constexpr bool PAIRED = sizeof(T) == 2;
  // 0 at run time, unknown to the compiler: with the constant in a register, the paired loop's
  // mask-and-OR is one LOP3 (with two immediates it takes two instructions).
  const uint one_bits = 0x3F800000u | (uint(x_ndim) >> 16);
  const uint lane = thread_index_in_simdgroup;
  const uint group_simd = simdgroup_index_in_threadgroup;
#if THEN_QMV
  const int then_block = int(threadgroup_position_in_grid.x) - (N + RPS - 1) / RPS;
  if (then_block >= 0) {
    // A waiter: a simdgroup a row of then_out. Its row of then_w is loaded while the product runs,
    // so once the last product threadgroup has written out, only out's reads remain.
    constexpr int THEN_VPT = 128 / THEN_BITS;
    constexpr int THEN_LOADS = (HIDDEN + 32 * THEN_VPT - 1) / (32 * THEN_VPT);
    constexpr uint THEN_MASK = THEN_BITS == 16 ? 0xFFFFu : (1u << THEN_BITS) - 1u;
    const int P = int(then_w_shape[0]);
    const int wanted = then_block * SIMDS + int(group_simd);
    const int row = metal::min(wanted, P - 1);  // past P: row P - 1, unwritten
    uint4 packed[THEN_LOADS];
    float scale_of[THEN_LOADS];
    float bias_of[THEN_LOADS];
    for (int i = 0; i < THEN_LOADS; i++) {
      const int k0 = metal::min((int(lane) + 32 * i) * THEN_VPT, HIDDEN - THEN_VPT);
      packed[i] = *((const device uint4*)((const device uint*)(then_w) + (size_t(row) * HIDDEN + k0) * THEN_BITS / 32));
      const int g = row * (HIDDEN / THEN_GROUP) + k0 / THEN_GROUP;
      scale_of[i] = THEN_BITS == 16 ? 0.0f : static_cast<float>(then_scales[g]);
      bias_of[i] = THEN_BITS == 16 ? 0.0f : static_cast<float>(then_biases[g]);
    }
    if (group_simd == 0 && lane == 0) {
      wait_flag(arrivals + 1);
    }
    threadgroup_barrier(mem_flags::mem_device);
    // wait_flag's fence orders these reads after the last product threadgroup's writes.
    const device T* written = out;
    for (int m = 0; m < M; m++) {
      float acc = 0.0f;
      for (int i = 0; i < THEN_LOADS; i++) {
        const int k0 = (int(lane) + 32 * i) * THEN_VPT;
        if (k0 >= HIDDEN) {
          continue;
        }
        float hs[THEN_VPT];
        load_floats<T, THEN_VPT, X_BF16>(written + m * HIDDEN + k0, hs);
        const uint words[4] = {packed[i].x, packed[i].y, packed[i].z, packed[i].w};
        if (THEN_BITS == 16) {
          float ws[THEN_VPT];
          unpack_floats<WT, W_BF16>(words, ws);  // 8 values: a 16-bit then_w
          for (int j = 0; j < THEN_VPT; j++) {
            acc += hs[j] * ws[j];
          }
          continue;
        }
        // A 16-byte load's values share one group: scale * sum(h q) + bias * sum(h).
        float dot = 0.0f;
        float h_sum = 0.0f;
        for (int j = 0; j < THEN_VPT; j++) {
          const uint q = (words[j * THEN_BITS / 32] >> ((j * THEN_BITS) % 32)) & THEN_MASK;
          dot += hs[j] * float(q);
          h_sum += hs[j];
        }
        acc += scale_of[i] * dot + bias_of[i] * h_sum;
      }
      const float total = simd_sum(acc);
      if (lane == 0 && wanted < P) {
        then_out[m * P + row] = static_cast<T>(total);
      }
    }
    // The last waiter lowers the flag for the next launch.
    threadgroup_barrier(mem_flags::mem_device);
    if (group_simd == 0 && lane == 0 && arrive_last(arrivals + 2, uint(THEN_TGS))) {
      *(const_cast<device uint*>(arrivals) + 1) = 0u;
    }
    return;
  }
#endif
  int rows[RPS];
#if GELU_HALVES
  const int pair = int(threadgroup_position_in_grid.x) * (RPS / 2);  // N / 2 is a multiple of RPS / 2
  for (int r = 0; r < RPS; r++) {
    rows[r] = pair + r + (r < RPS / 2 ? 0 : N / 2 - RPS / 2);  // gate rows, then up's
  }
#else
  const int first = int(threadgroup_position_in_grid.x) * RPS;
  for (int r = 0; r < RPS; r++) {
    rows[r] = metal::min(first + r, N - 1);  // rows past N load row N - 1 and are not written
  }
#endif
  float acc[RPS][M];
  for (int r = 0; r < RPS; r++) {
    for (int m = 0; m < M; m++) {
      acc[r][m] = 0.0f;
    }
  }
  for (int k0 = (int(group_simd) * 32 + int(lane)) * VPT; k0 < K; k0 += 32 * SIMDS * VPT) {
    uint words[RPS][4];
    float scale[RPS];
    float bias[RPS];
    float dense[RPS][VPT];
    for (int r = 0; r < RPS; r++) {
      if (DENSE) {
        load_floats<WT, VPT, W_BF16>(w + size_t(rows[r]) * K + k0, dense[r]);
        continue;
      }
      uint4 packed = *((const device uint4*)(w + (size_t(rows[r]) * K + k0) * BITS / 32));
      words[r][0] = packed.x;
      words[r][1] = packed.y;
      words[r][2] = packed.z;
      words[r][3] = packed.w;
      scale[r] = static_cast<float>(scales[rows[r] * GROUPS + k0 / GROUP]);
      bias[r] = static_cast<float>(biases[rows[r] * GROUPS + k0 / GROUP]);
    }
    for (int m = 0; m < M; m++) {
      float xs[VPT];
      load_floats<T, VPT, X_BF16>(x + m * x_row + k0, xs);
#if GATED
      float ups[VPT];
      load_floats<T, VPT, X_BF16>(up + m * up_row + up_column[0] + k0, ups);
      for (int j = 0; j < VPT; j++) {
        xs[j] = round_to<T>(gelu_tanh(xs[j]) * ups[j]);
      }
#endif
      float x_sum = 0.0f;
      float dot[RPS];
      if (DENSE) {
        for (int r = 0; r < RPS; r++) {
          dot[r] = 0.0f;
          for (int j = 0; j < VPT; j++) {
            dot[r] += xs[j] * dense[r][j];
          }
        }
        for (int r = 0; r < RPS; r++) {
          acc[r][m] += dot[r];
        }
        continue;
      }
      if (PAIRED) {
        // One shift puts values 2 * pair and 2 * pair + 1 of a word at mantissa bits LO.. and
        // LO + BITS.. of 1.0f, where a LOP3 each makes them floats 1 + q * 2^(bit - 23): sum x
        // times those, take away the sum of x and scale back. Per value: half a shift, a LOP3 and
        // an FMA.
        constexpr int LO = 23 - 2 * QBITS;
        float x_even = 0.0f;
        float x_odd = 0.0f;
        float sum_lo[RPS];
        float sum_hi[RPS];
        for (int r = 0; r < RPS; r++) {
          sum_lo[r] = 0.0f;
          sum_hi[r] = 0.0f;
        }
        for (int word = 0; word < 4; word++) {
          for (int pair = 0; pair < 16 / QBITS; pair++) {
            const int j = word * (32 / QBITS) + 2 * pair;
            const int shift = LO - 2 * pair * QBITS;
            x_even += xs[j];
            x_odd += xs[j + 1];
            for (int r = 0; r < RPS; r++) {
              const uint placed = shift >= 0 ? (words[r][word] << shift) : (words[r][word] >> (-shift));
              sum_lo[r] += xs[j] * as_type<float>((placed & (MASK << LO)) | one_bits);
              sum_hi[r] += xs[j + 1] * as_type<float>((placed & (MASK << (LO + QBITS))) | one_bits);
            }
          }
        }
        x_sum = x_even + x_odd;
        for (int r = 0; r < RPS; r++) {
          dot[r] = (sum_lo[r] - x_even) * float(1u << (23 - LO))
              + (sum_hi[r] - x_odd) * float(1u << (23 - LO - QBITS));
        }
      } else {
        for (int r = 0; r < RPS; r++) {
          dot[r] = 0.0f;
        }
        for (int j = 0; j < VPT; j++) {
          float xj = xs[j];
          x_sum += xj;
          // Value j sits in 16-bit half `high` of its word, at place `place` there. Masked in place,
          // it reads q * 2^(place * BITS); x scaled by the inverse power of two (exact) undoes it.
          const int place = j % (16 / QBITS);
          const bool high = (j * QBITS / 16) % 2 == 1;
          const float x_placed = xj * (1.0f / float(1u << (place * QBITS)));
          for (int r = 0; r < RPS; r++) {
            uint half_word = high ? (words[r][j * QBITS / 32] >> 16) : words[r][j * QBITS / 32];
            // OR-ing 0x4B000000 makes the float 2^23 + v: a mask, an OR and a subtract instead of
            // a shift and an int-to-float conversion, which runs at a fraction of the FMA rate.
            uint v = (half_word & (MASK << (place * QBITS))) | 0x4B000000u;
            dot[r] += x_placed * (as_type<float>(v) - 8388608.0f);
          }
        }
      }
      for (int r = 0; r < RPS; r++) {
        acc[r][m] += scale[r] * dot[r] + bias[r] * x_sum;
      }
    }
  }
  threadgroup float partial[SIMDS * RPS * M];
  for (int r = 0; r < RPS; r++) {
    for (int m = 0; m < M; m++) {
      float total = simd_sum(acc[r][m]);
      if (lane == 0) {
        partial[(int(group_simd) * RPS + r) * M + m] = total;
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
#if GELU_HALVES
  for (int t = int(group_simd) * 32 + int(lane); t < (RPS / 2) * M; t += SIMDS * 32) {
    float gate_total = 0.0f;
    float up_total = 0.0f;
    for (int s = 0; s < SIMDS; s++) {
      gate_total += partial[s * RPS * M + t];
      up_total += partial[s * RPS * M + (RPS / 2) * M + t];
    }
    const float gelu = gelu_tanh(round_to<T>(gate_total));
    out[(t % M) * (N / 2) + pair + t / M] = static_cast<T>(gelu * round_to<T>(up_total));
  }
#else
#if NORM_RESIDUAL || ROPE_NORM
  device float* product = const_cast<device float*>(projected);
#endif
  for (int t = int(group_simd) * 32 + int(lane); t < RPS * M; t += SIMDS * 32) {
    float total = 0.0f;
    for (int s = 0; s < SIMDS; s++) {
      total += partial[s * RPS * M + t];
    }
    const int r = t / M;
    if (first + r < N) {
#if NORM_RESIDUAL || ROPE_NORM
      product[(t % M) * N + first + r] = round_to<T>(total);
#else
      out[(t % M) * N + first + r] = static_cast<T>(total);
#endif
    }
  }
#endif
#if NORM_RESIDUAL
  // The last threadgroup to finish runs norm_residual (norm_residual.metal) over the product's
  // rows, which the others left in `projected`.
  threadgroup uint finishes[1];
  threadgroup float buf[SIMDS];
  const uint tid = group_simd * 32 + lane;
  if (threadgroup_arrives_last(arrivals, uint((N + RPS - 1) / RPS), finishes, tid)) {
    // Each thread's values go CHUNK at a time, their loads issued before any is used: the lone
    // threadgroup would otherwise wait on memory once per value. Where they fit one chunk (HELD),
    // the residual and the weights load with the product and stay in registers: one wait on
    // memory for the whole epilogue instead of one a pass.
    constexpr int TG = SIMDS * 32;
    constexpr int PER_THREAD = (HIDDEN + TG - 1) / TG;
    constexpr int CHUNK = PER_THREAD < 16 ? PER_THREAD : 16;
    constexpr bool HELD = PER_THREAD <= 12;  // then one chunk: CHUNK is PER_THREAD
    constexpr int NEXT = NEXT_NORMS > 0 ? NEXT_NORMS : 1;
    // Volatile: other threadgroups of this launch wrote it.
    const volatile device float* rows_in = projected;
    const float eps = params[0];
    const float sc = HAS_SCALE ? static_cast<float>(scale[0]) : 1.0f;
    for (int m = 0; m < M; m++) {
      const size_t base = size_t(m) * HIDDEN;
      float xs[CHUNK];
      float res[CHUNK];
      float ws[CHUNK];
      float nexts[NEXT][CHUNK];
      float ss = 0.0f;
      for (int k0 = 0; k0 < PER_THREAD; k0 += CHUNK) {
        for (int k = 0; k < CHUNK; k++) {
          const int i = metal::min(int(tid) + (k0 + k) * TG, HIDDEN - 1);
          xs[k] = rows_in[base + i];
          if (HELD) {
            res[k] = static_cast<float>(residual[base + i]);
            ws[k] = static_cast<float>(norm_w[i]);
#if NEXT_NORMS > 0
            nexts[0][k] = static_cast<float>(next_w[i]);
#endif
#if NEXT_NORMS > 1
            nexts[1][k] = static_cast<float>(next_w_2[i]);
#endif
#if NEXT_NORMS > 2
            nexts[2][k] = static_cast<float>(next_w_3[i]);
#endif
          }
        }
        for (int k = 0; k < CHUNK; k++) {
          ss += int(tid) + (k0 + k) * TG < HIDDEN ? xs[k] * xs[k] : 0.0f;
        }
      }
      const float r = metal::precise::rsqrt(block_sum<SIMDS>(ss, buf, lane, group_simd) / float(HIDDEN) + eps);
      float ss_out = 0.0f;
      for (int k0 = 0; k0 < PER_THREAD; k0 += CHUNK) {
        for (int k = 0; k < CHUNK && !HELD; k++) {
          const int i = metal::min(int(tid) + (k0 + k) * TG, HIDDEN - 1);
          xs[k] = rows_in[base + i];
          res[k] = static_cast<float>(residual[base + i]);
          ws[k] = static_cast<float>(norm_w[i]);
        }
        for (int k = 0; k < CHUNK; k++) {
          const int i = int(tid) + (k0 + k) * TG;
          xs[k] = residual_value<T, HAS_SCALE>(xs[k], r, ws[k], res[k], sc);  // out's value, kept for the next norms
          if (i < HIDDEN) {
            out[base + i] = static_cast<T>(xs[k]);
            ss_out += xs[k] * xs[k];
          }
        }
      }
#if NEXT_NORMS > 0
      const float r_out = metal::precise::rsqrt(block_sum<SIMDS>(ss_out, buf, lane, group_simd) / float(HIDDEN) + eps);
      for (int k0 = 0; k0 < PER_THREAD; k0 += CHUNK) {
        for (int k = 0; k < CHUNK && !HELD; k++) {
          const int i = metal::min(int(tid) + (k0 + k) * TG, HIDDEN - 1);
          xs[k] = static_cast<float>(out[base + i]);
          nexts[0][k] = static_cast<float>(next_w[i]);
#if NEXT_NORMS > 1
          nexts[1][k] = static_cast<float>(next_w_2[i]);
#endif
#if NEXT_NORMS > 2
          nexts[2][k] = static_cast<float>(next_w_3[i]);
#endif
        }
        for (int k = 0; k < CHUNK; k++) {
          const int i = int(tid) + (k0 + k) * TG;
          if (i < HIDDEN) {
            const float v = xs[k] * r_out;
            normed[base + i] = static_cast<T>(v * nexts[0][k]);
#if NEXT_NORMS > 1
            normed_2[base + i] = static_cast<T>(v * nexts[1][k]);
#endif
#if NEXT_NORMS > 2
            normed_3[base + i] = static_cast<T>(v * nexts[2][k]);
#endif
          }
        }
      }
#endif
    }
#if THEN_QMV
    // out is written: the waiters go on.
    threadgroup_barrier(mem_flags::mem_device);
    if (tid == 0) {
      raise_flag(arrivals + 1);
    }
#endif
  }
#endif
#if ROPE_NORM
  // The last threadgroup of each head to finish norms and rotates its rows, which the head's
  // threadgroups left in `projected`, as rope_norm.metal does.
  threadgroup uint finishes[1];
  threadgroup float buf[SIMDS];
  const uint tid = group_simd * 32 + lane;
  const int head = first / D;
  if (threadgroup_arrives_last(arrivals + head, uint(D / RPS), finishes, tid)) {
    constexpr int TG = SIMDS * 32;
    constexpr int HALF = D / 2;
    constexpr int PAIRS = (HALF + TG - 1) / TG;  // a thread's pairs t, t + TG, ...
    // Volatile: other threadgroups of this launch wrote it.
    const volatile device float* rows_in = projected;
    const bool is_v = head >= NQ + NKV;
    const bool is_k = !is_v && head >= NQ;
    const int L = int(x_shape[x_ndim - 2]);
    for (int m = 0; m < M; m++) {
      const int b = m / L;
      const int l = m % L;
      // The weights, frequencies and position load with the rows: one wait on memory, not one a pass.
      const float eps = params[0];
      const float p = float(pos[b] + l);
#if INTO_CACHE
      const int kv_head = is_v ? head - NQ - NKV : head - NQ;
      const size_t cache_base = (size_t(b) * NKV + kv_head) * size_t(k_cache_shape[2]) + size_t(slot[0]);
#endif
      float x1[PAIRS];
      float x2[PAIRS];
      float w1[PAIRS];
      float w2[PAIRS];
      float high[PAIRS];
      float low[PAIRS];
      float ss = 0.0f;
      for (int i = 0; i < PAIRS; i++) {
        const int t = metal::min(int(tid) + i * TG, HALF - 1);
        x1[i] = rows_in[size_t(m) * N + head * D + t];
        x2[i] = rows_in[size_t(m) * N + head * D + t + HALF];
        w1[i] = is_v ? 1.0f : static_cast<float>(is_k ? k_w[t] : q_w[t]);
        w2[i] = is_v ? 1.0f : static_cast<float>(is_k ? k_w[t + HALF] : q_w[t + HALF]);
        high[i] = inv_freq[t];
        low[i] = inv_freq[HALF + t];
      }
      for (int i = 0; i < PAIRS; i++) {
        ss += int(tid) + i * TG < HALF ? x1[i] * x1[i] + x2[i] * x2[i] : 0.0f;
      }
      const float r = metal::precise::rsqrt(block_sum<SIMDS>(ss, buf, lane, group_simd) / float(D) + eps);
      for (int i = 0; i < PAIRS; i++) {
        const int t = int(tid) + i * TG;
        if (t >= HALF) {
          continue;
        }
        float o1;
        float o2;
        norm_rotate_pair<T>(x1[i], x2[i], r, w1[i], w2[i], !is_v, p, high[i], low[i], &o1, &o2);
        if (!is_k && !is_v) {
          const size_t base = ((size_t(b) * NQ + head) * L + l) * D;
          queries[base + t] = static_cast<T>(o1);
          queries[base + t + HALF] = static_cast<T>(o2);
        }
#if INTO_CACHE
        // Written through a cast: the cache buffers are inputs MLX sees unchanged.
        device T* cache = const_cast<device T*>(is_v ? v_cache : k_cache);
        if (is_k || is_v) {
          cache[cache_base * D + t] = static_cast<T>(o1);
          cache[cache_base * D + t + HALF] = static_cast<T>(o2);
        }
        if (V_FROM_K && is_k) {
          norm_rotate_pair<T>(x1[i], x2[i], r, 1.0f, 1.0f, false, p, 0.0f, 0.0f, &o1, &o2);
          device T* values = const_cast<device T*>(v_cache);
          values[cache_base * D + t] = static_cast<T>(o1);
          values[cache_base * D + t + HALF] = static_cast<T>(o2);
        }
#endif
      }
    }
  }
#endif
