// cuda_emu.h: run CUDA kernels on the CPU, for tests on machines without a GPU.
//
// g++ force-includes this header in front of the UNMODIFIED kernels.cu:
//
//     g++ -std=gnu++17 -O2 -fPIC -shared -fno-extern-tls-init -fno-ipa-reference \
//         -fno-ipa-reference-addressable -include tests/cuda_emu.h ...
//
// (tests/kernel_emu.py does that, adds one launcher per kernel, and calls them through ctypes.
// The -fno-ipa-reference flags stop g++ from proving, in single-threaded C++ terms, that a
// __shared__ array nobody writes reads as 0 and folding those reads away.)
//
// The model of a GPU it implements:
//   * A launch runs its blocks one after the other. Each CUDA thread of a block is a FIBER: its
//     own small stack, switched to and from by a few instructions (no OS threads, no locks).
//     A fiber runs until it reaches __syncthreads, a warp operation (__shfl_*_sync, __syncwarp,
//     votes) or its end, then hands control back to the scheduler, which resumes the next fiber.
//   * __syncthreads: a fiber waits there until every thread of the block has arrived (all of
//     them: a thread that returned early never arrives, as the CUDA guide demands). Threads
//     waiting at __syncthreads on different source lines are reported as an error.
//   * Warp operations: the 32 lanes of a warp (threads with linear index 32w .. 32w+31) meet,
//     exchange their values and go on. Every lane named in the mask must arrive at the same
//     operation (same kind, same mask, same line); reading a lane outside the mask is an error.
//   * A scheduling round in which no fiber can move (e.g. half the block waits at a barrier the
//     other half never reaches) is a DEADLOCK: the launch stops and returns an error that says
//     where each thread waits. It never hangs.
//   * __shared__ memory is a `thread_local` static: one copy, shared by all fibers of the block
//     (they run on one OS thread). At the start of every block it is filled with 0xFF bytes
//     (a NaN in every float, -1 in every int), because a GPU's shared memory starts with
//     garbage: a kernel that reads shared memory it did not write gets NaN here, not zeros.
//   * `extern __shared__ T name[]` (dynamic shared memory) needs a definition of `name`;
//     kernel_emu.py generates one of EMU_DYNAMIC_SMEM_BYTES for each such name it finds.
//     (That is why `-fno-extern-tls-init` is needed: an extern thread_local otherwise goes
//     through an init-wrapper call.)
//   * The order in which fibers run each round is "forward" (thread 0 first), "reverse" or
//     "random" (seeded), so a race that one order hides, another shows (emu_set_schedule).
//   * Math intrinsics map to the C library (__expf -> expf etc.), so results differ from a GPU
//     in the last bits (the GPU's __expf is an approximation and nvcc fuses a*b+c into FMAs).
//
// What it does not model: concurrency between blocks (blocks must be independent, as our
// kernels are), atomics, texture/constant memory, cooperative groups, timing.
#pragma once

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mutex>
#include <string>

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>

#if !defined(__x86_64__) || defined(EMU_USE_UCONTEXT)
#include <ucontext.h>
#define EMU_UCONTEXT 1
#endif

// --- CUDA's vocabulary ----------------------------------------------------------------------

#define __global__
#define __host__
#define __device__ static inline
#define __forceinline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ thread_local  // works for `__shared__ T x[N];` and `extern __shared__ T x[];`
#define __constant__ static const
#define __align__(n) __attribute__((aligned(n)))

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct int2 { int x, y; };
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

static const int warpSize = 32;

// --- math: CUDA's device functions and intrinsics on the C library --------------------------

