// Int8/int4 (and float16) weight matmuls for a few token rows on the CPU (see cpu_quant.py).
// Every weight byte is read once per call; threads split the output rows (parallel_rows).
// Two ways to meet the input:
// - int8 activations (the default): each input row is quantized to int8 once per call, with a float
//   scale per block of 32 values (int8 weights) or per int4 group, and every weight row meets it in
//   integer dot products (AVX2: vpmaddubsw, 32 products an instruction); only a block's (int8) or a
//   group's (int4) integer sum becomes float. Needs K % 32 == 0 (int8), and int4 groups of 64 to 256
//   columns, a multiple of 64 (each 32-byte slice of packed bytes then meets two 32-byte input slices).
//   Int8 weights must lie in -127..127 (as quantize.py and THUDM's checkpoints store them).
// - float activations: each weight is widened to float32 in registers and meets the float input
//   (exact up to summation order); shapes the blocks do not fit, or on request.
// And float16 weights (a quantized model's lm_head and embeddings kept as released checkpoints store
// them): each weight widened to float32 in registers (F16C), against the float input.
// Each output is summed by one thread in a fixed order, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __AVX2__
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 widen_i8(__m128i bytes) {  // the low 8 int8 -> 8 float
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

static inline __m256 widen_u8(__m128i bytes) {  // the low 8 uint8 -> 8 float
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}
#endif

constexpr int64_t BLOCK = 32;  // input values per int8 scale

// f(begin, end) over ranges of output rows [0, N), on torch's intra-op threads (torch.set_num_threads).
// parallel_for is inlined here: it forks only where this file is compiled with OpenMP (cpu_quant.py
// does), and the count is set from torch's in case this library got an OpenMP runtime of its own.
template <typename F>
static void parallel_rows(int64_t N, const F& f) {
#ifdef _OPENMP
    omp_set_num_threads(at::get_num_threads());
#endif
    at::parallel_for(0, N, 16, f);
}

// ---- float activations ---------------------------------------------------------------------------

// sum_k w[k] * x[k] for int8 w
static float dot_int8(const int8_t* w, const float* x, int64_t K) {
    int64_t k = 0;
    float dot = 0.f;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + 32 <= K; k += 32) {
        __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
        __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16));
        a0 = _mm256_fmadd_ps(widen_i8(b0), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(widen_i8(_mm_srli_si128(b0, 8)), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(widen_i8(b1), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(widen_i8(_mm_srli_si128(b1, 8)), _mm256_loadu_ps(x + k + 24), a3);
    }
    dot = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; k < K; ++k) dot += static_cast<float>(w[k]) * x[k];
    return dot;
}

// Adds scale * sum_j (b[j] & 15) * lo[j] + (b[j] >> 4) * hi[j] over the H bytes of one int4 group
// to `total` (AVX2: 8 lanes, summed once per row, not per group) and to `rest` (the scalar tail).
#ifdef __AVX2__
static inline void add_int4_group(const uint8_t* b, const float* lo, const float* hi, int64_t H, float scale,
                                  __m256& total, float& rest) {
    const __m128i mask = _mm_set1_epi8(15);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = 0;
    for (; j + 16 <= H; j += 16) {
        __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j));
        __m128i low = _mm_and_si128(bytes, mask), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        a0 = _mm256_fmadd_ps(widen_u8(low), _mm256_loadu_ps(lo + j), a0);
        a1 = _mm256_fmadd_ps(widen_u8(_mm_srli_si128(low, 8)), _mm256_loadu_ps(lo + j + 8), a1);
        a2 = _mm256_fmadd_ps(widen_u8(high), _mm256_loadu_ps(hi + j), a2);
        a3 = _mm256_fmadd_ps(widen_u8(_mm_srli_si128(high, 8)), _mm256_loadu_ps(hi + j + 8), a3);
    }
    for (; j + 8 <= H; j += 8) {
        __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + j));
        __m128i low = _mm_and_si128(bytes, mask), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        a0 = _mm256_fmadd_ps(widen_u8(low), _mm256_loadu_ps(lo + j), a0);
        a2 = _mm256_fmadd_ps(widen_u8(high), _mm256_loadu_ps(hi + j), a2);
    }
    total = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), total);
    float tail = 0.f;
    for (; j < H; ++j) tail += static_cast<float>(b[j] & 15) * lo[j] + static_cast<float>(b[j] >> 4) * hi[j];
    rest += scale * tail;
}
#else
static inline void add_int4_group(const uint8_t* b, const float* lo, const float* hi, int64_t H, float scale,
                                  float& rest) {
    float dot = 0.f;
    for (int64_t j = 0; j < H; ++j) dot += static_cast<float>(b[j] & 15) * lo[j] + static_cast<float>(b[j] >> 4) * hi[j];
    rest += scale * dot;
}
#endif

