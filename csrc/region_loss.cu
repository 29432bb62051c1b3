// masked_region_loss on CUDA: one warp per region, forward and backward. Rows that are not
// selected are never read: the forward writes their loss as 0, the backward their gradient as 0.
// The per-element math (region_math.h) is that of the Triton kernels in
// mmkernels/ops/region/kernels.py and of reference.masked_region_loss, for any target.
#include <cmath>

#include "region.h"
#include "region_common.cuh"

namespace mmkernels {
namespace {

constexpr int kWarpsPerBlock = 8;

struct LossParams {
  const char* pred;
  int64_t stride_pb, stride_pr;
  const char* target;
  int64_t stride_tb, stride_tr;
  const uint8_t* mask;
  int64_t stride_mb, stride_mr;
  float* loss;
  float* stats;
  const float* grad_loss;
  int64_t stride_gb, stride_gr;
  char* grad_pred;
  char* grad_target;
  int regions, dim, n_rows, kind;
  float beta;
};

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// This warp's region b·R + r, in 64 bits: a block's rows may pass 2^31 - 1, and the (B, R, 2)
// stats are indexed by 2·row.
__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
}

__device__ __forceinline__ bool row_selected(const LossParams& p, int b, int r) {
  return p.mask[b * p.stride_mb + r * p.stride_mr] != 0;
}

template <typename T, int N>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) masked_region_loss_fwd_kernel(LossParams p) {
  using V = Vec<T, N>;
  const int64_t row = warp_row();
  const int lane = threadIdx.x % 32;
  if (row >= p.n_rows) return;
  const int b = static_cast<int>(row / p.regions), r = static_cast<int>(row % p.regions);
  if (!row_selected(p, b, r)) {
    if (lane == 0) {
      p.loss[row] = 0.0f;
      if (p.kind == kKl) {
        p.stats[2 * row] = 0.0f;
        p.stats[2 * row + 1] = 0.0f;
      }
    }
    return;
  }
  const V* pred = reinterpret_cast<const V*>(p.pred + (b * p.stride_pb + r * p.stride_pr) * sizeof(T));
  const V* target =
      reinterpret_cast<const V*>(p.target + (b * p.stride_tb + r * p.stride_tr) * sizeof(T));
  float acc = 0.0f;
  KlState kl;
  for (int i = lane; i < p.dim / N; i += 32) {
    const V pv = pred[i], tv = target[i];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float x = to_float(pv.v[e]), t = to_float(tv.v[e]);
      if (p.kind == kKl)
        kl.add(x, t);
      else
        acc += feature_loss(p.kind, x - t, p.beta);
    }
  }
  if (p.kind != kKl) {
    acc = warp_sum(acc);
    if (lane == 0) p.loss[row] = acc / p.dim;
    return;
  }
  // butterfly: every lane ends with the whole row (tests/csrc/region_math_check.cpp replays it)
  for (int offset = 16; offset > 0; offset >>= 1) {
    KlState o;
    o.m = __shfl_xor_sync(0xffffffffu, kl.m, offset);
    o.s = __shfl_xor_sync(0xffffffffu, kl.s, offset);
    o.tp = __shfl_xor_sync(0xffffffffu, kl.tp, offset);
    o.ts = __shfl_xor_sync(0xffffffffu, kl.ts, offset);
    o.tlt = __shfl_xor_sync(0xffffffffu, kl.tlt, offset);
    kl.merge(o);
  }
  if (lane == 0) {
    p.loss[row] = kl.loss();
    p.stats[2 * row] = kl.lse();
    p.stats[2 * row + 1] = kl.ts;
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) masked_region_loss_bwd_kernel(LossParams p) {
  using V = Vec<T, N>;
  const int64_t row = warp_row();
  const int lane = threadIdx.x % 32;
  if (row >= p.n_rows) return;
  const int b = static_cast<int>(row / p.regions), r = static_cast<int>(row % p.regions);
  V* grad_pred = reinterpret_cast<V*>(p.grad_pred + row * p.dim * sizeof(T));
  V* grad_target = p.grad_target == nullptr
                       ? nullptr
                       : reinterpret_cast<V*>(p.grad_target + row * p.dim * sizeof(T));
  if (!row_selected(p, b, r)) {
    const V zero = zero_vec<T, N>();
    for (int i = lane; i < p.dim / N; i += 32) {
      grad_pred[i] = zero;
      if (grad_target != nullptr) grad_target[i] = zero;
    }
    return;
  }
  const float g = p.grad_loss[b * p.stride_gb + r * p.stride_gr];
  const float lse = p.kind == kKl ? p.stats[2 * row] : 0.0f;
  const float t_sum = p.kind == kKl ? p.stats[2 * row + 1] : 0.0f;
  const V* pred = reinterpret_cast<const V*>(p.pred + (b * p.stride_pb + r * p.stride_pr) * sizeof(T));
  const V* target =
      reinterpret_cast<const V*>(p.target + (b * p.stride_tb + r * p.stride_tr) * sizeof(T));
  const float scale = g / p.dim;
  for (int i = lane; i < p.dim / N; i += 32) {
    const V pv = pred[i], tv = target[i];
    V gp, gt;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float x = to_float(pv.v[e]), t = to_float(tv.v[e]);
      float dp, dt;
      if (p.kind == kKl) {
        dp = kl_pred_grad(x, t, lse, t_sum, g);
        dt = kl_target_grad(x, t, lse, g);
      } else {
        dp = feature_loss_slope(p.kind, x - t, p.beta) * scale;
        dt = -dp;
      }
      gp.v[e] = from_float<T>(dp);
      gt.v[e] = from_float<T>(dt);
    }
    grad_pred[i] = gp;
    if (grad_target != nullptr) grad_target[i] = gt;
  }
}

