// kernels.cu: albor's hand-written CUDA kernels.
//
// albor.py's NumPy functions are THE definition of what every kernel computes; each kernel
// below names its NumPy twin and tests/test_kernels.py checks them against each other on a CPU
// (through the emulator in tests/cuda_emu.h) for several shapes and extreme inputs.
//
// Conventions: float32, C-contiguous row-major arrays, `int` sizes. Everything is
// deterministic: no atomics, every sum is taken in a fixed order by one thread or one fixed
// reduction tree, so the same inputs give the same bits on every run.
//
// The file compiles with NVRTC (what cupy.RawModule uses) and with `nvcc -arch=sm_90 -cubin`,
// and includes no headers (NVRTC has none): -infinity is spelled __int_as_float(0xff800000),
// not INFINITY.
//
// Loading and launching from Python (CuPy; tests/kernel_emu.py offers the same call on a CPU;
// albor.py's "GPU kernels" section holds these launches as launch_* functions and uses them on
// the GPU). Scalars MUST be np.int32 / np.float32:
// CuPy passes a Python int as a 64-bit integer and a Python float as a double, and a kernel
// that takes `int`/`float` would read garbage.
//
//   module = cupy.RawModule(code=open("kernels.cu").read())
//   f = module.get_function(name); f(grid, block, args)
//
// kernel (arguments)                                    grid                    block
// -------------------------------------------------------------------------------------------
// attention_forward (q, k, v, out, lse, H, KVH, T, D)   (ceil(T/64), B*H)       (256,)
// attention_backward_preprocess (out, dout, delta,      (ceil(rows/8),)         (256,)
//                                rows, D)   rows = B*H*T
// attention_backward_dkdv (q, k, v, dout, lse, delta,   (ceil(T/64), B*KVH)     (256,)
//                          dk, dv, H, KVH, T, D)
// attention_backward_dq (q, k, v, dout, lse, delta,     (ceil(T/64), B*H)       (256,)
//                        dq, H, KVH, T, D)
// rmsnorm_forward (x, weight, out, rstd, rows, C, eps)  (ceil(rows/8),)         (256,)
// rmsnorm_backward (dout, x, weight, rstd, dx, rows, C) (ceil(rows/8),)         (256,)
// rmsnorm_backward_weight (dout, x, rstd, dweight,      (ceil(C/32),)           (32, 8)
//                          rows, C)
// swiglu_forward (gate, up, out, n)                     (ceil(n/256),)          (256,)
// swiglu_backward (dout, gate, up, dgate, dup, n)       (ceil(n/256),)          (256,)
// cross_entropy_forward_backward (logits, targets,      (N,)                    (256,)
//                                 losses, V, grad_scale)
// embedding_backward (sorted_keys, dout, dwte, N, C)    (V,)                    (128,)
// adamw_update (param, grad, m, v, n, lr, beta1, beta2, (ceil(n/256),)          (256,)
//               eps, weight_decay, bias_correction1,
//               bias_correction2)
//
// Shapes: q, out, dout, dq (B, H, T, D); k, v, dk, dv (B, KVH, T, D); lse, delta (B, H, T);
// H % KVH == 0; D a multiple of 4 and at most 128 (16, 32, 64, 128 all work); any T >= 1.
// Pointer arguments are float* except `targets` (int*) and `sorted_keys` (long long*). The grid-stride kernels (swiglu_*,
// adamw_update) also accept any smaller grid.
// Backward order: attention_backward_preprocess first (delta), then _dkdv and _dq (either order).

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)  // -infinity (INFINITY needs a header NVRTC lacks)
#define IGNORE_INDEX (-100)                 // albor.IGNORE_INDEX: a target that counts for nothing

// =============================================================================================
// Warp reductions: the 32 lanes of a warp add (or max) their values through register shuffles,
// no shared memory, no __syncthreads. __shfl_xor_sync(mask, x, o) hands each lane the x of
// lane (lane XOR o); after o = 16, 8, 4, 2, 1 every lane holds the total (a butterfly).
// =============================================================================================

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(FULL_MASK, x, offset);
    return x;
}