// (glibc declares its own __expf, __logf, __powf: macros take precedence over them)
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __powf(x, y) powf(x, y)
static inline float __fdividef(float x, float y) { return x / y; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
static inline float __uint_as_float(unsigned int i) { float f; memcpy(&f, &i, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int i; memcpy(&i, &f, 4); return i; }
// CUDA has min/max overloads in device code; C++ has no global ones.
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
static inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
template <typename T> static inline T __ldg(const T* p) { return *p; }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// --- the emulator -----------------------------------------------------------------------------

namespace emu {

enum State { RUNNABLE, AT_BARRIER, AT_WARP_OP, FINISHED };
enum WarpOp { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, SYNCWARP, VOTE_BALLOT, VOTE_ANY, VOTE_ALL };
static const char* const warp_op_names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                            "__shfl_xor_sync", "__syncwarp", "__ballot_sync",
                                            "__any_sync", "__all_sync"};
enum Schedule { FORWARD = 0, REVERSE = 1, RANDOM = 2 };

static const int MAX_THREADS = 1024;
static const int MAX_WARPS = MAX_THREADS / 32;
static const size_t STACK_BYTES = 256 * 1024;  // per fiber; the lowest page is a guard page
#ifndef EMU_DYNAMIC_SMEM_BYTES
#define EMU_DYNAMIC_SMEM_BYTES (48 * 1024)  // a GPU's default limit without an opt-in
#endif

struct Fiber {
    uint3 thread_idx;
    int linear, lane, warp;
    State state;
    int line;                     // source line of the barrier / warp op it waits at
    const uint64_t* wait_gen;     // it may go on once *wait_gen != wait_value
    uint64_t wait_value;
    char* stack;                  // mmap'ed once, reused by every block and launch
#ifdef EMU_UCONTEXT
    ucontext_t context;
#else
    void* sp;                     // saved stack pointer while switched out
#endif
};

struct Barrier {                  // __syncthreads of the current block
    int arrived;
    int line;
    uint64_t generation;          // +1 each time every thread has arrived
};

struct WarpMeeting {              // the warp operation the lanes of one warp are gathering for
    unsigned int arrived_mask;
    unsigned int mask;            // the mask, kind and line of the first lane to arrive
    int op, line;
    uint64_t value[32];           // what each arrived lane brought
    int source[32];               // which lane each arrived lane wants to read (shuffles)
    uint64_t result[32];          // filled when the last lane arrives; read after the wake-up
    unsigned int result_mask;     // the lanes that took part (for votes)
    uint64_t generation;
};

struct State_ {
    std::mutex lock;              // one launch at a time per process
    Fiber fibers[MAX_THREADS];
    int fiber_count;              // stacks allocated so far
    Fiber* current;
    Barrier barrier;
    WarpMeeting warps[MAX_WARPS];
    unsigned int existing_lanes[MAX_WARPS];  // lanes that exist in each warp (partial last warp)
    int n_threads;
    int finished;
    bool error;
    char message[8192];
    void (*body)(void*);
    void* body_args;
    uint3 block_idx;
    dim3 block_dim, grid_dim;
    int schedule;
    uint64_t rng;
    int order[MAX_THREADS];
#ifdef EMU_UCONTEXT
    ucontext_t scheduler_context;
#else
    void* scheduler_sp;
#endif
};
static State_ g;

}  // namespace emu

#define threadIdx (emu::g.current->thread_idx)
#define blockIdx (emu::g.block_idx)
#define blockDim (emu::g.block_dim)
#define gridDim (emu::g.grid_dim)

namespace emu {

// --- fiber switching ---
// On x86-64: save the callee-saved registers (and the SSE/x87 control words) on the current
// stack, store the stack pointer, load the other fiber's stack pointer, restore its registers,
// return into it. That is all a cooperative thread switch needs (about 20 instructions).
// Elsewhere (or with -DEMU_USE_UCONTEXT): swapcontext, correct but a syscall per switch.
#ifndef EMU_UCONTEXT
__attribute__((naked, noinline, noipa)) static void switch_stacks(void** save_sp, void* load_sp) {
    __asm__ volatile(
        "pushq %rbp\n\t"
        "pushq %rbx\n\t"
        "pushq %r12\n\t"
        "pushq %r13\n\t"
        "pushq %r14\n\t"
        "pushq %r15\n\t"
        "subq $8, %rsp\n\t"
        "stmxcsr (%rsp)\n\t"
        "fnstcw 4(%rsp)\n\t"
        "movq %rsp, (%rdi)\n\t"
        "movq %rsi, %rsp\n\t"
        "ldmxcsr (%rsp)\n\t"
        "fldcw 4(%rsp)\n\t"
        "addq $8, %rsp\n\t"
        "popq %r15\n\t"
        "popq %r14\n\t"
        "popq %r13\n\t"
        "popq %r12\n\t"
        "popq %rbx\n\t"
        "popq %rbp\n\t"
        "ret\n\t");
}
#endif

// Back to the scheduler; returns when the scheduler resumes this fiber.
__attribute__((noinline, noipa)) static void yield_to_scheduler() {
    Fiber* self = g.current;
#ifdef EMU_UCONTEXT
    swapcontext(&self->context, &g.scheduler_context);
#else
    switch_stacks(&self->sp, g.scheduler_sp);
#endif
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline, noipa)) static void resume(Fiber* f) {
    g.current = f;
#ifdef EMU_UCONTEXT
    swapcontext(&g.scheduler_context, &f->context);
#else
    switch_stacks(&g.scheduler_sp, f->sp);
#endif
    __asm__ volatile("" ::: "memory");
}

static void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char* format, ...) {
    if (g.error) return;  // keep the first error
    g.error = true;
    va_list args;
    va_start(args, format);
    vsnprintf(g.message, sizeof g.message, format, args);
    va_end(args);
}