LossParams make_params(std::uintptr_t pred, std::int64_t stride_pb, std::int64_t stride_pr,
                       std::uintptr_t target, std::int64_t stride_tb, std::int64_t stride_tr,
                       std::uintptr_t mask, std::int64_t stride_mb, std::int64_t stride_mr,
                       std::int64_t batch, std::int64_t regions, std::int64_t dim, int kind,
                       double beta) {
  if (kind < 0 || kind > 2)
    throw std::runtime_error("mmkernels._C: unsupported loss kind code " + std::to_string(kind));
  LossParams p{};
  p.pred = reinterpret_cast<const char*>(pred);
  p.stride_pb = stride_pb;
  p.stride_pr = stride_pr;
  p.target = reinterpret_cast<const char*>(target);
  p.stride_tb = stride_tb;
  p.stride_tr = stride_tr;
  p.mask = reinterpret_cast<const uint8_t*>(mask);
  p.stride_mb = stride_mb;
  p.stride_mr = stride_mr;
  p.regions = static_cast<int>(regions);
  p.dim = static_cast<int>(dim);
  p.n_rows = static_cast<int>(batch * regions);
  p.kind = kind;
  p.beta = static_cast<float>(beta);
  return p;
}

template <template <typename, int> class Kernel>
void launch_rows(const LossParams& p, int dtype, bool vec, cudaStream_t stream, const char* name) {
  const unsigned blocks = static_cast<unsigned>((p.n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int kVec = 16 / sizeof(T);
    if (vec)
      Kernel<T, kVec>::launch(blocks, stream, p);
    else
      Kernel<T, 1>::launch(blocks, stream, p);
  });
  check_launch(name);
}

template <typename T, int N>
struct FwdKernel {
  static void launch(unsigned blocks, cudaStream_t stream, const LossParams& p) {
    masked_region_loss_fwd_kernel<T, N><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(p);
  }
};

template <typename T, int N>
struct BwdKernel {
  static void launch(unsigned blocks, cudaStream_t stream, const LossParams& p) {
    masked_region_loss_bwd_kernel<T, N><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(p);
  }
};

}  // namespace

void masked_region_loss_forward(std::uintptr_t pred, std::int64_t stride_pb, std::int64_t stride_pr,
                                std::uintptr_t target, std::int64_t stride_tb, std::int64_t stride_tr,
                                std::uintptr_t mask, std::int64_t stride_mb, std::int64_t stride_mr,
                                std::uintptr_t loss, std::uintptr_t stats, std::int64_t batch,
                                std::int64_t regions, std::int64_t dim, int dtype, int kind,
                                double beta, int device, std::uintptr_t stream) {
  const DeviceGuard device_guard(device);
  check_dtype(dtype);
  LossParams p = make_params(pred, stride_pb, stride_pr, target, stride_tb, stride_tr, mask,
                             stride_mb, stride_mr, batch, regions, dim, kind, beta);
  if (kind == kKl && stats == 0)
    throw std::runtime_error("mmkernels._C.masked_region_loss_forward: kind kl needs stats");
  if (p.n_rows == 0 || dim == 0) return;
  p.loss = reinterpret_cast<float*>(loss);
  p.stats = reinterpret_cast<float*>(stats);
  const int64_t esize = elem_size(dtype);
  const bool vec = dim * esize % 16 == 0 &&
                   aligned16({pred, target}, {stride_pb, stride_pr, stride_tb, stride_tr}, esize);
  launch_rows<FwdKernel>(p, dtype, vec, reinterpret_cast<cudaStream_t>(stream),
                         "masked_region_loss_fwd_kernel");
}

void masked_region_loss_backward(std::uintptr_t grad_loss, std::int64_t stride_gb,
                                 std::int64_t stride_gr, std::uintptr_t pred, std::int64_t stride_pb,
                                 std::int64_t stride_pr, std::uintptr_t target,
                                 std::int64_t stride_tb, std::int64_t stride_tr, std::uintptr_t mask,
                                 std::int64_t stride_mb, std::int64_t stride_mr, std::uintptr_t stats,
                                 std::uintptr_t grad_pred, std::uintptr_t grad_target,
                                 std::int64_t batch, std::int64_t regions, std::int64_t dim,
                                 int dtype, int kind, double beta, int device, std::uintptr_t stream) {
  const DeviceGuard device_guard(device);
  check_dtype(dtype);
  LossParams p = make_params(pred, stride_pb, stride_pr, target, stride_tb, stride_tr, mask,
                             stride_mb, stride_mr, batch, regions, dim, kind, beta);
  if (kind == kKl && stats == 0)
    throw std::runtime_error("mmkernels._C.masked_region_loss_backward: kind kl needs stats");
  if (p.n_rows == 0 || dim == 0) return;
  p.stats = reinterpret_cast<float*>(stats);
  p.grad_loss = reinterpret_cast<const float*>(grad_loss);
  p.stride_gb = stride_gb;
  p.stride_gr = stride_gr;
  p.grad_pred = reinterpret_cast<char*>(grad_pred);
  p.grad_target = reinterpret_cast<char*>(grad_target);
  const int64_t esize = elem_size(dtype);
  const bool vec = dim * esize % 16 == 0 &&
                   aligned16({pred, target, grad_pred, grad_target},
                             {stride_pb, stride_pr, stride_tb, stride_tr}, esize);
  launch_rows<BwdKernel>(p, dtype, vec, reinterpret_cast<cudaStream_t>(stream),
                         "masked_region_loss_bwd_kernel");
}

}  // namespace mmkernels