// =============================================================================================
// Causal grouped-query attention, FlashAttention style
//
// Math (albor.attention_forward): for query row i of head h, with KV head kvh = h / (H/KVH),
//     s_j   = (q_i . k_j) / sqrt(D)            for keys j <= i (causal); masked keys are -inf
//     lse_i = log(sum_j exp(s_j))               (natural log, saved for the backward)
//     out_i = sum_j exp(s_j - lse_i) v_j
// The (T, T) score matrix is never stored. Keys and values stream through shared memory in
// tiles of ATTN_TILE rows, and each query row keeps a running max m, running sum l and running
// output acc ("online softmax"). For each visible key j, in order:
//     if s_j > m:  l = l * exp(m - s_j);  acc = acc * exp(m - s_j);  m = s_j
//     l   = l + exp(s_j - m)
//     acc = acc + exp(s_j - m) v_j
// (rescaling everything summed under the old max, which happens only a few times per row), and
// at the end out_i = acc / l, lse_i = m + log(l). Every exp has an argument <= 0: no overflow.
//
// Thread layout (forward and dQ): a block owns ATTN_ROWS = 64 query rows of one (b, h) and has
// 256 threads, ATTN_THREADS_PER_ROW = 4 per row. The 4 threads of a row split the head dim:
// thread `part` holds dims part, part+4, part+8, ... (D/4 of them) of q and of the output in
// registers. A dot product q . k_j is 4 partial sums (one per thread) added by two shuffles.
// (The 4 threads of a row are neighbouring lanes of one warp, so all 32 lanes of every warp
// meet at every shuffle: no divergence, FULL_MASK is right.)
//
// Registers hold at most ATTN_MAX_HEAD_DIM / 4 = 32 dims per thread; loops run over that
// compile-time bound with an `if (c < dims)` guard, so the compiler unrolls them and keeps the
// arrays in registers (a runtime loop bound would push them to slow local memory).
// =============================================================================================

#define ATTN_ROWS 64             // rows a block owns (queries in forward/dQ, keys in dK/dV)
#define ATTN_TILE 32             // rows per shared-memory tile (keys in forward/dQ, queries in dK/dV)
#define ATTN_THREADS_PER_ROW 4
#define ATTN_THREADS 256         // ATTN_ROWS * ATTN_THREADS_PER_ROW
#define ATTN_MAX_HEAD_DIM 128
#define ATTN_DIMS_PER_THREAD 32  // ATTN_MAX_HEAD_DIM / ATTN_THREADS_PER_ROW
// __launch_bounds__(ATTN_THREADS, 1) on the attention kernels: blocks of 256 threads, and at
// least 1 block per SM is enough, so ptxas may use up to 255 registers per thread (without the
// ", 1" it squeezes attention_backward_dq into 128 registers and spills).

// The full dot product of a row split over its 4 threads: lanes part=0..3 are adjacent, so
// XOR with 1 and then 2 sums within the group of 4 (and all 4 get the result).
__device__ __forceinline__ float row_sum4(float partial) {
    partial += __shfl_xor_sync(FULL_MASK, partial, 1);
    partial += __shfl_xor_sync(FULL_MASK, partial, 2);
    return partial;
}