static void int8_linear_float(const float* xp, const int8_t* qp, const at::Half* sp, float* yp, int64_t M, int64_t K,
                              int64_t N) {
    parallel_rows(N, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
            const float s = static_cast<float>(sp[n]);
            for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot_int8(qp + n * K, xp + m * K, K) * s;
        }
    });
}

// xsum (M, groups): the input summed over each group, for the zero points
static void int4_linear_float(const float* xp, const uint8_t* pp, const at::Half* sp, const uint8_t* zp,
                              const float* xs, float* yp, int64_t M, int64_t K, int64_t N, int64_t groups) {
    const int64_t G = K / groups, H = G / 2;
    parallel_rows(N, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
            for (int64_t m = 0; m < M; ++m) {
                // (q - zero) * scale summed against x = scale * q.x - scale * zero * sum(x)
                float rest = 0.f;
#ifdef __AVX2__
                __m256 total = _mm256_setzero_ps();
#endif
                for (int64_t g = 0; g < groups; ++g) {
                    const float* lo = xp + m * K + g * G;
                    const float s = static_cast<float>(sp[n * groups + g]);
#ifdef __AVX2__
                    add_int4_group(pp + n * (K / 2) + g * H, lo, lo + H, H, s, total, rest);
#else
                    add_int4_group(pp + n * (K / 2) + g * H, lo, lo + H, H, s, rest);
#endif
                    rest -= s * static_cast<float>(zp[n * groups + g]) * xs[m * groups + g];
                }
#ifdef __AVX2__
                rest += hsum(total);
#endif
                yp[m * N + n] = rest;
            }
        }
    });
}

// ---- int8 activations ----------------------------------------------------------------------------

// The input rows quantized per block of `block` values (a multiple of 32): x ~= q * d with
// d = max|x| / 127 over the block and q = round-half-even(x * (1 / d)), all in float32 (the Python
// tests restate this rule).
struct QuantizedInput {
    std::vector<int8_t> q;   // (M, K)
    std::vector<float> d;    // (M, K / block)
    std::vector<float> sum;  // (M, K / block): d * sum(q) of each block, for int4's zero points
};

static QuantizedInput quantize_input(const float* x, int64_t M, int64_t K, int64_t block) {
    const int64_t blocks = M * K / block;
    QuantizedInput in{std::vector<int8_t>(M * K), std::vector<float>(blocks), std::vector<float>(blocks)};
    for (int64_t b = 0; b < blocks; ++b) {
        const float* v = x + b * block;
        int8_t* q = in.q.data() + b * block;
        int32_t total = 0;
        float amax = 0.f;
        bool nan = false;
#ifdef __AVX2__
        const __m256 sign = _mm256_set1_ps(-0.f);
        __m256 top = _mm256_setzero_ps(), unordered = top;
        for (int64_t i = 0; i < block; i += 8) {
            const __m256 part = _mm256_loadu_ps(v + i);
            top = _mm256_max_ps(top, _mm256_andnot_ps(sign, part));
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(part, part, _CMP_UNORD_Q));
        }
        __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        t = _mm_max_ps(t, _mm_movehl_ps(t, t));
        amax = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
        nan = _mm256_movemask_ps(unordered) != 0;
        const float d = amax / 127.f;
        const __m256 inverse = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
        __m256i sums = _mm256_setzero_si256();
        for (int64_t i = 0; i < block; i += 32) {
            __m256i r[4];  // vcvtps2dq rounds half to even (the default rounding mode), as torch.round does
            for (int j = 0; j < 4; ++j) r[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * j), inverse));
            // the packs interleave the two 128-bit lanes: put the 4-byte groups back in order
            const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i),
                                _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
            sums = _mm256_add_epi32(sums, _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3])));
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        total = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
#else
        for (int64_t i = 0; i < block; ++i) {
            amax = std::fmax(amax, std::fabs(v[i]));
            nan = nan || std::isnan(v[i]);
        }
        const float d = amax / 127.f;
        const float inverse = d > 0.f ? 1.f / d : 0.f;
        for (int64_t i = 0; i < block; ++i) {
            // nearbyint rounds half to even (the default rounding mode), as torch.round does
            const float r = std::fmin(127.f, std::fmax(-127.f, std::nearbyint(v[i] * inverse)));
            q[i] = static_cast<int8_t>(r);
            total += static_cast<int32_t>(r);
        }
