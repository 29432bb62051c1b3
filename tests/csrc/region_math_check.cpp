// Runs the CUDA kernels' numerics (csrc/region_math.h) on the CPU, as the kernels drive them, so that
// tests/ops/test_region_cuda_ext.py can check them against the float64 reference without a GPU:
// the hash bit for bit, and masked_region_loss's forward (32 lanes striding over a row in vectors
// of `vec` elements, then the warp's xor butterfly) and backward, one region per row.
// Built by the test with the host C++ compiler: c++ -std=c++17 -O2 -shared -fPIC -I csrc.
#include <cstdint>

#include "region_math.h"

namespace {

constexpr int kLanes = 32;

using mmkernels::KlState;

}  // namespace

extern "C" {

void region_random_batch(uint32_t seed0, uint32_t key, const int64_t* b, const int64_t* r, int64_t n,
                         int32_t* out) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = mmkernels::region_random(seed0, key, static_cast<uint32_t>(b[i]), static_cast<uint32_t>(r[i]));
}

// pred, target: (n_rows, dim) float32; loss: (n_rows,); stats: (n_rows, 2) (written for kind kl).
// vec must divide dim, as the kernel's vector path requires.
void loss_forward_rows(const float* pred, const float* target, int64_t n_rows, int64_t dim, int kind,
                       float beta, int vec, float* loss, float* stats) {
  for (int64_t row = 0; row < n_rows; ++row) {
    const float* p = pred + row * dim;
    const float* t = target + row * dim;
    float acc[kLanes] = {};
    KlState kl[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int64_t i = lane; i < dim / vec; i += kLanes) {
        for (int e = 0; e < vec; ++e) {
          const int64_t k = i * vec + e;
          if (kind == mmkernels::kKl)
            kl[lane].add(p[k], t[k]);
          else
            acc[lane] += mmkernels::feature_loss(kind, p[k] - t[k], beta);
        }
      }
    }
    for (int offset = kLanes / 2; offset > 0; offset >>= 1) {
      float acc_next[kLanes];
      KlState kl_next[kLanes];
      for (int lane = 0; lane < kLanes; ++lane) {
        acc_next[lane] = acc[lane] + acc[lane ^ offset];
        kl_next[lane] = kl[lane];
        kl_next[lane].merge(kl[lane ^ offset]);
      }
      for (int lane = 0; lane < kLanes; ++lane) {
        acc[lane] = acc_next[lane];
        kl[lane] = kl_next[lane];
      }
    }
    if (kind == mmkernels::kKl) {
      loss[row] = kl[0].loss();
      stats[2 * row] = kl[0].lse();
      stats[2 * row + 1] = kl[0].ts;
    } else {
      loss[row] = acc[0] / static_cast<float>(dim);
    }
  }
}

// grad_loss: (n_rows,); stats as loss_forward_rows wrote them; grad_pred, grad_target: (n_rows, dim).
void loss_backward_rows(const float* grad_loss, const float* pred, const float* target, const float* stats,
                        int64_t n_rows, int64_t dim, int kind, float beta, float* grad_pred,
                        float* grad_target) {
  for (int64_t row = 0; row < n_rows; ++row) {
    const float g = grad_loss[row];
    const float scale = g / static_cast<float>(dim);
    for (int64_t k = 0; k < dim; ++k) {
      const float x = pred[row * dim + k], t = target[row * dim + k];
      float dp, dt;
      if (kind == mmkernels::kKl) {
        dp = mmkernels::kl_pred_grad(x, t, stats[2 * row], stats[2 * row + 1], g);
        dt = mmkernels::kl_target_grad(x, t, stats[2 * row], g);
      } else {
        dp = mmkernels::feature_loss_slope(kind, x - t, beta) * scale;
        dt = -dp;
      }
      grad_pred[row * dim + k] = dp;
      grad_target[row * dim + k] = dt;
    }
  }
}

}  // extern "C"