// Stop this fiber for good (after an error): the scheduler sees g.error and abandons the block.
[[noreturn]] static void abort_fiber() {
    for (;;) yield_to_scheduler();
}

// Wait until *generation moves past its current value.
static void wait_for(State state, int line, const uint64_t* generation) {
    Fiber* self = g.current;
    self->state = state;
    self->line = line;
    self->wait_gen = generation;
    self->wait_value = *generation;
    while (*generation == self->wait_value) {
        yield_to_scheduler();
        if (g.error) abort_fiber();
    }
    self->state = RUNNABLE;
}

static void fiber_main() {
    g.body(g.body_args);  // the kernel, with this fiber's threadIdx
    g.current->state = FINISHED;
    g.finished++;
    abort_fiber();  // never resumed again
}

#ifdef EMU_UCONTEXT
static void fiber_entry_ucontext() { fiber_main(); }
#endif

static bool prepare_fiber(Fiber* f) {
    if (!f->stack) {
        void* mem = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                         -1, 0);
        if (mem == MAP_FAILED) return false;
        mprotect(mem, 4096, PROT_NONE);  // stack overflow -> segfault, not silent corruption
        f->stack = (char*)mem;
    }
#ifdef EMU_UCONTEXT
    getcontext(&f->context);
    f->context.uc_stack.ss_sp = f->stack + 4096;
    f->context.uc_stack.ss_size = STACK_BYTES - 4096;
    f->context.uc_link = nullptr;
    makecontext(&f->context, fiber_entry_ucontext, 0);
#else
    // A stack that switch_stacks can "return" into fiber_main from (see the pops above).
    uint64_t* sp = (uint64_t*)((uintptr_t)(f->stack + STACK_BYTES) & ~(uintptr_t)15);
    *--sp = 0;                                 // fiber_main's return address (it never returns)
    *--sp = (uint64_t)(uintptr_t)&fiber_main;  // popped by `ret`
    for (int i = 0; i < 6; i++) *--sp = 0;     // rbp rbx r12 r13 r14 r15
    *--sp = (0x037FULL << 32) | 0x1F80ULL;     // default x87 control word, default MXCSR
    f->sp = sp;
#endif
    return true;
}

// --- __syncthreads ---

static void syncthreads(int line) {
    Barrier& b = g.barrier;
    if (b.arrived == 0) {
        b.line = line;
    } else if (b.line != line) {
        fail("block (%u,%u,%u): thread (%u,%u,%u) reached __syncthreads at line %d while others "
             "wait at __syncthreads at line %d (a barrier in divergent code)",
             g.block_idx.x, g.block_idx.y, g.block_idx.z, threadIdx.x, threadIdx.y, threadIdx.z,
             line, b.line);
        abort_fiber();
    }
    b.arrived++;
    if (b.arrived == g.n_threads) {  // the last one in opens the barrier
        b.arrived = 0;
        b.generation++;
        return;
    }
    wait_for(AT_BARRIER, line, &b.generation);
}

// --- warp operations ---

