/* A hand-written AVX2 paged decode for the benchmark's configuration only (32 query heads, 8 KV heads, head_dim
 * 128, page 16), used by tools/bench_decode.py as a ceiling for this CPU: how fast the same algorithm runs when
 * every instruction is chosen by hand instead of generated from TensorIR. Built twice: float16 K/V (F16C
 * widening; the default) and float32 K/V (-DKV_F32).
 *
 * Same structure as tvm_paged's CPU decode (tvm_paged/kernels/decode_cpu.py), so a gap between the two is code
 * generation, not algorithm: tasks over (sequence, KV split); in each page, tokens outer and KV heads inner;
 * q.k with the group's 4 query heads as 4 FMA chains on each K vector and a horizontal-add tree per 4 scores;
 * an online softmax rescaled once per page with a polynomial exp2; P.V with a 4 heads x 16 dims accumulator
 * tile in registers across the page; this page's V prefetched during q.k, the next page's K during P.V: for
 * float16 in one block of lines per P.V tile (the kernel's prefetch=v+k), for float32 one line per token of
 * each tile (its prefetch=v+k/token, the faster of the two for float32 on Zen 3, whose prefetches hold L1 miss
 * buffers until their lines arrive).
 *
 * Tasks run on TVM's own CPU thread pool (TVMBackendParallelLaunch, the C ABI its generated code calls), so
 * the hand kernel and tvm_paged's kernel share the same worker threads when they are timed in one process.
 *
 * decode(B, NS, q, k_cache, v_cache, block_table, max_pages_per_seq, seq_lens, o_part, lse_part, scale)
 *   q [B, 32, 128], k_cache, v_cache [num_pages, 16, 8, 128]: float16 (float32 with KV_F32); block_table
 *   [B, max_pages] int32; seq_lens [B] int32 >= 1; o_part [B, NS, 32, 128] float32 and lse_part [B, NS, 32]
 *   float32 (log2 domain) are written: the caller merges the splits.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define HQ 32
#define HKV 8
#define G (HQ / HKV)
#define D 128
#define S 16
#define ROW (HKV * D) /* elements per token row of a page */

#include "tvm_thread_pool.h"

