// Paged decode attention for CPU: one query token per row, K/V read in place through the row's block table.
//
// Registered as torch.ops.softprompt_attn.paged_decode (see server/attention/cpu.py, which builds and loads this
// file lazily). Light headers only (no <torch/extension.h>, no pybind11): the build takes seconds, not a minute.
//
// Layout (all CPU tensors; the last dimension of q, out, k_cache, v_cache must be contiguous):
//   q            [B, H, D]            queries after rotary, float32 / bfloat16 / float16
//   k_cache      [NB, BS, KVH, D]     same dtype as q; keys stored after rotary
//   v_cache      [NB, BS, KVH, D]
//   block_tables [>=B, M] int32       physical block of positions [i*BS, (i+1)*BS) of each row
//   seq_lens     [>=B] int64          context length of each row (the query is its last position)
//   out          [B, H, D]            written in place, same dtype as q
// Query head h reads KV head h / (H / KVH) (grouped-query attention).
//
// Work split: OpenMP over (row, kv_head[, split]) items. A GQA group of H / KVH query heads is handled together,
// so each K/V row comes from memory once per group (the group's heads re-read it from L1 within a chunk). Softmax
// is online over chunks of CHUNK positions (fp32 state), so no buffer grows with the context. Scores are computed
// 8 positions at a time with a transpose-and-add reduction, the P.V accumulator stays in registers for a chunk;
// bfloat16 / float16 rows are converted to fp32 per chunk. When there are few rows (fewer items than about 4 per thread) a row's context is
// split into pieces computed in parallel and merged afterwards (split-K, "flash decoding").

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int CHUNK = 128;  // positions scored per online-softmax step (a multiple of 8)
constexpr int MAX_DV = 32;  // head_dim <= 256

// 8 floats; GCC/Clang vector extensions give AVX/AVX-512 (ymm) code under -march=native and plain SSE/NEON pairs
// elsewhere, without intrinsics.
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned load/store
typedef int32_t i8 __attribute__((vector_size(32)));

#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, i8{__VA_ARGS__})
#endif

inline v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store8(float* p, v8 x) { *reinterpret_cast<v8u*>(p) = x; }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline v8 iota8(int base) {
  const i8 i = i8{0, 1, 2, 3, 4, 5, 6, 7} + base;
  return __builtin_convertvector(i, v8);
}

// Lane j of the result is the sum of the 8 lanes of a[j] (a transpose-and-add tree: 14 shuffles, 7 adds).
inline v8 hsum8x8(const v8* a) {
  const v8 b0 = SHUF(a[0], a[1], 0, 8, 2, 10, 4, 12, 6, 14) + SHUF(a[0], a[1], 1, 9, 3, 11, 5, 13, 7, 15);
  const v8 b1 = SHUF(a[2], a[3], 0, 8, 2, 10, 4, 12, 6, 14) + SHUF(a[2], a[3], 1, 9, 3, 11, 5, 13, 7, 15);
  const v8 b2 = SHUF(a[4], a[5], 0, 8, 2, 10, 4, 12, 6, 14) + SHUF(a[4], a[5], 1, 9, 3, 11, 5, 13, 7, 15);
  const v8 b3 = SHUF(a[6], a[7], 0, 8, 2, 10, 4, 12, 6, 14) + SHUF(a[6], a[7], 1, 9, 3, 11, 5, 13, 7, 15);
  const v8 c0 = SHUF(b0, b1, 0, 1, 8, 9, 4, 5, 12, 13) + SHUF(b0, b1, 2, 3, 10, 11, 6, 7, 14, 15);
  const v8 c1 = SHUF(b2, b3, 0, 1, 8, 9, 4, 5, 12, 13) + SHUF(b2, b3, 2, 3, 10, 11, 6, 7, 14, 15);
  return SHUF(c0, c1, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(c0, c1, 4, 5, 6, 7, 12, 13, 14, 15);
}

inline float hsum(v8 x) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += x[i];
  return s;
}

// exp(x) for x <= 0 (softmax after subtracting the running max), 8 lanes. Cephes-style 2^n * p(r) with
// r = x - n ln2; relative error < 2e-7. x < -87 gives ~1e-38 instead of 0: harmless next to a sum >= 1.
inline v8 exp_nonpos8(v8 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 0.0f ? splat(0.0f) : x;
  v8 fx = x * 1.44269504088896341f;
  fx = (fx + 12582912.0f) - 12582912.0f;  // round to nearest (|fx| < 2^22)
  const v8 r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  v8 y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const i8 e = (__builtin_convertvector(fx, i8) + 127) << 23;
  return y * __builtin_bit_cast(v8, e);
}

