"""Answers to notebook 4's exercises (for instructors; attendees: try first).

Each `# %% name` cell replaces the notebook's exercise cell that defines `name`
(`python notebooks/workshop.py solve`). The answers are CUDA sources in Python strings;
FULL_MASK and NEG_INF are defined by the checker (notebooks/checks.py, KERNEL_PRELUDE).
"""

# %% MY_ROW_MAX
MY_ROW_MAX = r"""
extern "C" __global__ void row_max(const float* x, float* out, int rows, int C) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;   // one warp per row
    if (row >= rows) return;                  // a whole warp leaves: no lane misses a shuffle
    float m = NEG_INF;
    for (int c = lane; c < C; c += 32)        // lane l: columns l, l + 32, ... (coalesced)
        m = fmaxf(m, x[(long long)row * C + c]);
    for (int offset = 16; offset > 0; offset /= 2)   // butterfly: every lane gets the max
        m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, offset));
    if (lane == 0) out[row] = m;
}
"""


# %% MY_NAIVE_ATTENTION
MY_NAIVE_ATTENTION = r"""
extern "C" __global__ void naive_attention(const float* q, const float* k, const float* v,
                                           float* out, int B, int H, int KVH, int T, int D) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;   // query row (b, h, t)
    if (row >= B * H * T) return;
    const int t = row % T, h = (row / T) % H, b = row / (T * H);
    const int kv = h / (H / KVH);                             // this query head's KV head
    const float* qi = q + (long long)row * D;                 // (D,)
    const float* keys = k + (long long)(b * KVH + kv) * T * D;    // (T, D)
    const float* values = v + (long long)(b * KVH + kv) * T * D;  // (T, D)
    float* o = out + (long long)row * D;                      // (D,)
    const float scale = rsqrtf((float)D);

    float m = NEG_INF;                                        // pass 1: the largest score
    for (int s = 0; s <= t; s++) {                            // causal: keys 0..t
        float score = 0.0f;
        for (int d = 0; d < D; d++) score += qi[d] * keys[s * D + d];
        m = fmaxf(m, score * scale);
    }
    float sum = 0.0f;                                         // pass 2: weights and output
    for (int d = 0; d < D; d++) o[d] = 0.0f;
    for (int s = 0; s <= t; s++) {
        float score = 0.0f;
        for (int d = 0; d < D; d++) score += qi[d] * keys[s * D + d];
        const float p = __expf(score * scale - m);
        sum += p;
        for (int d = 0; d < D; d++) o[d] += p * values[s * D + d];
    }
    for (int d = 0; d < D; d++) o[d] /= sum;
}
"""