// Every warp operation: deposit this lane's value and the lane it reads, wait for the lanes in
// `mask`, get the result the last lane to arrive computed for everyone.
static uint64_t warp_meet(int line, int op, unsigned int mask, uint64_t value, int source) {
    Fiber* self = g.current;
    WarpMeeting& w = g.warps[self->warp];
    const unsigned int lane_bit = 1u << self->lane;
    const unsigned int expected = mask & g.existing_lanes[self->warp];
    if (!(mask & lane_bit)) {
        fail("thread (%u,%u,%u): %s at line %d with mask 0x%08x that does not name its own lane %d",
             threadIdx.x, threadIdx.y, threadIdx.z, warp_op_names[op], line, mask, self->lane);
        abort_fiber();
    }
    if (w.arrived_mask == 0) {
        w.mask = mask;
        w.op = op;
        w.line = line;
    } else if (w.mask != mask || w.op != op || w.line != line) {
        fail("warp %d of block (%u,%u,%u): lane %d reached %s (line %d, mask 0x%08x) while lanes "
             "0x%08x wait at %s (line %d, mask 0x%08x)",
             self->warp, g.block_idx.x, g.block_idx.y, g.block_idx.z, self->lane,
             warp_op_names[op], line, mask, w.arrived_mask, warp_op_names[w.op], w.line, w.mask);
        abort_fiber();
    }
    w.value[self->lane] = value;
    w.source[self->lane] = source;
    w.arrived_mask |= lane_bit;
    if (w.arrived_mask == expected) {  // the last lane in computes everyone's result
        for (int lane = 0; lane < 32; lane++) {
            if (!(expected & (1u << lane))) continue;
            const int src = w.source[lane];
            if (src < 0) continue;  // not a shuffle
            if (!(expected & (1u << src))) {
                fail("warp %d of block (%u,%u,%u): lane %d reads lane %d in %s at line %d, but "
                     "lane %d is not in the mask 0x%08x (its value is undefined on a GPU)",
                     self->warp, g.block_idx.x, g.block_idx.y, g.block_idx.z, lane, src,
                     warp_op_names[op], line, src, mask);
                abort_fiber();
            }
            w.result[lane] = w.value[src];
        }
        w.result_mask = expected;
        w.arrived_mask = 0;
        w.generation++;
    } else {
        wait_for(AT_WARP_OP, line, &w.generation);
    }
    return w.result[self->lane];
}

// Which lane a shuffle reads, following the CUDA programming guide (width splits the warp
// into segments; a source outside the lane's segment means "keep your own value").
static int shuffle_source(int op, int lane, int arg, int width) {
    const int segment_start = lane & ~(width - 1);
    switch (op) {
        case SHFL_IDX: return segment_start + (arg & (width - 1));
        case SHFL_UP: return (lane - segment_start) >= arg ? lane - arg : lane;
        case SHFL_DOWN: return (lane - segment_start) + arg < width ? lane + arg : lane;
        default: {  // SHFL_XOR: lanes of later segments are out of reach
            const int src = lane ^ arg;
            return src < segment_start + width ? src : lane;
        }
    }
}

template <typename T>
static T shuffle(int line, int op, unsigned int mask, T var, int arg, int width = 32) {
    static_assert(sizeof(T) <= 8, "shuffle of a type larger than 8 bytes");
    if (width < 1 || width > 32 || (width & (width - 1))) {
        fail("%s at line %d: width %d is not a power of 2 in [1, 32]", warp_op_names[op], line,
             width);
        abort_fiber();
    }
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof(T));
    bits = warp_meet(line, op, mask, bits, shuffle_source(op, g.current->lane, arg, width));
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

static void syncwarp(int line, unsigned int mask = 0xffffffffu) {
    warp_meet(line, SYNCWARP, mask, 0, -1);
}

static unsigned int vote(int line, int op, unsigned int mask, int predicate) {
    Fiber* self = g.current;
    warp_meet(line, op, mask, predicate != 0, self->lane);
    WarpMeeting& w = g.warps[self->warp];
    unsigned int ballot = 0;
    for (int lane = 0; lane < 32; lane++)
        if ((w.result_mask & (1u << lane)) && w.result[lane]) ballot |= 1u << lane;
    if (op == VOTE_BALLOT) return ballot;
    if (op == VOTE_ANY) return ballot != 0;
    return ballot == w.result_mask;  // VOTE_ALL
}

// --- shared memory: every thread_local of this library, found through the dynamic loader ---

static thread_local unsigned char tls_anchor;  // touching it makes sure the TLS block exists

struct TlsSearch { uintptr_t self; size_t size; };
static int find_tls_size(struct dl_phdr_info* info, size_t, void* data) {
    TlsSearch* search = (TlsSearch*)data;
    bool mine = false;
    size_t tls = 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        if (ph.p_type == PT_LOAD && search->self >= info->dlpi_addr + ph.p_vaddr &&
            search->self < info->dlpi_addr + ph.p_vaddr + ph.p_memsz)
            mine = true;
        if (ph.p_type == PT_TLS) tls = ph.p_memsz;
    }
    if (mine) search->size = tls;
    return mine;
}