struct Args {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int32_t* bt;
  const int64_t* seq;
  int64_t B, H, KVH, D, BS, G;
  int64_t q_s0, q_s1, o_s0, o_s1;         // strides of q / out over (row, head)
  int64_t c_s0, c_s1, c_s2;               // strides of the caches over (block, offset, kv head)
  int64_t bt_s0;
  float scale;
  int splits;                             // context pieces per row (1: write out directly)
  int threads;                            // OpenMP threads (torch's intra-op setting)
};

// Per-thread buffers.
struct Scratch {
  std::vector<float> buf;
  std::vector<const float*> rows;  // kf [CHUNK], vf [CHUNK]
  float *q, *s, *acc, *m, *l, *alpha, *kconv, *vconv;
  Scratch(int64_t G, int64_t D, bool convert)
      : buf(static_cast<size_t>(G * D * 2 + G * CHUNK + 3 * G + (convert ? 2 * CHUNK * D : 0))), rows(2 * CHUNK) {
    q = buf.data();
    acc = q + G * D;
    s = acc + G * D;
    m = s + G * CHUNK;
    l = m + G;
    alpha = l + G;
    kconv = alpha + G;
    vconv = kconv + (convert ? CHUNK * D : 0);
  }
};

// One (row, kv_head, piece) item over positions [p0, p1). Leaves the unnormalised fp32 state: acc [G, D],
// running max m [G] and sum l [G]. DV = head_dim / 8 (0: read it from a.D).
template <typename T, int DV>
void attend_piece(const Args& a, int64_t b, int64_t g, int64_t p0, int64_t p1, float* acc, float* m, float* l,
                  Scratch& w) {
  const int dv = DV > 0 ? DV : static_cast<int>(a.D / 8);
  const int D = dv * 8;
  const int G = static_cast<int>(a.G);
  const T* q = static_cast<const T*>(a.q);
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  const int32_t* table = a.bt + b * a.bt_s0;
  const float** kf = w.rows.data();
  const float** vf = kf + CHUNK;
  for (int gi = 0; gi < G; ++gi) {
    const T* qh = q + b * a.q_s0 + (g * G + gi) * a.q_s1;
    for (int d = 0; d < D; ++d) w.q[gi * D + d] = static_cast<float>(qh[d]) * a.scale;
    m[gi] = -std::numeric_limits<float>::infinity();
    l[gi] = 0.0f;
    for (int d = 0; d < D; ++d) acc[gi * D + d] = 0.0f;
  }
  for (int64_t c0 = p0; c0 < p1; c0 += CHUNK) {
    const int n = static_cast<int>(std::min<int64_t>(CHUNK, p1 - c0));
    for (int t = 0; t < n; ++t) {  // this chunk's K/V rows, through the block table
      const int64_t p = c0 + t;
      const int64_t off = static_cast<int64_t>(table[p / a.BS]) * a.c_s0 + (p % a.BS) * a.c_s1 + g * a.c_s2;
      if constexpr (std::is_same_v<T, float>) {
        kf[t] = kc + off;
        vf[t] = vc + off;
      } else {
        float* kd = w.kconv + t * D;
        float* vd = w.vconv + t * D;
        for (int d = 0; d < D; ++d) kd[d] = static_cast<float>(kc[off + d]);
        for (int d = 0; d < D; ++d) vd[d] = static_cast<float>(vc[off + d]);
        kf[t] = kd;
        vf[t] = vd;
      }
    }
    // Scores s[gi, t] = q_gi . k_t (q pre-scaled), 8 positions at a time; lanes past n repeat row n-1.
    for (int gi = 0; gi < G; ++gi) {
      v8 qv[DV > 0 ? DV : MAX_DV];
      for (int c = 0; c < dv; ++c) qv[c] = load8(w.q + gi * D + 8 * c);
      for (int t0 = 0; t0 < n; t0 += 8) {
        v8 part[8];
        for (int j = 0; j < 8; ++j) {
          const float* kr = kf[std::min(t0 + j, n - 1)];
          v8 s0 = qv[0] * load8(kr), s1 = splat(0.0f);
          for (int c = 1; c + 1 < dv; c += 2) {
            s1 += qv[c] * load8(kr + 8 * c);
            s0 += qv[c + 1] * load8(kr + 8 * c + 8);
          }
          if (dv % 2 == 0) s1 += qv[dv - 1] * load8(kr + 8 * (dv - 1));
          part[j] = s0 + s1;
        }
        store8(w.s + gi * CHUNK + t0, hsum8x8(part));
      }
    }
    // Online softmax: new max, probabilities (0 past n), state rescaled once per chunk.
    for (int gi = 0; gi < G; ++gi) {
      float* sg = w.s + gi * CHUNK;
      const v8 ninf = splat(-std::numeric_limits<float>::infinity());
      v8 mx = ninf;
      for (int t0 = 0; t0 < n; t0 += 8) {
        const v8 x = iota8(t0) < static_cast<float>(n) ? load8(sg + t0) : ninf;
        mx = x > mx ? x : mx;
      }
      float cmax = m[gi];
      for (int i = 0; i < 8; ++i) cmax = std::max(cmax, mx[i]);
      w.alpha[gi] = std::exp(m[gi] - cmax);  // 0 on the first chunk (m = -inf)
      v8 sum = splat(0.0f);
      for (int t0 = 0; t0 < n; t0 += 8) {
        v8 e = exp_nonpos8(load8(sg + t0) - cmax);
        e = iota8(t0) < static_cast<float>(n) ? e : splat(0.0f);
        store8(sg + t0, e);
        sum += e;
      }
      l[gi] = l[gi] * w.alpha[gi] + hsum(sum);
      m[gi] = cmax;
    }
    // acc[gi] = alpha * acc[gi] + sum_t p[gi, t] * v_t, the accumulator in registers for the chunk.
    for (int gi = 0; gi < G; ++gi) {
      const float* sg = w.s + gi * CHUNK;
      float* ag = acc + gi * D;
      v8 av[DV > 0 ? DV : MAX_DV];
      const v8 al = splat(w.alpha[gi]);
      for (int c = 0; c < dv; ++c) av[c] = load8(ag + 8 * c) * al;
      for (int t = 0; t < n; ++t) {
        const v8 p = splat(sg[t]);
        const float* vr = vf[t];
        for (int c = 0; c < dv; ++c) av[c] += p * load8(vr + 8 * c);
      }
      for (int c = 0; c < dv; ++c) store8(ag + 8 * c, av[c]);
    }
  }
}

