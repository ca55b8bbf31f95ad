// Int8/int4 weight-only matmuls for a few token rows on the CPU (see cpu_quant.py).
// Every weight byte is read once per call and widened to float32 in registers; threads split the
// output rows through ATen's pool (torch.set_num_threads applies).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>

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

// y (M, N) = x (M, K) @ (q * scale).T: int8 q (N, K), float16 scale (N,); x float32 contiguous
static at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
    const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const int8_t* qp = q.data_ptr<int8_t>();
    const at::Half* sp = scale.data_ptr<at::Half>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
            const float s = static_cast<float>(sp[n]);
            for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot_int8(qp + n * K, xp + m * K, K) * s;
        }
    });
    return y;
}

// y (M, N) = x (M, K) @ ((q - zero) * scale).T: q packed by group halves (N, K/2) uint8, float16
// scale and uint8 zero (N, K/G); xsum (M, K/G) float32 is the input summed over each group.
static at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                              const at::Tensor& zero, const at::Tensor& xsum) {
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), groups = scale.size(1);
    const int64_t G = K / groups, H = G / 2;
    at::Tensor y = at::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const float* xs = xsum.data_ptr<float>();
    const uint8_t* pp = packed.data_ptr<uint8_t>();
    const at::Half* sp = scale.data_ptr<at::Half>();
    const uint8_t* zp = zero.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
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
    return y;
}

TORCH_LIBRARY(chatglm_ft_cpu, m) {
    m.def("int8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor", &int8_linear);
    m.def("int4_linear(Tensor x, Tensor packed, Tensor scale, Tensor zero, Tensor xsum) -> Tensor", &int4_linear);
}