#ifdef KV_F32
typedef float elem_t;
static inline __m256 load8(const elem_t *p) { return _mm256_loadu_ps(p); }
#else
typedef uint16_t elem_t; /* float16 bits */
static inline __m256 load8(const elem_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#endif
#define LINE_ELEMS (64 / (int)sizeof(elem_t))
#define K_LINES_PER_TILE (S * ROW / LINE_ELEMS / (HKV * D / 16)) /* the next page's K lines per P.V tile */
#ifdef KV_F32
_Static_assert(K_LINES_PER_TILE == S, "float32 P.V asks for one next-K line per token of a tile");
#endif

typedef struct {
  int B, NS, max_pages;
  const elem_t *q, *k, *v;
  const int32_t *table, *lens;
  float *o_part, *lse_part, scale;
} Args;

static inline __m256 exp2_ps(__m256 x) { /* 2^x for x <= 0, relative error ~2e-7 */
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
  __m256 i = _mm256_floor_ps(x), f = _mm256_sub_ps(x, i);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) { /* lane r = horizontal sum of input r */
  __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
}

static void run_task(const Args *a, int task) {
  int b = task / a->NS, s = task % a->NS, len = a->lens[b];
  int n_pages = (len + S - 1) / S, chunk = (n_pages + a->NS - 1) / a->NS;
  int p0 = s * chunk < n_pages ? s * chunk : n_pages, p1 = p0 + chunk < n_pages ? p0 + chunk : n_pages;
  float q[HQ * D] __attribute__((aligned(32))), acc[HQ * D] __attribute__((aligned(32)));
  float sc[S * HQ] __attribute__((aligned(32))), m[HQ] __attribute__((aligned(32)));
  float l[HQ] __attribute__((aligned(32))), alpha[HQ] __attribute__((aligned(32)));
  const __m256 qs = _mm256_set1_ps(a->scale * 1.4426950408889634f); /* scores in the log2 domain */
  for (int i = 0; i < HQ * D; i += 8) _mm256_store_ps(q + i, _mm256_mul_ps(load8(a->q + (long)b * HQ * D + i), qs));
  memset(acc, 0, sizeof acc);
  for (int h = 0; h < HQ; h++) m[h] = -INFINITY, l[h] = 0.f;
  const int32_t *row = a->table + (long)b * a->max_pages;
  for (int pi = p0; pi < p1; pi++) {
    int n = len - pi * S < S ? len - pi * S : S;
    const elem_t *kp = a->k + (long)row[pi] * S * ROW, *vp = a->v + (long)row[pi] * S * ROW;
    const char *k_next = (const char *)(a->k + (long)row[pi + 1 < p1 ? pi + 1 : pi] * S * ROW);
    for (int t = 0; t < n; t++)
      for (int h = 0; h < HKV; h++) {
        const elem_t *kr = kp + t * ROW + h * D;
        const float *qh = q + h * G * D;
        for (int c = 0; c < D * (int)sizeof(elem_t); c += 64)
          _mm_prefetch((const char *)(vp + t * ROW + h * D) + c, _MM_HINT_T1);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 16
        for (int c = 0; c < D; c += 8) {
          __m256 kv = load8(kr + c);
          a0 = _mm256_fmadd_ps(_mm256_load_ps(qh + c), kv, a0);
          a1 = _mm256_fmadd_ps(_mm256_load_ps(qh + D + c), kv, a1);
          a2 = _mm256_fmadd_ps(_mm256_load_ps(qh + 2 * D + c), kv, a2);
          a3 = _mm256_fmadd_ps(_mm256_load_ps(qh + 3 * D + c), kv, a3);
        }
        _mm_store_ps(sc + t * HQ + h * G, sum4(a0, a1, a2, a3));
      }
    for (int h = 0; h < HQ; h += 8) { /* online softmax, one rescale per page */
      __m256 m_old = _mm256_load_ps(m + h), m_new = m_old;
      for (int t = 0; t < n; t++) m_new = _mm256_max_ps(m_new, _mm256_load_ps(sc + t * HQ + h));
      __m256 al = exp2_ps(_mm256_sub_ps(m_old, m_new)), sum = _mm256_mul_ps(_mm256_load_ps(l + h), al);
      for (int t = 0; t < n; t++) {
        __m256 e = exp2_ps(_mm256_sub_ps(_mm256_load_ps(sc + t * HQ + h), m_new));
        _mm256_store_ps(sc + t * HQ + h, e);
        sum = _mm256_add_ps(sum, e);
      }
      _mm256_store_ps(alpha + h, al), _mm256_store_ps(m + h, m_new), _mm256_store_ps(l + h, sum);
    }
    int tile = 0; /* 64 P.V tiles per page; each asks for its share of the next page's K */
    for (int h = 0; h < HKV; h++)
      for (int d = 0; d < D; d += 16, tile++) {
        const char *k_tile = k_next + tile * K_LINES_PER_TILE * 64;
#ifndef KV_F32
        if (pi + 1 < p1)
          for (int c = 0; c < K_LINES_PER_TILE; c++) _mm_prefetch(k_tile + c * 64, _MM_HINT_T1);
#endif
        float *ac = acc + h * G * D + d;
        const float *al = alpha + h * G;
        __m256 o[G][2];
        for (int g = 0; g < G; g++)
          for (int j = 0; j < 2; j++) o[g][j] = _mm256_mul_ps(_mm256_load_ps(ac + g * D + 8 * j), _mm256_broadcast_ss(al + g));
        const elem_t *vr = vp + h * D + d;
        const float *w = sc + h * G;
        for (int t = 0; t < n; t++) {
#ifdef KV_F32
          if (pi + 1 < p1) _mm_prefetch(k_tile + t * 64, _MM_HINT_T1); /* 16 lines, one per token */
#endif
          __m256 v0 = load8(vr + t * ROW), v1 = load8(vr + t * ROW + 8);
          for (int g = 0; g < G; g++) {
            __m256 p = _mm256_broadcast_ss(w + t * HQ + g);
            o[g][0] = _mm256_fmadd_ps(p, v0, o[g][0]);
            o[g][1] = _mm256_fmadd_ps(p, v1, o[g][1]);
          }
        }
        for (int g = 0; g < G; g++)
          for (int j = 0; j < 2; j++) _mm256_store_ps(ac + g * D + 8 * j, o[g][j]);
      }
  }
  for (int h = 0; h < HQ; h++) {
    long r = ((long)b * a->NS + s) * HQ + h;
    float *o = a->o_part + r * D;
    a->lse_part[r] = l[h] > 0.f ? m[h] + log2f(l[h]) : -INFINITY;
    for (int d = 0; d < D; d++) o[d] = l[h] > 0.f ? acc[h * D + d] / l[h] : 0.f;
  }
}

static int worker(int id, ParallelEnv *env, void *cdata) {
  const Args *a = (const Args *)cdata;
  int tasks = a->B * a->NS;
  for (int t = tasks * id / env->num_task; t < tasks * (id + 1) / env->num_task; t++) run_task(a, t);
  return 0;
}

int decode(int B, int NS, const elem_t *q, const elem_t *k, const elem_t *v, const int32_t *table,
           int max_pages, const int32_t *lens, float *o_part, float *lse_part, float scale) {
  Args a = {B, NS, max_pages, q, k, v, table, lens, o_part, lse_part, scale};
  return TVMBackendParallelLaunch(worker, &a, 0); /* 0: every worker of the pool */
}