#endif
        // a NaN input makes its rows' outputs NaN, as in the float path (inf does too: q = 0, d = inf)
        in.d[b] = nan ? std::nanf("") : d;
        in.sum[b] = in.d[b] * static_cast<float>(total);
    }
    return in;
}

#ifdef __AVX2__
// 16 int16 lanes that together hold sum_i u[i] * s[i] over 32 byte pairs, u unsigned and s signed
// (each lane: two products, exact while |u| * |s| stays under 16384: |u|, |s| <= 127, or u <= 15)
static inline __m256i products16(__m256i u, __m256i s) { return _mm256_maddubs_epi16(u, s); }

// the same summed to 8 int32 lanes
static inline __m256i products32(__m256i u, __m256i s) {
    return _mm256_madd_epi16(products16(u, s), _mm256_set1_epi16(1));
}

static inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// the next rows' bytes, requested early: one core reaches the memory's bandwidth only with more
// reads in flight than the hardware prefetcher keeps (measured: 15.5 -> 18.4 GB/s for int8)
static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + 1024, _MM_HINT_T0); }

// The same for float16 rows (dot_half), further ahead: each 64-byte line of them costs about 20
// instructions (widening and FMAs), so the out-of-order window reaches fewer lines ahead than the int8
// kernels' (one core, 130,528 x 1024: none 27 ms, 1024 bytes 27-29 ms, 4096 or 8192 bytes 23-25 ms).
constexpr int64_t HALF_PREFETCH = 4096;
#endif

// One int8 weight row against one input row quantized per block of 32 (x int8, d per block): each
// block's dot product in int32, times its d, summed in float32.
static inline float dot_row_int8(const int8_t* w, const int8_t* x, const float* d, int64_t K) {
    const int64_t blocks = K / BLOCK;
    int64_t b = 0;
#ifdef __AVX2__
    // two accumulators (even and odd blocks): the adds of one do not wait for the other's
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    for (; b + 2 <= blocks; b += 2) {
        prefetch(w + b * BLOCK);
        const __m256i x0 = load32(x + b * BLOCK), x1 = load32(x + (b + 1) * BLOCK);
        // |x| is the unsigned side of vpmaddubsw; x's sign moves onto w
        const __m256i p0 = products32(_mm256_sign_epi8(x0, x0), _mm256_sign_epi8(load32(w + b * BLOCK), x0));
        const __m256i p1 = products32(_mm256_sign_epi8(x1, x1), _mm256_sign_epi8(load32(w + (b + 1) * BLOCK), x1));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d[b]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d[b + 1]), acc1);
    }
    if (b < blocks) {
        const __m256i x0 = load32(x + b * BLOCK);
        const __m256i p0 = products32(_mm256_sign_epi8(x0, x0), _mm256_sign_epi8(load32(w + b * BLOCK), x0));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d[b]), acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
#else
    float total = 0.f;
    for (; b < blocks; ++b) {
        int32_t block = 0;
        for (int64_t i = 0; i < BLOCK; ++i) block += int32_t(w[b * BLOCK + i]) * int32_t(x[b * BLOCK + i]);
        total += static_cast<float>(block) * d[b];
    }
    return total;
#endif
}

// One packed int4 row (K/2 bytes, groups of G = 64 * SLICES columns) against one input row quantized
// per group (x int8, d and xsum = d * sum(q) per group):
// sum_g scale[g] * d[g] * (q . x over group g) - scale[g] * zero[g] * xsum[g].
// One d per group lets a group's products add up in int16 (2 * SLICES vpmaddubsw results of at most
// 2 * 15 * 128 each: under 32768 up to 4 slices, G = 256), then meet floats once. SLICES is a
// template parameter so that the slices of a group unroll and the pointers stay in registers.
constexpr int64_t MAX_INT4_GROUP = 256;