template <typename T, int DV>
void run(const Args& a) {
  const int64_t G = a.G, D = a.D;
  const int64_t items = a.B * a.KVH * a.splits;
  // Merge buffers for split-K: per item acc [G, D] + m [G] + l [G].
  std::vector<float> part;
  if (a.splits > 1) part.resize(static_cast<size_t>(items * G * (D + 2)));
#pragma omp parallel num_threads(a.threads)
  {
    Scratch w(G, D, !std::is_same_v<T, float>);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t piece = it % a.splits;
      const int64_t g = (it / a.splits) % a.KVH;
      const int64_t b = it / (a.splits * a.KVH);
      const int64_t len = a.seq[b];
      const int64_t step = (len + a.splits - 1) / a.splits;
      const int64_t p0 = std::min(len, piece * step), p1 = std::min(len, p0 + step);
      float* acc = w.acc;
      float* m = w.m;
      float* l = w.l;
      if (a.splits > 1) {
        acc = part.data() + it * G * (D + 2);
        m = acc + G * D;
        l = m + G;
      }
      attend_piece<T, DV>(a, b, g, p0, p1, acc, m, l, w);
      if (a.splits == 1) {
        T* out = static_cast<T*>(a.out);
        for (int64_t gi = 0; gi < G; ++gi) {
          T* oh = out + b * a.o_s0 + (g * G + gi) * a.o_s1;
          const float inv = 1.0f / l[gi];
          for (int64_t d = 0; d < D; ++d) oh[d] = static_cast<T>(acc[gi * D + d] * inv);
        }
      }
    }
    if (a.splits > 1) {
#pragma omp for schedule(static)
      for (int64_t bg = 0; bg < a.B * a.KVH; ++bg) {  // merge the pieces of (row, kv head) bg
        const int64_t b = bg / a.KVH, g = bg % a.KVH;
        T* out = static_cast<T*>(a.out);
        for (int64_t gi = 0; gi < G; ++gi) {
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t sp = 0; sp < a.splits; ++sp) {
            const float* base = part.data() + (bg * a.splits + sp) * G * (D + 2);
            mx = std::max(mx, base[G * D + gi]);
          }
          float* o = w.acc;  // D floats of this thread's scratch
          for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
          float denom = 0.0f;
          for (int64_t sp = 0; sp < a.splits; ++sp) {
            const float* base = part.data() + (bg * a.splits + sp) * G * (D + 2);
            const float w8 = base[G * D + G + gi] > 0.0f ? std::exp(base[G * D + gi] - mx) : 0.0f;
            denom += w8 * base[G * D + G + gi];
            for (int64_t d = 0; d < D; ++d) o[d] += w8 * base[gi * D + d];
          }
          T* oh = out + b * a.o_s0 + (g * G + gi) * a.o_s1;
          const float inv = 1.0f / denom;
          for (int64_t d = 0; d < D; ++d) oh[d] = static_cast<T>(o[d] * inv);
        }
      }
    }
  }
}

