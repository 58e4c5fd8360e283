// moe_router: the MoE router after its projection, for one token per threadgroup: the
// logits times params[0] (the router's hidden_size^-0.5, moved past its linear projection),
// softmax over the E experts in float32, the top K, renormalised to sum to 1, each times its
// expert's per_expert_scale (Gemma4TextRouter). Replaces softmax, argpartition, two gathers, a
// sum, a divide and a multiply in the decode step.
// In: logits [rows, E] (the router projection's output, contiguous), scale [E], params float32
// [logit scale].
// Out: weights float32 [rows, K], indices uint32 [rows, K], in descending probability.
// Grid: one threadgroup of TG = E rounded up to 32 threads per row (E <= 1024); thread t owns
// expert t. Its rank is the number of experts ahead of it (higher probability, or equal with a
// lower index), so ranks are distinct and the top K hold ranks 0..K-1.
// Templates: T, E, K, TG.

// @kernel moe_router
  uint row = threadgroup_position_in_grid.x;
  uint t = thread_position_in_threadgroup.x;
  uint lane = thread_index_in_simdgroup;
  uint sg = simdgroup_index_in_threadgroup;
  threadgroup float buf[32];
  threadgroup float probs[TG];

  bool active = t < uint(E);
  float logit = active ? static_cast<float>(logits[size_t(row) * E + t]) * params[0] : GEMMA_NEG_BIG;
  float top = block_max<TG / 32>(logit, buf, lane, sg);
  float e = active ? metal::exp(logit - top) : 0.0f;
  float p = e / block_sum<TG / 32>(e, buf, lane, sg);
  probs[t] = active ? p : -1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  uint rank = 0;
  for (uint j = 0; j < uint(E); j++) {
    float q = probs[j];
    rank += (q > p || (q == p && j < t)) ? 1u : 0u;
  }
  bool chosen = active && rank < uint(K);
  float kept = block_sum<TG / 32>(chosen ? p : 0.0f, buf, lane, sg);
  if (chosen) {
    weights[size_t(row) * K + rank] = p / kept * static_cast<float>(scale[t]);
    indices[size_t(row) * K + rank] = t;
  }