// Copy rows [first_row, first_row + ATTN_TILE) of a (T, D) matrix into a shared tile (the rows
// are contiguous in memory, so this is a coalesced copy of ATTN_TILE*D floats); rows past T
// are filled with zeros so that nothing downstream ever reads garbage.
__device__ __forceinline__ void load_tile(float* tile, const float* matrix, int first_row, int T,
                                          int D) {
    const int valid = min(ATTN_TILE, T - first_row) * D;
    const float* src = matrix + (size_t)first_row * D;
    for (int idx = threadIdx.x; idx < ATTN_TILE * D; idx += blockDim.x)
        tile[idx] = idx < valid ? src[idx] : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// attention_forward: grid (ceil(T/64), B*H), block 256.
//   q (B,H,T,D), k and v (B,KVH,T,D) -> out (B,H,T,D), lse (B,H,T)
// Block (x, y): query rows 64x .. 64x+63 of (b, h) = (y / H, y % H). It needs the keys
// 0 .. min(T, 64x+64)-1, a tile of 32 at a time. Thread t: row t/4, part t%4.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, 1)
attention_forward(const float* __restrict__ q, const float* __restrict__ k,
                  const float* __restrict__ v, float* __restrict__ out, float* __restrict__ lse,
                  int H, int KVH, int T, int D) {
    __shared__ float k_tile[ATTN_TILE * ATTN_MAX_HEAD_DIM];  // row j at k_tile[j * D]
    __shared__ float v_tile[ATTN_TILE * ATTN_MAX_HEAD_DIM];

    const int bh = blockIdx.y;                                   // b * H + h
    const int kv_head = (bh / H) * KVH + (bh % H) / (H / KVH);   // b * KVH + kvh
    const int row = threadIdx.x / ATTN_THREADS_PER_ROW;
    const int part = threadIdx.x % ATTN_THREADS_PER_ROW;
    const int i = blockIdx.x * ATTN_ROWS + row;                  // this thread's query position
    const int dims = D / ATTN_THREADS_PER_ROW;                   // dims held per thread
    const float scale = rsqrtf((float)D);
    const float* k_head = k + (size_t)kv_head * T * D;           // (T, D)
    const float* v_head = v + (size_t)kv_head * T * D;

    // this row's slice of q, pre-multiplied by the scale, and of the running output
    float q_reg[ATTN_DIMS_PER_THREAD], acc[ATTN_DIMS_PER_THREAD];
#pragma unroll
    for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++) {
        q_reg[c] = (c < dims && i < T) ? q[((size_t)bh * T + i) * D + part + 4 * c] * scale : 0.0f;
        acc[c] = 0.0f;
    }
    float row_max = NEG_INF;  // m: the largest score seen so far
    float row_sum = 0.0f;     // l: sum of exp(score - m) so far

    const int n_keys = min(T, (int)(blockIdx.x + 1) * ATTN_ROWS);  // keys any row here can see
    for (int tile_start = 0; tile_start < n_keys; tile_start += ATTN_TILE) {
        load_tile(k_tile, k_head, tile_start, T, D);
        load_tile(v_tile, v_head, tile_start, T, D);
        // Every thread reads every row of the tiles below, and the rows were written by other
        // threads: wait until the whole tile is in shared memory.
        __syncthreads();

        // this row against each of the tile's keys: score, then the online-softmax update
        for (int j = 0; j < ATTN_TILE; j++) {
            float partial = 0.0f;
#pragma unroll
            for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++)
                if (c < dims) partial += q_reg[c] * k_tile[j * D + part + 4 * c];
            // All 4 threads of the row take part in the shuffles (every lane of the warp does:
            // the mask test comes after) and all 4 get the same score, so they take the same
            // branches below.
            const float s = row_sum4(partial);
            if (tile_start + j <= i) {  // causal: a key after the query does not count
                if (s > row_max) {      // a new max: rescale what was summed under the old one
                    const float rescale = __expf(row_max - s);  // 0 at the first key (m = -inf)
                    row_sum *= rescale;
#pragma unroll
                    for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++) acc[c] *= rescale;
                    row_max = s;
                }
                const float p = __expf(s - row_max);  // <= 1: exp can't overflow
                row_sum += p;
#pragma unroll
                for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++)
                    if (c < dims) acc[c] += p * v_tile[j * D + part + 4 * c];
            }
        }
        // The next iteration overwrites k_tile and v_tile: wait until every thread is done
        // reading this tile.
        __syncthreads();
    }

    if (i < T) {
        const float inv_sum = 1.0f / row_sum;
#pragma unroll
        for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++)
            if (c < dims) out[((size_t)bh * T + i) * D + part + 4 * c] = acc[c] * inv_sum;
        if (part == 0) lse[(size_t)bh * T + i] = row_max + logf(row_sum);
    }
}

// =============================================================================================
// Attention backward (albor.attention_backward), from out, lse and dout, FlashAttention-2 style.
// Rebuild p_ij = exp(s_ij - lse_i) tile by tile instead of storing the (T, T) probabilities:
//     dv_j  = sum_i p_ij dout_i                       (summed over the group's query heads)
//     dp_ij = dout_i . v_j
//     ds_ij = p_ij (dp_ij - delta_i),   delta_i = sum_j p_ij dp_ij = dout_i . out_i
//     dq_i  = scale * sum_j ds_ij k_j
//     dk_j  = scale * sum_i ds_ij q_i                 (summed over the group's query heads)
// Three kernels, none needing atomics: delta first (one dot product per row), then dK/dV with
// each block OWNING 64 key rows (it loops over every query that sees them, of every query head
// of the group) and dQ with each block owning 64 query rows (it loops over their keys).
// Every output element is summed by one thread in a fixed order: deterministic.
// =============================================================================================