template <typename T>
void dispatch_d(const Args& a) {
  switch (a.D) {
    case 64: return run<T, 8>(a);
    case 128: return run<T, 16>(a);
    default: return run<T, 0>(a);
  }
}

void paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, const at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "paged_decode: q/out must be [B, H, D] and caches [NB, BS, KVH, D]");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  out.device().is_cpu() && block_tables.device().is_cpu() && seq_lens.device().is_cpu(),
              "paged_decode: CPU tensors only");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "paged_decode: dtype ", dt,
              " not supported");
  TORCH_CHECK(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt && out.scalar_type() == dt,
              "paged_decode: q, caches and out must share one dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2, "paged_decode: block_tables int32 [R, M]");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.dim() == 1 && seq_lens.is_contiguous(),
              "paged_decode: seq_lens contiguous int64 [R]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "paged_decode: k_cache and v_cache must have one shape and layout");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(out.sizes() == q.sizes(), "paged_decode: out must have q's shape");
  TORCH_CHECK(k_cache.size(3) == D, "paged_decode: head_dim of q and caches differ");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "paged_decode: num_heads ", H, " not a multiple of num_kv_heads ", KVH);
  TORCH_CHECK(D % 8 == 0 && D <= 8 * MAX_DV, "paged_decode: head_dim ", D, " must be a multiple of 8, <= ",
              8 * MAX_DV);
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(3) == 1,
              "paged_decode: the head_dim axis must be contiguous");
  TORCH_CHECK(block_tables.size(0) >= B && seq_lens.size(0) >= B, "paged_decode: fewer block tables than rows");
  TORCH_CHECK(block_tables.stride(1) == 1, "paged_decode: block_tables rows must be contiguous");
  if (B == 0) return;
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t* seq = seq_lens.data_ptr<int64_t>();
  const int64_t M = block_tables.size(1), bt_s0 = block_tables.stride(0);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {  // nothing below reads outside the caches
    const int64_t len = seq[b];
    TORCH_CHECK(len >= 1 && len <= M * BS, "paged_decode: row ", b, " has seq_len ", len, " with ", M,
                " blocks of ", BS);
    for (int64_t i = 0; i < (len + BS - 1) / BS; ++i) {
      const int32_t blk = bt[b * bt_s0 + i];
      TORCH_CHECK(blk >= 0 && blk < NB, "paged_decode: row ", b, " block ", blk, " outside the cache of ", NB);
    }
    max_len = std::max(max_len, len);
  }

  Args a{q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), bt, seq,
         B, H, KVH, D, BS, H / KVH,
         q.stride(0), q.stride(1), out.stride(0), out.stride(1),
         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bt_s0,
         static_cast<float>(scale), 1, 1};
  // torch's thread count for this thread (as at::parallel_for does); 1 inside another parallel region.
  at::internal::lazy_init_num_threads();
  a.threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  // Split long contexts when rows x kv heads do not give every thread about 4 items; pieces stay >= 256 positions.
  const int64_t threads = a.threads;
  const int64_t base = B * KVH;
  if (base < 4 * threads) {
    const int64_t want = (4 * threads + base - 1) / base;
    a.splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, max_len / 256)));
  }
  switch (dt) {
    case at::kFloat: return dispatch_d<float>(a);
    case at::kBFloat16: return dispatch_d<c10::BFloat16>(a);
    case at::kHalf: return dispatch_d<c10::Half>(a);
    default: TORCH_CHECK(false, "unreachable");
  }
}

}  // namespace

TORCH_LIBRARY(softprompt_attn, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, float scale, "
        "Tensor(a!) out) -> ()");
  m.impl("paged_decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
}
