// region_mask on CUDA: forward (select, then copy / replace each row once) and backward.
// The same algorithm as the Triton kernels in mmkernels/ops/region/kernels.py, documented there and in
// reference.region_mask_plan; the random numbers are identical bit for bit.
#include "region.h"
#include "region_common.cuh"

namespace mmkernels {
namespace {

constexpr int kThreads = 128;  // threads per block; also the regions decided per step
constexpr int kUnroll = 4;     // rows in flight per thread

struct RegionFwdParams {
  const char* feats;
  int64_t stride_fb, stride_fr;
  char* out;
  const int64_t* lens;
  const uint8_t* valid;
  int64_t stride_vb, stride_vr;
  const int32_t* flat_cum;
  const char* emb;
  uint8_t* mask;
  int32_t* source;
  int regions, dim, n_rows;
  uint32_t seed0, key_select, key_action, key_source;
  int64_t select_below;
  int min_masked;
  int32_t mask_below, random_below;
  bool bert;
};

__device__ __forceinline__ bool region_exists(const RegionFwdParams& p, int b, int r) {
  if (r >= p.regions) return false;
  if (p.lens != nullptr) {
    int64_t n = p.lens[b];
    return r < n;  // r >= 0, so a negative length selects nothing; n > R is clamped by r < R
  }
  return p.valid[b * p.stride_vb + r * p.stride_vr] != 0;
}

// Block-wide minimum of a 64-bit key; every thread gets the result.
__device__ uint64_t block_min(uint64_t key, uint64_t* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    uint64_t other = __shfl_xor_sync(0xffffffffu, key, offset);
    key = other < key ? other : key;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = key;
  __syncthreads();
  uint64_t best = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) best = scratch[w] < best ? scratch[w] : best;
  return best;
}

// The min_masked cut of sample b as the key (u << 32 | r): regions with key <= cut are selected on
// top of u < select_below. -1 when the draw already selected min(min_masked, n_existing) regions.
__device__ int64_t min_masked_cut(const RegionFwdParams& p, int b, uint64_t* scratch) {
  int n_existing = 0, n_drawn = 0;
  for (int r0 = 0; r0 < p.regions; r0 += kThreads) {
    const int r = r0 + threadIdx.x;
    const bool exists = region_exists(p, b, r);
    const int32_t u = exists ? region_random(p.seed0, p.key_select, b, r) : 0;
    n_existing += __syncthreads_count(exists);
    n_drawn += __syncthreads_count(exists && u < p.select_below);
  }
  const int need = min(n_existing, p.min_masked);
  int64_t cut = -1;
  if (n_drawn >= need) return cut;
  for (int i = 0; i < need; ++i) {  // the need-th smallest key among the existing regions
    uint64_t best = ~0ull;
    for (int r0 = 0; r0 < p.regions; r0 += kThreads) {
      const int r = r0 + threadIdx.x;
      uint64_t key = ~0ull;
      if (region_exists(p, b, r)) {
        const uint64_t k = (static_cast<uint64_t>(region_random(p.seed0, p.key_select, b, r)) << 32) |
                           static_cast<uint32_t>(r);
        if (static_cast<int64_t>(k) > cut) key = k;
      }
      const uint64_t chunk_best = block_min(key, scratch);
      best = chunk_best < best ? chunk_best : best;
    }
    cut = static_cast<int64_t>(best);
  }
  return cut;
}

// The existing region (flat index) that a random replacement of row `flat` copies.
__device__ int random_source(const RegionFwdParams& p, int flat, int32_t total, int32_t w) {
  const int32_t self_rank = p.flat_cum[flat] - 1;
  int32_t k = static_cast<int32_t>((static_cast<int64_t>(w) * (total - 1)) >> 31);
  if (k >= self_rank) k += 1;
  int lo = 0, hi = p.n_rows - 1;  // the smallest i with flat_cum[i] > k
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (p.flat_cum[mid] <= k)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

struct RowPlan {
  int32_t source;  // its own flat index when the row passes through, -1 when masked, else the copy
  bool selected;
};

__device__ RowPlan plan_row(const RegionFwdParams& p, int b, int r, int64_t cut, int32_t total) {
  const int flat = b * p.regions + r;
  if (!region_exists(p, b, r)) return {flat, false};
  const int32_t u = region_random(p.seed0, p.key_select, b, r);
  const int64_t key = (static_cast<int64_t>(u) << 32) | r;
  if (!(u < p.select_below || key <= cut)) return {flat, false};
  if (!p.bert) return {-1, true};
  const int32_t v = region_random(p.seed0, p.key_action, b, r);
  if (v < p.mask_below) return {-1, true};
  if (v >= p.random_below || total <= 1) return {flat, true};  // kept
  return {random_source(p, flat, total, region_random(p.seed0, p.key_source, b, r)), true};
}

// The forward only moves bytes: V is one element (N = 1) or 16 bytes holding N elements.
template <typename V, int N>
__global__ void __launch_bounds__(kThreads) region_mask_fwd_kernel(RegionFwdParams p) {
  constexpr int kElemSize = sizeof(V) / N;
  __shared__ int32_t s_source[kThreads];
  __shared__ uint64_t scratch[kThreads / 32];
  const int b = blockIdx.x;
  const int64_t cut = min_masked_cut(p, b, scratch);
  const int32_t total = p.bert ? p.flat_cum[p.n_rows - 1] : 0;
  const int col = (blockIdx.y * kThreads + threadIdx.x) * N;
  const bool active = col < p.dim;
  V fill{};  // zero bytes are 0.0 in every float type
  if (p.emb != nullptr && active) fill = *reinterpret_cast<const V*>(p.emb + col * kElemSize);
  for (int r0 = 0; r0 < p.regions; r0 += kThreads) {
    const int n = min(kThreads, p.regions - r0);
    __syncthreads();  // the previous step's s_source is consumed
    if (threadIdx.x < n) {
      const int r = r0 + threadIdx.x;
      const RowPlan plan = plan_row(p, b, r, cut, total);
      s_source[threadIdx.x] = plan.source;
      if (blockIdx.y == 0) {
        p.mask[b * p.regions + r] = plan.selected;
        p.source[b * p.regions + r] = plan.source;
      }
    }
    __syncthreads();
    if (!active) continue;
    for (int j = 0; j < n; j += kUnroll) {
      V vals[kUnroll];
#pragma unroll
      for (int i = 0; i < kUnroll; ++i) {
        if (j + i < n) {
          const int32_t src = s_source[j + i];
          if (src >= 0) {
            const int sb = src / p.regions, sr = src % p.regions;
            vals[i] = *reinterpret_cast<const V*>(
                p.feats + (sb * p.stride_fb + sr * p.stride_fr + col) * kElemSize);
          } else {
            vals[i] = fill;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kUnroll; ++i) {
        if (j + i < n) {
          const int64_t row = static_cast<int64_t>(b) * p.regions + r0 + j + i;
          *reinterpret_cast<V*>(p.out + (row * p.dim + col) * kElemSize) = vals[i];
        }
      }
    }
  }
}

struct RegionBwdParams {
  const char* grad_out;
  int64_t stride_gb, stride_gr;
  const int32_t* source;
  char* grad_in;
  float* emb_partial;
  int regions, dim, n_rows;
};

// grad_in = grad_out on rows that pass through, 0 elsewhere; emb_partial[b] = Σ masked rows.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads) region_mask_bwd_kernel(RegionBwdParams p) {
  using V = Vec<T, N>;
  const int b = blockIdx.x;
  const int col = (blockIdx.y * kThreads + threadIdx.x) * N;
  if (col >= p.dim) return;
  float acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = 0.0f;
  const V zero = zero_vec<T, N>();
  for (int j = 0; j < p.regions; j += kUnroll) {
    V vals[kUnroll];
    int32_t src[kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int r = j + i;
      src[i] = r < p.regions ? p.source[b * p.regions + r] : -2;
      const bool kept = src[i] == b * p.regions + r;
      const bool masked = src[i] == -1 && p.emb_partial != nullptr;
      vals[i] = zero;
      if (kept || masked)
        vals[i] = *reinterpret_cast<const V*>(
            p.grad_out + (b * p.stride_gb + r * p.stride_gr + col) * sizeof(T));
    }
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int r = j + i;
      if (r >= p.regions) continue;
      const int64_t row = static_cast<int64_t>(b) * p.regions + r;
      const bool kept = src[i] == row;
      *reinterpret_cast<V*>(p.grad_in + (row * p.dim + col) * sizeof(T)) = kept ? vals[i] : zero;
      if (src[i] == -1 && p.emb_partial != nullptr) {
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] += to_float(vals[i].v[e]);
      }
    }
  }
  if (p.emb_partial != nullptr) {
#pragma unroll
    for (int e = 0; e < N; ++e) p.emb_partial[static_cast<int64_t>(b) * p.dim + col + e] = acc[e];
  }
}

// grad_in[source[row]] += grad_out[row] for every randomly replaced row: one warp per row.
template <typename T>
__global__ void region_mask_scatter_kernel(RegionBwdParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= p.n_rows) return;
  const int32_t src = p.source[row];
  if (src < 0 || src == row) return;
  const int b = static_cast<int>(row / p.regions), r = static_cast<int>(row % p.regions);
  const T* g = reinterpret_cast<const T*>(p.grad_out + (b * p.stride_gb + r * p.stride_gr) * sizeof(T));
  T* dst = reinterpret_cast<T*>(p.grad_in) + static_cast<int64_t>(src) * p.dim;
  for (int d = threadIdx.x % 32; d < p.dim; d += 32) atomicAdd(dst + d, g[d]);
}

}  // namespace

