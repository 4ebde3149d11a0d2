/* A read-only walk over the pages a decode call touches, in page-table order, for tools/bench_decode.py: the
 * rate these fragmented pages are read at on this machine with no arithmetic beyond a running sum, in three
 * ways of prefetching (below).
 * Tasks run on TVM's CPU thread pool (TVMBackendParallelLaunch), like the kernels timed beside it.
 *
 * walk(batch, max_pages_per_seq, pages_per_seq, page_bytes, k_cache, v_cache, block_table, sums, prefetch)
 *   k_cache, v_cache: any dtype, page_bytes bytes per page (a multiple of 128, pages 32-byte aligned);
 *   block_table [batch, max_pages_per_seq] int32; sums [number of workers] float32: each worker's sum of what
 *   it read, taken as float32 values (written, so the reads are not optimized away; a test checks the total);
 *   prefetch: 0 leaves it to the hardware prefetcher, which stops at each page's end; 1 also asks for the next
 *   block in the walk (this page's V while reading its K, the next page's K while reading V), two cache lines
 *   per 128 bytes read, so a page's first lines are on their way before the walk reaches it; 2 asks only for
 *   the first line of each 4 KB of the next block, as the walk reaches the same offset of its own block: that
 *   one request starts the hardware's stream prefetcher on the 4 KB, which then fetches the rest without
 *   holding an L1 miss buffer per line (on a Zen 3 EPYC 0.95-1.13x the plain walk, median 1.04x).
 */
#include <immintrin.h>
#include <stdint.h>

#include "tvm_thread_pool.h"

typedef struct {
  int batch, max_pages, pages;
  long page_bytes;
  const char *k, *v;
  const int32_t *table;
  float *sums;
  int prefetch;
} Args;

/* The pool page of the walk's i-th (sequence, page) pair. */
static long page_at(const Args *a, int i) { return a->table[(long)(i / a->pages) * a->max_pages + i % a->pages]; }

static int worker(int id, ParallelEnv *env, void *cdata) {
  const Args *a = (const Args *)cdata;
  int n = a->batch * a->pages;
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0; /* 4 chains: loads, not adds, set the pace */
  int end = n * (id + 1) / env->num_task;
  for (int i = n * id / env->num_task; i < end; i++) {
    long page = page_at(a, i), next = i + 1 < end ? page_at(a, i + 1) : page;
    for (int kv = 0; kv < 2; kv++) {
      const float *x = (const float *)((kv ? a->v : a->k) + page * a->page_bytes);
      const char *ahead = kv ? a->k + next * a->page_bytes : a->v + page * a->page_bytes;
      for (long j = 0; j < a->page_bytes / 4; j += 32) {
        if (a->prefetch == 1) {
          _mm_prefetch(ahead + j * 4, _MM_HINT_T0);
          _mm_prefetch(ahead + j * 4 + 64, _MM_HINT_T0);
        } else if (a->prefetch == 2 && ((j * 4) & 4095) == 0) {
          _mm_prefetch(ahead + j * 4, _MM_HINT_T0);
        }
        s0 = _mm256_add_ps(s0, _mm256_load_ps(x + j));
        s1 = _mm256_add_ps(s1, _mm256_load_ps(x + j + 8));
        s2 = _mm256_add_ps(s2, _mm256_load_ps(x + j + 16));
        s3 = _mm256_add_ps(s3, _mm256_load_ps(x + j + 24));
      }
    }
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  float lanes[8], total = 0.f;
  _mm256_storeu_ps(lanes, s);
  for (int i = 0; i < 8; i++) total += lanes[i];
  a->sums[id] = total;
  return 0;
}

int walk(int batch, int max_pages, int pages, long page_bytes, const char *k, const char *v, const int32_t *table,
         float *sums, int prefetch) {
  Args a = {batch, max_pages, pages, page_bytes, k, v, table, sums, prefetch};
  return TVMBackendParallelLaunch(worker, &a, 0);
}