// ---------------------------------------------------------------------------------------------
// attention_backward_preprocess: grid (ceil(rows/8),), block 256.
//   delta[r] = sum_d dout[r, d] * out[r, d] for the rows = B*H*T rows of (B, H, T, D).
// One warp per row: lanes take d = lane, lane+32, ...; __shfl_down_sync folds the upper half
// of the warp onto the lower (16, 8, 4, 2, 1), leaving the total in lane 0.
// A warp whose row is past the end skips the whole body together (all its lanes alike), so the
// shuffles never miss a lane.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
attention_backward_preprocess(const float* __restrict__ out, const float* __restrict__ dout,
                              float* __restrict__ delta, int rows, int D) {
    const int lane = threadIdx.x % 32;
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;
    float partial = 0.0f;
    for (int d = lane; d < D; d += 32) partial += dout[(size_t)r * D + d] * out[(size_t)r * D + d];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
        partial += __shfl_down_sync(FULL_MASK, partial, offset);
    if (lane == 0) delta[r] = partial;
}

// ---------------------------------------------------------------------------------------------
// attention_backward_dkdv: grid (ceil(T/64), B*KVH), block 256.
//   -> dk, dv (B, KVH, T, D)
// Block (x, y): key rows 64x .. 64x+63 of (b, kvh) = (y / KVH, y % KVH). Thread t: key row t/4,
// part t%4, holding that part of k_j (pre-scaled), v_j, dk_j, dv_j in registers. For each query
// head h of the group and each tile of 32 queries that can see these keys (positions >= 64x),
// the tile's q, dout, lse and delta go to shared memory and every thread walks its 32 queries.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, 1)
attention_backward_dkdv(const float* __restrict__ q, const float* __restrict__ k,
                        const float* __restrict__ v, const float* __restrict__ dout,
                        const float* __restrict__ lse, const float* __restrict__ delta,
                        float* __restrict__ dk, float* __restrict__ dv, int H, int KVH, int T,
                        int D) {
    __shared__ float q_tile[ATTN_TILE * ATTN_MAX_HEAD_DIM];
    __shared__ float dout_tile[ATTN_TILE * ATTN_MAX_HEAD_DIM];
    __shared__ float lse_tile[ATTN_TILE];
    __shared__ float delta_tile[ATTN_TILE];

    const int kv_head = blockIdx.y;  // b * KVH + kvh
    const int b = kv_head / KVH, kvh = kv_head % KVH, group = H / KVH;
    const int row = threadIdx.x / ATTN_THREADS_PER_ROW;
    const int part = threadIdx.x % ATTN_THREADS_PER_ROW;
    const int j = blockIdx.x * ATTN_ROWS + row;  // this thread's key position
    const int dims = D / ATTN_THREADS_PER_ROW;
    const float scale = rsqrtf((float)D);
    const size_t kv_offset = ((size_t)kv_head * T + j) * D;  // of row j (valid only if j < T)

    float k_reg[ATTN_DIMS_PER_THREAD], v_reg[ATTN_DIMS_PER_THREAD];
    float dk_acc[ATTN_DIMS_PER_THREAD], dv_acc[ATTN_DIMS_PER_THREAD];
#pragma unroll
    for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++) {
        const bool here = c < dims && j < T;
        k_reg[c] = here ? k[kv_offset + part + 4 * c] * scale : 0.0f;
        v_reg[c] = here ? v[kv_offset + part + 4 * c] : 0.0f;
        dk_acc[c] = 0.0f;
        dv_acc[c] = 0.0f;
    }

    for (int g = 0; g < group; g++) {
        const int bh = b * H + kvh * group + g;  // the query head: h = kvh * group + g
        const float* q_head = q + (size_t)bh * T * D;
        const float* dout_head = dout + (size_t)bh * T * D;
        for (int tile_start = blockIdx.x * ATTN_ROWS; tile_start < T; tile_start += ATTN_TILE) {
            load_tile(q_tile, q_head, tile_start, T, D);
            load_tile(dout_tile, dout_head, tile_start, T, D);
            if (threadIdx.x < ATTN_TILE) {
                const int qi = tile_start + threadIdx.x;
                lse_tile[threadIdx.x] = qi < T ? lse[(size_t)bh * T + qi] : 0.0f;
                delta_tile[threadIdx.x] = qi < T ? delta[(size_t)bh * T + qi] : 0.0f;
            }
            // Every thread reads all 32 query rows (and their lse, delta), written by other
            // threads: wait until the tiles are complete.
            __syncthreads();

            for (int ii = 0; ii < ATTN_TILE; ii++) {
                const int qi = tile_start + ii;
                float s_part = 0.0f, dp_part = 0.0f;
#pragma unroll
                for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++) {
                    if (c < dims) {
                        s_part += k_reg[c] * q_tile[ii * D + part + 4 * c];
                        dp_part += v_reg[c] * dout_tile[ii * D + part + 4 * c];
                    }
                }
                const float s = row_sum4(s_part);    // s_ij (scale already in k_reg)
                const float dp = row_sum4(dp_part);  // dp_ij = dout_i . v_j
                const float p = (j <= qi && qi < T) ? __expf(s - lse_tile[ii]) : 0.0f;
                const float ds = p * (dp - delta_tile[ii]);
#pragma unroll
                for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++) {
                    if (c < dims) {
                        dv_acc[c] += p * dout_tile[ii * D + part + 4 * c];
                        dk_acc[c] += ds * q_tile[ii * D + part + 4 * c];
                    }
                }
            }
            // The next tile overwrites q_tile, dout_tile, lse_tile, delta_tile: wait until
            // every thread has finished reading this one.
            __syncthreads();
        }
    }

    if (j < T) {
#pragma unroll
        for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++) {
            if (c < dims) {
                dk[kv_offset + part + 4 * c] = dk_acc[c] * scale;
                dv[kv_offset + part + 4 * c] = dv_acc[c];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// attention_backward_dq: grid (ceil(T/64), B*H), block 256.   -> dq (B, H, T, D)
// The forward's layout: block (x, y) owns query rows 64x..64x+63 of (b, h); thread t holds its
// row's part of q (pre-scaled), dout and dq; K and V tiles stream through shared memory.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, 1)
attention_backward_dq(const float* __restrict__ q, const float* __restrict__ k,
                      const float* __restrict__ v, const float* __restrict__ dout,
                      const float* __restrict__ lse, const float* __restrict__ delta,
                      float* __restrict__ dq, int H, int KVH, int T, int D) {
    __shared__ float k_tile[ATTN_TILE * ATTN_MAX_HEAD_DIM];
    __shared__ float v_tile[ATTN_TILE * ATTN_MAX_HEAD_DIM];

    const int bh = blockIdx.y;
    const int kv_head = (bh / H) * KVH + (bh % H) / (H / KVH);
    const int row = threadIdx.x / ATTN_THREADS_PER_ROW;
    const int part = threadIdx.x % ATTN_THREADS_PER_ROW;
    const int i = blockIdx.x * ATTN_ROWS + row;
    const int dims = D / ATTN_THREADS_PER_ROW;
    const float scale = rsqrtf((float)D);
    const float* k_head = k + (size_t)kv_head * T * D;
    const float* v_head = v + (size_t)kv_head * T * D;
    const size_t q_offset = ((size_t)bh * T + i) * D;  // of row i (valid only if i < T)

    float q_reg[ATTN_DIMS_PER_THREAD], dout_reg[ATTN_DIMS_PER_THREAD], dq_acc[ATTN_DIMS_PER_THREAD];
#pragma unroll
    for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++) {
        const bool here = c < dims && i < T;
        q_reg[c] = here ? q[q_offset + part + 4 * c] * scale : 0.0f;
        dout_reg[c] = here ? dout[q_offset + part + 4 * c] : 0.0f;
        dq_acc[c] = 0.0f;
    }
    const float row_lse = i < T ? lse[(size_t)bh * T + i] : 0.0f;
    const float row_delta = i < T ? delta[(size_t)bh * T + i] : 0.0f;

    const int n_keys = min(T, (int)(blockIdx.x + 1) * ATTN_ROWS);
    for (int tile_start = 0; tile_start < n_keys; tile_start += ATTN_TILE) {
        load_tile(k_tile, k_head, tile_start, T, D);
        load_tile(v_tile, v_head, tile_start, T, D);
        // Every thread reads every key row of the tiles: wait until they are complete.
        __syncthreads();

        for (int jj = 0; jj < ATTN_TILE; jj++) {
            float s_part = 0.0f, dp_part = 0.0f;
#pragma unroll
            for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++) {
                if (c < dims) {
                    s_part += q_reg[c] * k_tile[jj * D + part + 4 * c];
                    dp_part += dout_reg[c] * v_tile[jj * D + part + 4 * c];
                }
            }
            const float s = row_sum4(s_part);
            const float dp = row_sum4(dp_part);
            const float p = (tile_start + jj <= i) ? __expf(s - row_lse) : 0.0f;
            const float ds = p * (dp - row_delta);
#pragma unroll
            for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++)
                if (c < dims) dq_acc[c] += ds * k_tile[jj * D + part + 4 * c];
        }
        // The next iteration overwrites the tiles: wait until every thread is done with them.
        __syncthreads();
    }

    if (i < T) {
#pragma unroll
        for (int c = 0; c < ATTN_DIMS_PER_THREAD; c++)
            if (c < dims) dq[q_offset + part + 4 * c] = dq_acc[c] * scale;
    }
}