void region_mask_forward(std::uintptr_t feats, std::int64_t stride_fb, std::int64_t stride_fr,
                         std::uintptr_t out, std::uintptr_t lens, std::uintptr_t valid,
                         std::int64_t stride_vb, std::int64_t stride_vr, std::uintptr_t flat_cum,
                         std::uintptr_t emb, std::uintptr_t mask, std::uintptr_t source,
                         std::int64_t batch, std::int64_t regions, std::int64_t dim, int dtype,
                         std::int64_t seed0, std::int64_t key_select, std::int64_t key_action,
                         std::int64_t key_source, std::int64_t select_below, std::int64_t min_masked,
                         std::int64_t mask_below, std::int64_t random_below, bool bert, int device,
                         std::uintptr_t stream) {
  const DeviceGuard device_guard(device);
  check_dtype(dtype);
  if ((lens == 0) == (valid == 0))
    throw std::runtime_error("mmkernels._C.region_mask_forward: pass exactly one of lens and valid");
  if (bert && flat_cum == 0)
    throw std::runtime_error("mmkernels._C.region_mask_forward: bert needs flat_cum");
  if (batch == 0 || regions == 0 || dim == 0) return;
  RegionFwdParams p;
  p.feats = reinterpret_cast<const char*>(feats);
  p.stride_fb = stride_fb;
  p.stride_fr = stride_fr;
  p.out = reinterpret_cast<char*>(out);
  p.lens = reinterpret_cast<const int64_t*>(lens);
  p.valid = reinterpret_cast<const uint8_t*>(valid);
  p.stride_vb = stride_vb;
  p.stride_vr = stride_vr;
  p.flat_cum = reinterpret_cast<const int32_t*>(flat_cum);
  p.emb = reinterpret_cast<const char*>(emb);
  p.mask = reinterpret_cast<uint8_t*>(mask);
  p.source = reinterpret_cast<int32_t*>(source);
  p.regions = static_cast<int>(regions);
  p.dim = static_cast<int>(dim);
  p.n_rows = static_cast<int>(batch * regions);
  p.seed0 = static_cast<uint32_t>(seed0);
  p.key_select = static_cast<uint32_t>(key_select);
  p.key_action = static_cast<uint32_t>(key_action);
  p.key_source = static_cast<uint32_t>(key_source);
  p.select_below = select_below;
  p.min_masked = static_cast<int>(min_masked);
  p.mask_below = static_cast<int32_t>(mask_below);
  p.random_below = static_cast<int32_t>(random_below);
  p.bert = bert;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const int64_t esize = elem_size(dtype);
  const bool vec = dim * esize % 16 == 0 &&
                   aligned16({feats, out, emb}, {stride_fb, stride_fr}, esize);
  const int n = vec ? static_cast<int>(16 / esize) : 1;
  const dim3 grid(static_cast<unsigned>(batch),
                  static_cast<unsigned>((dim + kThreads * n - 1) / (kThreads * n)));
  if (vec && esize == 2)
    region_mask_fwd_kernel<uint4, 8><<<grid, kThreads, 0, cuda_stream>>>(p);
  else if (vec)
    region_mask_fwd_kernel<uint4, 4><<<grid, kThreads, 0, cuda_stream>>>(p);
  else if (esize == 2)
    region_mask_fwd_kernel<uint16_t, 1><<<grid, kThreads, 0, cuda_stream>>>(p);
  else
    region_mask_fwd_kernel<uint32_t, 1><<<grid, kThreads, 0, cuda_stream>>>(p);
  check_launch("region_mask_fwd_kernel");
}

