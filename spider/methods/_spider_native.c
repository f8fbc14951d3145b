/* SPIDER's update of one float32 tensor in three passes, for CPUs (spider/methods/_native.py
 * builds and loads this file; spider/methods/spider.py, "fused update", says what each pass
 * computes and how the sums between them are all-reduced for sharded tensors).
 *
 *   spider_accumulate: S += g (or |g|, g*g), returning sum|S| and sum S^2
 *   spider_mask:       w = where(r > 1/2, r, 0) with r = G / (I + G), returning sum w and
 *                      the count of w > 0
 *   spider_merge:      p <- theta0 + min(w * scale, 1) * (p - theta0)
 *
 * Why C: PyTorch's eager update makes ~18 passes over each tensor, each a separate call;
 * a torch.compile'd kernel costs 20-40 us of Python guards per call on a CPU. These loops
 * are what the compiler vectorises (AVX-512/AVX2 via -march=native), split over OpenMP
 * threads (PyTorch's own OpenMP runtime, already loaded), called through ctypes.
 *
 * G = sigmoid(x), I = sigmoid(y) give r = G / (I + G) = (1 + e^-y) / (2 + e^-x + e^-y):
 * two exponentials and one division per entry. expf below is Cephes' polynomial (about
 * 1 ulp), written without calls so that it vectorises. Sums are taken in float over blocks
 * of 1024 entries and added in double; each thread's partial sums are combined in thread
 * order, so results do not depend on timing.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <omp.h>

#define BLOCK 1024
#define MAX_THREADS 256
#define SERIAL_BELOW 32768 /* entries: below this one thread is faster than waking others */

static inline float exp_approx(float x) {
    const float hi = 88.72f, lo = -87.0f;
    float xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    /* n = round(xc / ln 2), by the 1.5 * 2^23 trick: plain arithmetic vectorises where a
     * call to rintf in a masked lane does not (|n| < 2^22 always holds here) */
    const float round_magic = 12582912.0f;
    float n = (xc * 1.44269504088896341f + round_magic) - round_magic;
    float r = fmaf(n, -0.693359375f, xc);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p * r, r, r) + 1.0f;
    union { int32_t i; float f; } half_scale; /* 2^(n-1): n reaches 128 at the top */
    half_scale.i = ((int32_t)n + 126) << 23;
    float y = (p * half_scale.f) * 2.0f;
    y = x > hi ? INFINITY : y;
    y = x < lo ? 0.0f : y; /* below float32's normals; only ever added to >= 1 below */
    return x != x ? x : y;
}

static void span(int64_t n, int threads, int t, int64_t *begin, int64_t *end) {
    int64_t per = ((n + threads - 1) / threads + 15) & ~(int64_t)15;
    int64_t b = per * t, e = b + per;
    *begin = b < n ? b : n;
    *end = e < n ? e : n;
}

static int team(int64_t n, int threads) {
    if (n < SERIAL_BELOW || threads < 1) return 1;
    return threads > MAX_THREADS ? MAX_THREADS : threads;
}

static void combine(const double *parts, int threads, double *out) {
    out[0] = out[1] = 0.0;
    for (int t = 0; t < threads; t++) {
        out[0] += parts[2 * t];
        out[1] += parts[2 * t + 1];
    }
}