// =============================================================================================
// RMSNorm (albor.rmsnorm_forward / rmsnorm_backward) over rows of C channels:
//     rstd = 1 / sqrt(mean(x^2) + eps),   out = (x * rstd) * weight
//     dx   = rstd * (g - xhat * mean(g * xhat)),   g = dout * weight, xhat = x * rstd
//     dweight[c] = sum over rows of dout[., c] * xhat[., c]
// Forward and dx: one warp per row (8 rows per 256-thread block); lanes stride over the C
// channels (consecutive lanes, consecutive addresses: coalesced) and warp_sum gives every lane
// the row's total. No shared memory, no __syncthreads. A warp whose row is past the end
// returns as a whole, before any shuffle.
// =============================================================================================

// rmsnorm_forward: grid (ceil(rows/8),), block 256.   x (rows, C) -> out (rows, C), rstd (rows,)
extern "C" __global__ void __launch_bounds__(256)
rmsnorm_forward(const float* __restrict__ x, const float* __restrict__ weight,
                float* __restrict__ out, float* __restrict__ rstd, int rows, int C, float eps) {
    const int lane = threadIdx.x % 32;
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;
    const float* x_row = x + (size_t)r * C;
    float sum_sq = 0.0f;
    for (int c = lane; c < C; c += 32) sum_sq += x_row[c] * x_row[c];
    const float r_std = rsqrtf(warp_sum(sum_sq) / C + eps);
    for (int c = lane; c < C; c += 32) out[(size_t)r * C + c] = (x_row[c] * r_std) * weight[c];
    if (lane == 0) rstd[r] = r_std;
}