template <int SLICES>
static inline float dot_row_int4(const uint8_t* w, const at::Half* scale, const uint8_t* zero, const int8_t* x,
                                 const float* d, const float* xsum, int64_t K) {
    constexpr int64_t H = 32 * SLICES, G = 2 * H;
    const int64_t groups = K / G;
    float rest = 0.f;
#ifdef __AVX2__
    const __m256i mask = _mm256_set1_epi8(15);
    __m256 total = _mm256_setzero_ps(), zeros = total;
    alignas(32) float sd[8];  // scale * d of 8 groups
    for (int64_t g0 = 0; g0 < groups; g0 += 8) {
        const int64_t count = groups - g0 < 8 ? groups - g0 : 8;
        if (count == 8) {  // the groups' scalars 8 at a time: scale * d, and the zero points' term
            const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + g0)));
            const __m256 z8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zero + g0))));
            _mm256_store_ps(sd, _mm256_mul_ps(s8, _mm256_loadu_ps(d + g0)));
            zeros = _mm256_fmadd_ps(_mm256_mul_ps(s8, z8), _mm256_loadu_ps(xsum + g0), zeros);
        } else {
            for (int64_t i = 0; i < count; ++i) {
                const float s = static_cast<float>(scale[g0 + i]);
                sd[i] = s * d[g0 + i];
                rest -= s * static_cast<float>(zero[g0 + i]) * xsum[g0 + i];
            }
        }
        for (int64_t i = 0; i < count; ++i) {
            const uint8_t* bytes = w + (g0 + i) * H;
            const int8_t* xg = x + (g0 + i) * G;
            prefetch(bytes);
            if (SLICES > 1) prefetch(bytes + 32);
            // byte j of the group: column j (low nibble) and j + H (high), in slices of 32 bytes
            __m256i sums = _mm256_setzero_si256();
            for (int j = 0; j < SLICES; ++j) {
                const __m256i b = load32(bytes + 32 * j);
                const __m256i low = _mm256_and_si256(b, mask), high = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
                sums = _mm256_add_epi16(sums, products16(low, load32(xg + 32 * j)));
                sums = _mm256_add_epi16(sums, products16(high, load32(xg + H + 32 * j)));
            }
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums, _mm256_set1_epi16(1)));
            total = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(sd + i), total);
        }
    }
    return hsum(_mm256_sub_ps(total, zeros)) + rest;
#else
    float total = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
        int32_t dot = 0;
        for (int64_t j = 0; j < H; ++j) {
            const uint8_t byte = w[g * H + j];
            dot += int32_t(byte & 15) * int32_t(x[g * G + j]) + int32_t(byte >> 4) * int32_t(x[g * G + H + j]);
        }
        const float s = static_cast<float>(scale[g]);
        total += static_cast<float>(dot) * (s * d[g]);
        rest -= s * static_cast<float>(zero[g]) * xsum[g];
    }
    return total + rest;
#endif
}

// Each thread takes whole output rows; a row meets every input row while its weights are in L1
// (rows one at a time: interleaving the loads of several rows measured slower from memory).
static void int8_linear_int8(const float* xp, const int8_t* qp, const at::Half* sp, float* yp, int64_t M, int64_t K,
                             int64_t N) {
    const QuantizedInput in = quantize_input(xp, M, K, BLOCK);
    parallel_rows(N, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
            const float s = static_cast<float>(sp[n]);
            for (int64_t m = 0; m < M; ++m)
                yp[m * N + n] = dot_row_int8(qp + n * K, in.q.data() + m * K, in.d.data() + m * (K / BLOCK), K) * s;
        }
    });
}

template <int SLICES>
static void int4_linear_int8(const float* xp, const uint8_t* pp, const at::Half* sp, const uint8_t* zp, float* yp,
                             int64_t M, int64_t K, int64_t N) {
    constexpr int64_t G = 64 * SLICES;
    const int64_t groups = K / G;
    const QuantizedInput in = quantize_input(xp, M, K, G);  // one scale per int4 group
    parallel_rows(N, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
            for (int64_t m = 0; m < M; ++m)
                yp[m * N + n] = dot_row_int4<SLICES>(pp + n * (K / 2), sp + n * groups, zp + n * groups,
                                                     in.q.data() + m * K, in.d.data() + m * groups,
                                                     in.sum.data() + m * groups, K);
        }
    });
}

// ---- float16 weights -----------------------------------------------------------------------------

