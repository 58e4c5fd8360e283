// gelu_gate: out = gelu_tanh(gate) * up, in float32, rounded once to T (torch's
// gelu_pytorch_tanh rounds once, not after every op). Callers: the MLP, where gate and up are
// the two halves of the fused gate|up projection's output (the same array twice, up from column
// N); the PLE gate epilogue, where up is the per-layer inputs [B, L, layers * P] from the layer's
// column; the MoE experts. Read in place: rows through their strides, each row's columns
// contiguous.
// In: gate, up (NDIM axes, the same leading shape), up_column int32 [1]: up's first column.
// Out: contiguous [..., N] in T.
// Grid: (N rounded up to whole threadgroups, rows); one element per thread.
// Templates: T, N, NDIM.

// @kernel gelu_gate
  uint col = thread_position_in_grid.x;
  uint row = thread_position_in_grid.y;
  if (col >= uint(N)) {
    return;
  }
  // The row's offset in each input, from the leading axes' strides (innermost first).
  int64_t gate_at = 0;
  int64_t up_at = 0;
  uint rest = row;
  for (int axis = NDIM - 2; axis >= 0; axis--) {
    uint index = rest % uint(gate_shape[axis]);
    rest /= uint(gate_shape[axis]);
    gate_at += int64_t(index) * gate_strides[axis];
    up_at += int64_t(index) * up_strides[axis];
  }
  float gelu = gelu_tanh(static_cast<float>(gate[gate_at + col]));
  out[size_t(row) * N + col] = static_cast<T>(gelu * static_cast<float>(up[up_at + up_column[0] + col]));