// rmsnorm_backward: grid (ceil(rows/8),), block 256.   -> dx (rows, C)
extern "C" __global__ void __launch_bounds__(256)
rmsnorm_backward(const float* __restrict__ dout, const float* __restrict__ x,
                 const float* __restrict__ weight, const float* __restrict__ rstd,
                 float* __restrict__ dx, int rows, int C) {
    const int lane = threadIdx.x % 32;
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;
    const size_t offset = (size_t)r * C;
    const float r_std = rstd[r];
    float dot = 0.0f;  // sum_c g_c * xhat_c
    for (int c = lane; c < C; c += 32) dot += dout[offset + c] * weight[c] * (x[offset + c] * r_std);
    const float mean_dot = warp_sum(dot) / C;
    for (int c = lane; c < C; c += 32) {
        const float g = dout[offset + c] * weight[c];
        const float xhat = x[offset + c] * r_std;
        dx[offset + c] = (g - xhat * mean_dot) * r_std;
    }
}

// ---------------------------------------------------------------------------------------------
// rmsnorm_backward_weight: grid (ceil(C/32),), block (32, 8).   -> dweight (C,)
// A column sum over all rows, without atomics: block x owns channels 32x .. 32x+31. Thread
// (tx, ty) adds rows ty, ty+8, ty+16, ... of channel 32x+tx (a warp is one ty: 32 adjacent
// channels, a coalesced 128-byte read per row), then thread (tx, 0) adds the 8 partial sums in
// a fixed order. (Only ceil(C/32) blocks: fine for a (C,) output next to the matmuls.)
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
rmsnorm_backward_weight(const float* __restrict__ dout, const float* __restrict__ x,
                        const float* __restrict__ rstd, float* __restrict__ dweight, int rows,
                        int C) {
    __shared__ float partial[8][32];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float sum = 0.0f;
    if (c < C)
        for (int r = threadIdx.y; r < rows; r += 8)
            sum += dout[(size_t)r * C + c] * (x[(size_t)r * C + c] * rstd[r]);
    partial[threadIdx.y][threadIdx.x] = sum;
    // Thread (tx, 0) reads the partial sums the other 7 threads of its column wrote: wait
    // until all are written.
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float total = 0.0f;
        for (int y = 0; y < 8; y++) total += partial[y][threadIdx.x];
        dweight[c] = total;
    }
}