// RW float16 weight rows (w, rows K apart) against RX input rows (x, rows K apart):
// out[i * RX + r] = sum_k w[i * K + k] * x[r * K + k]. Each weight vector is widened to float32 in
// registers (F16C) once per tile and meets the RX input rows in L1. Two accumulators per output (the
// 8-wide slices of each 32 columns alternate between them), whatever the tile: an output's summation
// order does not depend on the tile, so a result is the same whichever rows it is computed with.
template <int RW, int RX>
static inline void dot_half(const at::Half* w, const float* x, int64_t K, float* out) {
    int64_t k = 0;
#ifdef __AVX2__
    __m256 a0[RW][RX], a1[RW][RX];
    for (int i = 0; i < RW; ++i)
        for (int r = 0; r < RX; ++r) a0[i][r] = a1[i][r] = _mm256_setzero_ps();
    for (; k + 32 <= K; k += 32) {  // 64 bytes of each weight row: one cache line, one prefetch
        for (int i = 0; i < RW; ++i)
            _mm_prefetch(reinterpret_cast<const char*>(w + i * K + k) + HALF_PREFETCH, _MM_HINT_T0);
        for (int i = 0; i < RW; ++i) {
            const __m128i* p = reinterpret_cast<const __m128i*>(w + i * K + k);
            const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(p)), w1 = _mm256_cvtph_ps(_mm_loadu_si128(p + 1));
            const __m256 w2 = _mm256_cvtph_ps(_mm_loadu_si128(p + 2)), w3 = _mm256_cvtph_ps(_mm_loadu_si128(p + 3));
            for (int r = 0; r < RX; ++r) {
                const float* xr = x + r * K + k;
                a0[i][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a0[i][r]);
                a1[i][r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), a1[i][r]);
                a0[i][r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), a0[i][r]);
                a1[i][r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), a1[i][r]);
            }
        }
    }
    for (; k + 8 <= K; k += 8)
        for (int i = 0; i < RW; ++i) {
            const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i * K + k)));
            for (int r = 0; r < RX; ++r) a0[i][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), a0[i][r]);
        }
    for (int i = 0; i < RW; ++i)
        for (int r = 0; r < RX; ++r) out[i * RX + r] = hsum(_mm256_add_ps(a0[i][r], a1[i][r]));
#else
    for (int i = 0; i < RW * RX; ++i) out[i] = 0.f;
#endif
    for (; k < K; ++k)
        for (int i = 0; i < RW; ++i)
            for (int r = 0; r < RX; ++r) out[i * RX + r] += static_cast<float>(w[i * K + k]) * x[r * K + k];
}

// Each thread takes whole output rows. One input row (decoding): 4 weight rows at a time, 4 streams
// from memory (130,528 x 1024 on one core: 1.65-1.7x faster than float32 BLAS, 1.6x one row at a
// time). More input rows: one weight row at a time meets them in tiles of up to 4 while it is in L1,
// widened once per tile (4 rows: 26 ms, against 31 ms for tiles of 2).
static void half_linear_rows(const float* xp, const at::Half* wp, float* yp, int64_t M, int64_t K, int64_t N) {
    parallel_rows(N, [&](int64_t begin, int64_t end) {
        float out[4];
        int64_t n = begin;
        if (M == 1) {
            for (; n + 4 <= end; n += 4) {
                dot_half<4, 1>(wp + n * K, xp, K, out);
                for (int i = 0; i < 4; ++i) yp[n + i] = out[i];
            }
            for (; n < end; ++n) dot_half<1, 1>(wp + n * K, xp, K, yp + n);
            return;
        }
        for (; n < end; ++n) {
            const at::Half* w = wp + n * K;
            int64_t m = 0;
            for (; m + 4 <= M; m += 4) {
                dot_half<1, 4>(w, xp + m * K, K, out);
                for (int r = 0; r < 4; ++r) yp[(m + r) * N + n] = out[r];
            }
            if (m + 2 <= M) {
                dot_half<1, 2>(w, xp + m * K, K, out);
                for (int r = 0; r < 2; ++r) yp[(m + r) * N + n] = out[r];
                m += 2;
            }
            if (m < M) dot_half<1, 1>(w, xp + m * K, K, yp + m * N + n);
        }
    });
}

// ---- the ops -------------------------------------------------------------------------------------