// The calling thread's copy of this library's TLS segment: all the __shared__ arrays.
static bool shared_memory_range(unsigned char** start, size_t* size) {
    *(volatile unsigned char*)&tls_anchor = 0;
    Dl_info info;
    if (!dladdr((void*)&shared_memory_range, &info)) return false;
    void* handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!handle) return false;
    void* block = nullptr;
    const int rc = dlinfo(handle, RTLD_DI_TLS_DATA, &block);
    dlclose(handle);
    if (rc != 0 || !block) return false;
    TlsSearch search = {(uintptr_t)&shared_memory_range, 0};
    dl_iterate_phdr(find_tls_size, &search);
    if (!search.size) return false;
    *start = (unsigned char*)block;
    *size = search.size;
    return true;
}

// --- the scheduler ---

static uint64_t next_random() {  // xorshift64
    g.rng ^= g.rng << 13;
    g.rng ^= g.rng >> 7;
    g.rng ^= g.rng << 17;
    return g.rng;
}

static void describe_deadlock() {
    int pos = snprintf(g.message, sizeof g.message,
                       "deadlock in block (%u,%u,%u): no thread can move.",
                       g.block_idx.x, g.block_idx.y, g.block_idx.z);
    // group the threads by where they are: "N threads wait at X line L (first: thread (x,y,z))"
    bool reported[MAX_THREADS] = {};
    for (int i = 0; i < g.n_threads && pos < (int)sizeof g.message - 200; i++) {
        if (reported[i]) continue;
        const Fiber& f = g.fibers[i];
        int count = 0;
        for (int j = i; j < g.n_threads; j++) {
            const Fiber& o = g.fibers[j];
            if (!reported[j] && o.state == f.state && o.line == f.line &&
                (f.state != AT_WARP_OP || g.warps[o.warp].op == g.warps[f.warp].op)) {
                reported[j] = true;
                count++;
            }
        }
        const char* where = f.state == FINISHED     ? "have returned"
                            : f.state == AT_BARRIER ? "wait at __syncthreads"
                            : f.state == AT_WARP_OP ? "wait at a warp operation"
                                                    : "are runnable";
        if (f.state == AT_WARP_OP) where = warp_op_names[g.warps[f.warp].op];
        if (f.state == FINISHED)
            pos += snprintf(g.message + pos, sizeof g.message - pos,
                            " %d thread(s) %s (first: (%u,%u,%u));", count, where,
                            f.thread_idx.x, f.thread_idx.y, f.thread_idx.z);
        else
            pos += snprintf(g.message + pos, sizeof g.message - pos,
                            " %d thread(s) %s%s at line %d (first: (%u,%u,%u));", count,
                            f.state == AT_WARP_OP ? "wait at " : "", where, f.line,
                            f.thread_idx.x, f.thread_idx.y, f.thread_idx.z);
    }
    g.error = true;
}

static bool run_block() {
    const int n = g.n_threads;
    g.finished = 0;
    g.barrier = Barrier{0, 0, 0};
    for (int w = 0; w < MAX_WARPS; w++) {
        g.warps[w].arrived_mask = 0;
        g.warps[w].generation = 0;
        const int lanes = n - 32 * w;
        g.existing_lanes[w] = lanes >= 32 ? 0xffffffffu : (lanes <= 0 ? 0u : (1u << lanes) - 1u);
    }
    for (int i = 0; i < n; i++) {
        Fiber& f = g.fibers[i];
        f.linear = i;
        f.lane = i % 32;
        f.warp = i / 32;
        f.thread_idx.x = i % g.block_dim.x;
        f.thread_idx.y = (i / g.block_dim.x) % g.block_dim.y;
        f.thread_idx.z = i / (g.block_dim.x * g.block_dim.y);
        f.state = RUNNABLE;
        f.line = 0;
        if (!prepare_fiber(&f)) {
            fail("cannot allocate a %zu-byte fiber stack", STACK_BYTES);
            return false;
        }
        g.order[i] = g.schedule == REVERSE ? n - 1 - i : i;
    }
    while (g.finished < n) {
        if (g.schedule == RANDOM) {
            for (int i = n - 1; i > 0; i--) {
                const int j = (int)(next_random() % (uint64_t)(i + 1));
                const int t = g.order[i];
                g.order[i] = g.order[j];
                g.order[j] = t;
            }
        }
        int resumed = 0;
        for (int k = 0; k < n; k++) {
            Fiber* f = &g.fibers[g.order[k]];
            if (f->state == FINISHED) continue;
            if (f->state != RUNNABLE && *f->wait_gen == f->wait_value) continue;  // still blocked
            resume(f);
            resumed++;
            if (g.error) return false;
        }
        if (resumed == 0) {
            describe_deadlock();
            return false;
        }
    }
    return true;
}