// =============================================================================================
// SwiGLU's elementwise middle (albor.swiglu_forward / swiglu_backward):
//     out = silu(gate) * up,   silu(g) = g * sigmoid(g)
//     dup = dout * silu(gate),  dgate = dout * up * (sigmoid + silu * (1 - sigmoid))
// One thread per element, grid-stride loop (works for any grid). Fusing saves the temporaries
// the NumPy version makes: one read of each input, one write of each output.
// =============================================================================================

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// swiglu_forward: grid (ceil(n/256),), block 256.   gate, up (n,) -> out (n,)
extern "C" __global__ void swiglu_forward(const float* __restrict__ gate,
                                          const float* __restrict__ up, float* __restrict__ out,
                                          int n) {
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < (size_t)n;
         idx += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[idx];
        out[idx] = g * sigmoid(g) * up[idx];
    }
}

// swiglu_backward: grid (ceil(n/256),), block 256.   -> dgate, dup (n,)
extern "C" __global__ void swiglu_backward(const float* __restrict__ dout,
                                           const float* __restrict__ gate,
                                           const float* __restrict__ up,
                                           float* __restrict__ dgate, float* __restrict__ dup,
                                           int n) {
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < (size_t)n;
         idx += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[idx];
        const float sig = sigmoid(g);
        const float silu = g * sig;
        dup[idx] = dout[idx] * silu;
        dgate[idx] = dout[idx] * up[idx] * (sig + silu * (1.0f - sig));
    }
}

// =============================================================================================
// cross_entropy_forward_backward: grid (N,), block 256 (any multiple of 32 up to 1024).
//   logits (N, V) IN: logits, OUT: dlogits;  targets (N,) int;  losses (N,)
// Per row (albor.cross_entropy_forward + cross_entropy_backward, fused):
//     lse = log(sum_c exp(logit_c)),   losses[row] = lse - logit[target]
//     dlogit_c = (exp(logit_c - lse) - [c == target]) * grad_scale
// with grad_scale = loss_scale / (number of counted rows), so the mean loss is
// sum(losses) / n_valid. A row whose target is IGNORE_INDEX gets loss 0 and zero gradients;
// a target outside [0, V) gets a NaN loss (never a silent wrong answer).
// One block per row. Pass 1 reads the row once with an online softmax per thread (running
// max m and sum l of exp(x - m), as in attention), then merges the threads' (m, l) pairs: in
// each warp by shuffles, across warps through shared memory. Pass 2 writes the gradients.
// =============================================================================================

// Merge two online-softmax partials (m_a, l_a), (m_b, l_b) into (m, l) over both sets.
__device__ __forceinline__ void softmax_merge(float& m, float& l, float m_other, float l_other) {
    const float new_max = fmaxf(m, m_other);
    if (new_max == NEG_INF) return;  // both empty (a thread with no columns): keep (-inf, 0)
    l = l * __expf(m - new_max) + l_other * __expf(m_other - new_max);
    m = new_max;
}

extern "C" __global__ void __launch_bounds__(1024)
cross_entropy_forward_backward(float* __restrict__ logits, const int* __restrict__ targets,
                               float* __restrict__ losses, int V, float grad_scale) {
    __shared__ float warp_max[32], warp_sum[32];
    float* row = logits + (size_t)blockIdx.x * V;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;

    // pass 1: this thread's running (max, sum) over columns threadIdx.x, +blockDim.x, ...
    float m = NEG_INF, l = 0.0f;
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
        const float x = row[c];
        if (x > m) {
            l = l * __expf(m - x) + 1.0f;  // exp(-inf) = 0 for the first column
            m = x;
        } else {
            l += __expf(x - m);
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        const float m_other = __shfl_xor_sync(FULL_MASK, m, offset);
        const float l_other = __shfl_xor_sync(FULL_MASK, l, offset);
        softmax_merge(m, l, m_other, l_other);
    }
    if (lane == 0) {
        warp_max[warp] = m;
        warp_sum[warp] = l;
    }
    const int target = targets[blockIdx.x];
    const bool ignored = target == IGNORE_INDEX;
    const bool in_range = target >= 0 && target < V;
    const float target_logit = in_range ? row[target] : 0.0f;  // read BEFORE the barrier
    // Two reasons to wait here: (1) the merge below reads every warp's partial, written by lane
    // 0 of that warp; (2) after this point threads overwrite the row with gradients, and one of
    // them will overwrite row[target], which every thread has just read. Nothing writes
    // warp_max/warp_sum after this, so no second barrier is needed.
    __syncthreads();
    float row_max = warp_max[0], row_total = warp_sum[0];
    for (int w = 1; w < n_warps; w++) softmax_merge(row_max, row_total, warp_max[w], warp_sum[w]);
    const float lse = row_max + logf(row_total);
    if (threadIdx.x == 0)
        losses[blockIdx.x] = ignored ? 0.0f : (in_range ? lse - target_logit
                                                        : __int_as_float(0x7fc00000));  // NaN

    // pass 2: the gradients, in place
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
        const float p = __expf(row[c] - lse);  // softmax probability
        row[c] = ignored ? 0.0f : (p - (c == target ? 1.0f : 0.0f)) * grad_scale;
    }
}