void region_mask_backward(std::uintptr_t grad_out, std::int64_t stride_gb, std::int64_t stride_gr,
                          std::uintptr_t source, std::uintptr_t grad_in, std::uintptr_t emb_partial,
                          std::int64_t batch, std::int64_t regions, std::int64_t dim, int dtype,
                          bool bert, int device, std::uintptr_t stream) {
  const DeviceGuard device_guard(device);
  check_dtype(dtype);
  if (batch == 0 || regions == 0 || dim == 0) return;
  RegionBwdParams p;
  p.grad_out = reinterpret_cast<const char*>(grad_out);
  p.stride_gb = stride_gb;
  p.stride_gr = stride_gr;
  p.source = reinterpret_cast<const int32_t*>(source);
  p.grad_in = reinterpret_cast<char*>(grad_in);
  p.emb_partial = reinterpret_cast<float*>(emb_partial);
  p.regions = static_cast<int>(regions);
  p.dim = static_cast<int>(dim);
  p.n_rows = static_cast<int>(batch * regions);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const int64_t esize = elem_size(dtype);
  const bool vec = dim * esize % 16 == 0 && aligned16({grad_out, grad_in}, {stride_gb, stride_gr}, esize);
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int kVec = 16 / sizeof(T);
    const int n = vec ? kVec : 1;
    const dim3 grid(static_cast<unsigned>(batch),
                    static_cast<unsigned>((dim + kThreads * n - 1) / (kThreads * n)));
    if (vec)
      region_mask_bwd_kernel<T, kVec><<<grid, kThreads, 0, cuda_stream>>>(p);
    else
      region_mask_bwd_kernel<T, 1><<<grid, kThreads, 0, cuda_stream>>>(p);
    check_launch("region_mask_bwd_kernel");
    if (bert) {
      constexpr int kRowsPerBlock = 8;
      const unsigned blocks = static_cast<unsigned>((p.n_rows + kRowsPerBlock - 1) / kRowsPerBlock);
      region_mask_scatter_kernel<T><<<blocks, kRowsPerBlock * 32, 0, cuda_stream>>>(p);
      check_launch("region_mask_scatter_kernel");
    }
  });
}

}  // namespace mmkernels
