// The numerics of the region kernels that do not depend on CUDA: the counter-based RNG of
// region_mask and the per-element math of masked_region_loss. Under nvcc every function is
// __host__ __device__; elsewhere it is plain C++, so that tests/csrc/region_math_check.cpp runs this
// very code on the CPU against the float64 reference (tests/ops/test_region_cuda_ext.py), no GPU needed.
#pragma once

#include <cmath>
#include <cstdint>

#include "region.h"

#if defined(__CUDACC__)
#define MMK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMK_HOST_DEVICE inline
#endif

namespace mmkernels {

// murmur3's fmix32 finalizer; region_random must equal mmkernels/ops/region/reference.py's bit for bit.
MMK_HOST_DEVICE uint32_t mix_u32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// A 31-bit random number for region r of sample b in the stream whose key is `key`.
MMK_HOST_DEVICE int32_t region_random(uint32_t seed0, uint32_t key, uint32_t b, uint32_t r) {
  uint32_t x = mix_u32(b ^ seed0);
  x = mix_u32(x ^ r);
  x = mix_u32(x ^ key);
  return static_cast<int32_t>(x >> 1);
}

// mse / smooth_l1 of one element, d = pred - target (averaged over K by the caller).
MMK_HOST_DEVICE float feature_loss(int kind, float d, float beta) {
  if (kind == kMse) return d * d;
  const float ad = fabsf(d);
  return ad < beta ? 0.5f * d * d / beta : ad - 0.5f * beta;
}

// d feature_loss / d pred, as PyTorch's backward gives it (a NaN d gives NaN, except for
// smooth_l1 with beta = 0, which is l1 and gives 0 there, as torch does).
MMK_HOST_DEVICE float feature_loss_slope(int kind, float d, float beta) {
  if (kind == kMse) return 2.0f * d;
  if (d < -beta) return -1.0f;
  if (d > beta) return 1.0f;
  return beta > 0.0f ? d / beta : 0.0f;
}

// Running statistics of one region's KL(target || softmax(pred)) over the elements seen so far.
// The loss is Σ_k where(t_k == 0, 0, t_k·(log t_k - log_softmax(p)_k)) for any target: a negative
// t_k gives NaN (log of a negative number), a zero t_k adds exactly 0 even where p_k = -inf.
//   m   the largest p seen (-inf while none is above -inf; NaN p are left out of it by fmaxf, and
//       reach the result through s),
//   s   Σ exp(p - ref), tp = Σ_{t != 0} t·(p - ref), ts = Σ t, tlt = Σ_{t != 0} t·log t,
// with ref = m, or 0 while m is -inf (every term is then 0 or infinite, so the reference point
// does not matter). KL = tlt - tp + ts·log s (the last term 0 when ts is 0).
struct KlState {
  float m = -INFINITY, s = 0.0f, tp = 0.0f, ts = 0.0f, tlt = 0.0f;

  MMK_HOST_DEVICE float ref() const { return m == -INFINITY ? 0.0f : m; }

  // Re-express s and tp relative to a new max m_new >= m.
  MMK_HOST_DEVICE void rebase(float m_new) {
    if (m_new == m) return;
    if (m != -INFINITY) {
      const float shift = m_new - m;
      s *= expf(-shift);
      if (ts != 0.0f) tp -= ts * shift;
    }
    m = m_new;
  }

  MMK_HOST_DEVICE void add(float p, float t) {
    rebase(fmaxf(m, p));
    const float r = ref();
    s += expf(p - r);
    if (t != 0.0f) {
      tp += t * (p - r);
      tlt += t * logf(t);
    }
    ts += t;
  }

  MMK_HOST_DEVICE void merge(KlState o) {
    const float m_new = fmaxf(m, o.m);
    rebase(m_new);
    o.rebase(m_new);
    s += o.s;
    tp += o.tp;
    ts += o.ts;
    tlt += o.tlt;
  }

  // log-sum-exp of pred, kept for the backward.
  MMK_HOST_DEVICE float lse() const { return ref() + logf(s); }

  MMK_HOST_DEVICE float loss() const { return tlt - tp + (ts != 0.0f ? ts * logf(s) : 0.0f); }
};

// The gradients of one element of a region's KL, with g the gradient of the region's loss,
// lse and t_sum the forward's KlState::lse() and ts:
//   d / d pred = (Σ t)·softmax(pred) - t;  d / d target = log t + 1 - log softmax(pred), 0 where t = 0.
MMK_HOST_DEVICE float kl_pred_grad(float p, float t, float lse, float t_sum, float g) {
  return (t_sum * expf(p - lse) - t) * g;
}

MMK_HOST_DEVICE float kl_target_grad(float p, float t, float lse, float g) {
  return t != 0.0f ? (logf(t) + 1.0f - (p - lse)) * g : 0.0f;
}

}  // namespace mmkernels
