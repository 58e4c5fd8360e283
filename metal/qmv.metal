// qmv: out = x @ dequantize(w).T for a few rows of x (decode, MAX_DECODE_QUERIES at most), with
// MLX's affine quantization: each row of w packs K BITS-bit values low bits first into uint32
// words, and value q of group g (GROUP values along K) stands for scales[n, g] * q + biases[n, g].
// Bandwidth-bound: each lane loads 16 bytes of a weight row per step (VPT values, all in one
// group), so a simdgroup reads 512 contiguous bytes a step; RPS rows per simdgroup share the x
// loads. Sums in float32: per step, scale * sum(x q) + bias * sum(x), as MLX's own qmv does;
// each q is read without a shift or an int-to-float conversion (see the inner loop).
// In: x [M, K] (T), w [N, K * BITS / 32] uint32, scales, biases [N, K / GROUP]. Out: [M, N] in T.
// Grid: ceil(N / (SIMDS * RPS)) threadgroups of SIMDS simdgroups.
// Templates: T, M, BITS, GROUP, RPS, SIMDS; K and N are read from the shapes, so one build
// serves every projection of a model.

// @kernel qmv
  constexpr int VPT = 128 / BITS;
  const int K = int(x_shape[x_ndim - 1]);
  const int N = int(w_shape[0]);
  const int WORDS = K * BITS / 32;
  const int GROUPS = K / GROUP;
  constexpr uint MASK = (1u << BITS) - 1u;
  const uint lane = thread_index_in_simdgroup;
  const int first = (int(threadgroup_position_in_grid.x) * SIMDS + int(simdgroup_index_in_threadgroup)) * RPS;
  int rows[RPS];
  for (int r = 0; r < RPS; r++) {
    rows[r] = metal::min(first + r, N - 1);  // rows past N load row N - 1 and are not written
  }
  float acc[RPS][M];
  for (int r = 0; r < RPS; r++) {
    for (int m = 0; m < M; m++) {
      acc[r][m] = 0.0f;
    }
  }
  for (int k0 = int(lane) * VPT; k0 < K; k0 += 32 * VPT) {
    uint words[RPS][4];
    float scale[RPS];
    float bias[RPS];
    for (int r = 0; r < RPS; r++) {
      uint4 packed = *((const device uint4*)(w + size_t(rows[r]) * WORDS + k0 * BITS / 32));
      words[r][0] = packed.x;
      words[r][1] = packed.y;
      words[r][2] = packed.z;
      words[r][3] = packed.w;
      scale[r] = static_cast<float>(scales[rows[r] * GROUPS + k0 / GROUP]);
      bias[r] = static_cast<float>(biases[rows[r] * GROUPS + k0 / GROUP]);
    }
    for (int m = 0; m < M; m++) {
      float x_sum = 0.0f;
      float dot[RPS];
      for (int r = 0; r < RPS; r++) {
        dot[r] = 0.0f;
      }
      for (int j = 0; j < VPT; j++) {
        float xj = static_cast<float>(x[m * K + k0 + j]);
        x_sum += xj;
        // Value j sits in 16-bit half `high` of its word, at place `place` there. Masked in place,
        // it reads q * 2^(place * BITS); x scaled by the inverse power of two (exact) undoes it.
        const int place = j % (16 / BITS);
        const bool high = (j * BITS / 16) % 2 == 1;
        const float x_placed = xj * (1.0f / float(1u << (place * BITS)));
        for (int r = 0; r < RPS; r++) {
          uint half_word = high ? (words[r][j * BITS / 32] >> 16) : words[r][j * BITS / 32];
          // OR-ing 0x4B000000 makes the float 2^23 + v: one logic op and a subtract instead of
          // a shift and an int-to-float conversion, which runs at a fraction of the FMA rate.
          uint v = (half_word & (MASK << (place * BITS))) | 0x4B000000u;
          dot[r] += x_placed * (as_type<float>(v) - 8388608.0f);
        }
      }
      for (int r = 0; r < RPS; r++) {
        acc[r][m] += scale[r] * dot[r] + bias[r] * x_sum;
      }
    }
  }
  for (int r = 0; r < RPS; r++) {
    for (int m = 0; m < M; m++) {
      float total = simd_sum(acc[r][m]);
      if (lane == 0 && first + r < N) {
        out[m * N + first + r] = static_cast<T>(total);
      }
    }
  }