// y += bias (N,) float32, row by row
static void add_bias(at::Tensor& y, const std::optional<at::Tensor>& bias) {
    if (!bias.has_value()) return;
    const at::Tensor b = bias->contiguous();
    const float* bp = b.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const int64_t M = y.size(0), N = y.size(1);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) yp[m * N + n] += bp[n];
}

// y (M, N) = x (M, K) @ (q * scale).T + bias: int8 q (N, K), float16 scale (N,); x and bias float32
static at::Tensor int8_linear(const at::Tensor& x_, const at::Tensor& q_, const at::Tensor& scale_,
                              const std::optional<at::Tensor>& bias, bool int8_input) {
    const at::Tensor x = x_.contiguous(), q = q_.contiguous(), scale = scale_.contiguous();
    const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    if (int8_input && K % BLOCK == 0)
        int8_linear_int8(xp, q.data_ptr<int8_t>(), scale.data_ptr<at::Half>(), y.data_ptr<float>(), M, K, N);
    else
        int8_linear_float(xp, q.data_ptr<int8_t>(), scale.data_ptr<at::Half>(), y.data_ptr<float>(), M, K, N);
    add_bias(y, bias);
    return y;
}

// y (M, N) = x (M, K) @ ((q - zero) * scale).T + bias: q packed by group halves (N, K/2) uint8,
// float16 scale and uint8 zero (N, K/G); x and bias float32
static at::Tensor int4_linear(const at::Tensor& x_, const at::Tensor& packed_, const at::Tensor& scale_,
                              const at::Tensor& zero_, const std::optional<at::Tensor>& bias, bool int8_input) {
    const at::Tensor x = x_.contiguous(), packed = packed_.contiguous(), scale = scale_.contiguous(),
                     zero = zero_.contiguous();
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), groups = scale.size(1), G = K / groups;
    at::Tensor y = at::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const uint8_t* pp = packed.data_ptr<uint8_t>();
    const at::Half* sp = scale.data_ptr<at::Half>();
    const uint8_t* zp = zero.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    if (int8_input && G % 64 == 0 && G <= MAX_INT4_GROUP) {
        if (G == 64) int4_linear_int8<1>(xp, pp, sp, zp, yp, M, K, N);
        else if (G == 128) int4_linear_int8<2>(xp, pp, sp, zp, yp, M, K, N);
        else if (G == 192) int4_linear_int8<3>(xp, pp, sp, zp, yp, M, K, N);
        else int4_linear_int8<4>(xp, pp, sp, zp, yp, M, K, N);
    } else {
        std::vector<float> xsum(M * groups);  // (M, groups): the input summed over each group (in double:
        for (int64_t i = 0; i < M * groups; ++i) {  // it is multiplied by up to 15 times the scale)
            double total = 0.0;
            for (int64_t j = 0; j < G; ++j) total += xp[i * G + j];
            xsum[i] = static_cast<float>(total);
        }
        int4_linear_float(xp, pp, sp, zp, xsum.data(), yp, M, K, N, groups);
    }
    add_bias(y, bias);
    return y;
}

// y (M, N) = x (M, K) @ weight.T + bias: float16 weight (N, K), widened in registers; x and bias float32
static at::Tensor half_linear(const at::Tensor& x_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias) {
    TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "half_linear: x must be (M, K) float32");
    TORCH_CHECK(weight_.dim() == 2 && weight_.scalar_type() == at::kHalf && weight_.size(1) == x_.size(1),
                "half_linear: weight must be (N, K) float16");
    const at::Tensor x = x_.contiguous(), weight = weight_.contiguous();
    const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    half_linear_rows(x.data_ptr<float>(), weight.data_ptr<at::Half>(), y.data_ptr<float>(), M, K, N);
    add_bias(y, bias);
    return y;
}

// The schemas here, the CPU kernels below; cpu_quant.py registers their shape functions (fake
// tensors), so torch.compile traces them as single ops.
TORCH_LIBRARY(chatglm_ft_cpu, m) {
    m.def("int8_linear(Tensor x, Tensor q, Tensor scale, Tensor? bias, bool int8_input) -> Tensor");
    m.def("int4_linear(Tensor x, Tensor packed, Tensor scale, Tensor zero, Tensor? bias, bool int8_input) -> Tensor");
    m.def("half_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatglm_ft_cpu, CPU, m) {
    m.impl("int8_linear", &int8_linear);
    m.impl("int4_linear", &int4_linear);
    m.impl("half_linear", &half_linear);
}