// =============================================================================================
// embedding_backward: grid (V,), block 128 (any block size: threads stride over the channels).
// albor.embedding_backward without atomics: ADD into dwte (V, C) the dout (N, C) rows of the
// positions holding each token,
//     dwte[v, c] += sum of dout[p, c] over the positions p with idx[p] == v, in increasing p.
// One thread per position adding into its token's row would need atomics for repeated tokens,
// and their order (so the float rounding) changes from run to run. Instead the launch first
// sorts keys[p] = idx[p] * N + p (int64): a key holds the token (key / N) and the position
// (key % N), all keys differ, so every sort gives the same order. Block v finds its tokens' run
// [first, last) of the sorted keys by binary search, and each thread adds the run's rows for
// its channels in position order: the additions NumPy's add.at does, in its order, so the same
// bits. A token that does not occur costs one binary search. No shared memory, no barrier:
// every thread of a block does the same (cheap) search itself.
// =============================================================================================

// The first index r in [0, n) with keys[r] >= value (n if none); keys sorted ascending.
__device__ __forceinline__ int lower_bound(const long long* keys, int n, long long value) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (keys[mid] < value) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

extern "C" __global__ void __launch_bounds__(1024)
embedding_backward(const long long* __restrict__ sorted_keys, const float* __restrict__ dout,
                   float* __restrict__ dwte, int N, int C) {
    const long long first_key = (long long)blockIdx.x * N;  // token v = blockIdx.x at position 0
    const int first = lower_bound(sorted_keys, N, first_key);
    const int last = lower_bound(sorted_keys, N, first_key + N);
    if (first == last) return;  // token v does not occur: its row stays as it is
    float* row = dwte + (size_t)blockIdx.x * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = row[c];
        for (int r = first; r < last; r++) acc += dout[(size_t)(sorted_keys[r] - first_key) * C + c];
        row[c] = acc;
    }
}

// =============================================================================================
// adamw_update: grid (ceil(n/256),), block 256 (grid-stride: any grid works).
// albor.AdamW.step for one parameter tensor of n floats, in place, with the host computing
// bias_correction1 = 1 - beta1^t and bias_correction2 = 1 - beta2^t (in double) for update t:
//     p = p * (1 - lr * weight_decay)                 (decoupled decay; pass 0 for no decay)
//     m = beta1 * m + (1 - beta1) * g
//     v = beta2 * v + (1 - beta2) * g * g
//     p = p - (lr / bias_correction1) * m / (sqrt(v) / sqrt(bias_correction2) + eps)
// One fused pass instead of NumPy's ten: read p, g, m, v once, write p, m, v once.
// =============================================================================================
extern "C" __global__ void adamw_update(float* __restrict__ param, const float* __restrict__ grad,
                                        float* __restrict__ m, float* __restrict__ v, int n,
                                        float lr, float beta1, float beta2, float eps,
                                        float weight_decay, float bias_correction1,
                                        float bias_correction2) {
    const float step_size = lr / bias_correction1;
    const float inv_sqrt_bias_correction2 = 1.0f / sqrtf(bias_correction2);
    const float decay = 1.0f - lr * weight_decay;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < (size_t)n;
         idx += (size_t)gridDim.x * blockDim.x) {
        const float g = grad[idx];
        const float m_new = beta1 * m[idx] + (1.0f - beta1) * g;
        const float v_new = beta2 * v[idx] + (1.0f - beta2) * g * g;
        m[idx] = m_new;
        v[idx] = v_new;
        const float denom = sqrtf(v_new) * inv_sqrt_bias_correction2 + eps;
        param[idx] = param[idx] * decay - step_size * (m_new / denom);
    }
}