/* mode 0: S += g, 1: S += |g|, 2: S += g*g; g NULL: sums only */
static inline void accumulate_span(float *s, const float *g, int64_t b, int64_t e, int mode,
                                   double *sum_abs, double *sum_sq) {
    double a = 0.0, q = 0.0;
    for (int64_t i0 = b; i0 < e; i0 += BLOCK) {
        int64_t i1 = i0 + BLOCK < e ? i0 + BLOCK : e;
        float fa = 0.0f, fq = 0.0f;
        if (g == NULL) {
#pragma omp simd reduction(+ : fa, fq)
            for (int64_t i = i0; i < i1; i++) {
                fa += fabsf(s[i]);
                fq += s[i] * s[i];
            }
        } else if (mode == 0) {
#pragma omp simd reduction(+ : fa, fq)
            for (int64_t i = i0; i < i1; i++) {
                float v = s[i] + g[i];
                s[i] = v;
                fa += fabsf(v);
                fq += v * v;
            }
        } else if (mode == 1) {
#pragma omp simd reduction(+ : fa, fq)
            for (int64_t i = i0; i < i1; i++) {
                float v = s[i] + fabsf(g[i]);
                s[i] = v;
                fa += fabsf(v);
                fq += v * v;
            }
        } else {
#pragma omp simd reduction(+ : fa, fq)
            for (int64_t i = i0; i < i1; i++) {
                float v = s[i] + g[i] * g[i];
                s[i] = v;
                fa += fabsf(v);
                fq += v * v;
            }
        }
        a += fa;
        q += fq;
    }
    *sum_abs = a;
    *sum_sq = q;
}

void spider_accumulate(float *s, const float *g, int64_t n, int mode, int threads,
                       double *out) {
    double parts[2 * MAX_THREADS];
    int nt = team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), used = omp_get_num_threads();
        int64_t b, e;
        span(n, used, t, &b, &e);
        accumulate_span(s, g, b, e, mode, &parts[2 * t], &parts[2 * t + 1]);
        if (t == 0) nt = used;
    }
    combine(parts, nt, out);
}

static inline void mask_span(const float *s, const float *theta0, int64_t b, int64_t e,
                             float ga, float gb, float ia, float ib, int binary, float *w,
                             double *total, double *count) {
    const float keep = binary ? 0.0f : 1.0f, flat = binary ? 1.0f : 0.0f;
    double t_all = 0.0, c_all = 0.0;
    for (int64_t i0 = b; i0 < e; i0 += BLOCK) {
        int64_t i1 = i0 + BLOCK < e ? i0 + BLOCK : e;
        float ft = 0.0f, fc = 0.0f;
#pragma omp simd reduction(+ : ft, fc)
        for (int64_t i = i0; i < i1; i++) {
            float u = exp_approx(-(fabsf(s[i]) * ga + gb));      /* G = 1 / (1 + u) */
            float v = exp_approx(-(fabsf(theta0[i]) * ia + ib)); /* I = 1 / (1 + v) */
            float r = (1.0f + v) / ((2.0f + u) + v);
            /* r > 1/2 exactly where G > I; a NaN r (both ranks 0) is not: w = 0 there */
            float on = r > 0.5f ? 1.0f : 0.0f;
            float x = r > 0.5f ? keep * r + flat : 0.0f;
            w[i] = x;
            ft += x;
            fc += on;
        }
        t_all += ft;
        c_all += fc;
    }
    *total = t_all;
    *count = c_all;
}

/* G = sigmoid(ga |S| + gb), I = sigmoid(ia |theta0| + ib) */
void spider_mask(const float *s, const float *theta0, int64_t n, float ga, float gb, float ia,
                 float ib, int binary, float *w, int threads, double *out) {
    double parts[2 * MAX_THREADS];
    int nt = team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), used = omp_get_num_threads();
        int64_t b, e;
        span(n, used, t, &b, &e);
        mask_span(s, theta0, b, e, ga, gb, ia, ib, binary, w, &parts[2 * t], &parts[2 * t + 1]);
        if (t == 0) nt = used;
    }
    combine(parts, nt, out);
}

/* p <- theta0 + min(w * scale, 1) * (p - theta0) */
void spider_merge(float *p, const float *theta0, const float *w, int64_t n, float scale,
                  int threads) {
    int nt = team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), used = omp_get_num_threads();
        int64_t b, e;
        span(n, used, t, &b, &e);
#pragma omp simd
        for (int64_t i = b; i < e; i++) {
            float k = w[i] * scale;
            k = k < 1.0f ? k : 1.0f;
            p[i] = theta0[i] + k * (p[i] - theta0[i]);
        }
    }
}