// Run body(args) as a kernel launch <<<grid, block, dynamic_smem>>>. 0 on success; otherwise
// the error is in emu_last_error().
static int launch(dim3 grid, dim3 block, size_t dynamic_smem, void (*body)(void*), void* args) {
    std::lock_guard<std::mutex> hold(g.lock);
    g.error = false;
    g.message[0] = 0;
    const unsigned long long n = (unsigned long long)block.x * block.y * block.z;
    if (n == 0 || n > MAX_THREADS || block.x > 1024 || block.y > 1024 || block.z > 64) {
        fail("invalid block (%u,%u,%u): at most 1024 threads, x,y <= 1024, z <= 64", block.x,
             block.y, block.z);
        return 1;
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
        grid.z > 65535) {
        fail("invalid grid (%u,%u,%u): x in [1, 2^31-1], y and z in [1, 65535]", grid.x, grid.y,
             grid.z);
        return 1;
    }
    if (dynamic_smem > EMU_DYNAMIC_SMEM_BYTES) {
        fail("%zu bytes of dynamic shared memory requested, the limit is %d", dynamic_smem,
             EMU_DYNAMIC_SMEM_BYTES);
        return 1;
    }
    unsigned char* smem = nullptr;
    size_t smem_size = 0;
    if (!shared_memory_range(&smem, &smem_size)) {
        fail("cannot locate the library's thread-local (shared memory) segment");
        return 1;
    }
    g.block_dim = block;
    g.grid_dim = grid;
    g.n_threads = (int)n;
    g.body = body;
    g.body_args = args;
    for (unsigned int z = 0; z < grid.z; z++)
        for (unsigned int y = 0; y < grid.y; y++)
            for (unsigned int x = 0; x < grid.x; x++) {
                g.block_idx = uint3{x, y, z};
                memset(smem, 0xFF, smem_size);  // GPU shared memory starts as garbage
                if (!run_block()) return 1;
            }
    return 0;
}

}  // namespace emu

// --- the CUDA names, routed to the emulator (macros, so each call knows its source line) ---

#define __syncthreads() emu::syncthreads(__LINE__)
#define __syncwarp(...) emu::syncwarp(__LINE__, ##__VA_ARGS__)
#define __shfl_sync(mask, var, lane, ...) \
    emu::shuffle(__LINE__, emu::SHFL_IDX, mask, var, lane, ##__VA_ARGS__)
#define __shfl_up_sync(mask, var, delta, ...) \
    emu::shuffle(__LINE__, emu::SHFL_UP, mask, var, delta, ##__VA_ARGS__)
#define __shfl_down_sync(mask, var, delta, ...) \
    emu::shuffle(__LINE__, emu::SHFL_DOWN, mask, var, delta, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, var, lane_mask, ...) \
    emu::shuffle(__LINE__, emu::SHFL_XOR, mask, var, lane_mask, ##__VA_ARGS__)
#define __ballot_sync(mask, predicate) emu::vote(__LINE__, emu::VOTE_BALLOT, mask, predicate)
#define __any_sync(mask, predicate) emu::vote(__LINE__, emu::VOTE_ANY, mask, predicate)
#define __all_sync(mask, predicate) emu::vote(__LINE__, emu::VOTE_ALL, mask, predicate)
#define __trap() (emu::fail("__trap() at line %d", __LINE__), emu::abort_fiber())

// --- the C interface kernel_emu.py calls ---

extern "C" const char* emu_last_error() { return emu::g.message; }

// 0 = forward, 1 = reverse, 2 = random (seeded) order of the fibers in each scheduling round.
extern "C" int emu_set_schedule(int schedule, unsigned long long seed) {
    if (schedule < 0 || schedule > 2) return 1;
    std::lock_guard<std::mutex> hold(emu::g.lock);
    emu::g.schedule = schedule;
    emu::g.rng = seed * 2654435761ULL + 88172645463325252ULL;
    return 0;
}
