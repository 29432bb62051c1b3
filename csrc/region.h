// Host entry points of the CUDA extension mmkernels._C (bound in bindings.cpp).
//
// Nothing here links against libtorch: tensors arrive as device pointers (integers), sizes and
// strides in elements, and the CUDA stream as an integer. Every function checks that a CUDA device
// is usable and that each launch succeeded, and throws std::runtime_error otherwise.
#pragma once

#include <cstdint>

namespace mmkernels {

// Element types, as mmkernels/ops/_extension.py's DTYPE_CODE.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Masked region loss kinds, as mmkernels/ops/region/launch.py's _KIND_CODE.
enum LossKind : int { kMse = 0, kSmoothL1 = 1, kKl = 2 };

// feats (B, R, D) with strides (stride_fb, stride_fr, 1) -> out (B, R, D) contiguous, mask (B, R)
// uint8, source (B, R) int32 (see reference.region_mask_plan). Exactly one of lens (B,) int64 and
// valid (B, R) uint8 is non-zero; flat_cum (B*R,) int32 is needed when bert; emb (D,) may be 0.
void region_mask_forward(std::uintptr_t feats, std::int64_t stride_fb, std::int64_t stride_fr,
                         std::uintptr_t out, std::uintptr_t lens, std::uintptr_t valid,
                         std::int64_t stride_vb, std::int64_t stride_vr, std::uintptr_t flat_cum,
                         std::uintptr_t emb, std::uintptr_t mask, std::uintptr_t source,
                         std::int64_t batch, std::int64_t regions, std::int64_t dim, int dtype,
                         std::int64_t seed0, std::int64_t key_select, std::int64_t key_action,
                         std::int64_t key_source, std::int64_t select_below, std::int64_t min_masked,
                         std::int64_t mask_below, std::int64_t random_below, bool bert, int device,
                         std::uintptr_t stream);

// grad_out (B, R, D) with strides (stride_gb, stride_gr, 1) -> grad_in (B, R, D) contiguous and,
// when emb_partial is non-zero, emb_partial (B, D) float32: per sample, the sum of the masked rows'
// gradient. When bert, the gradient of each randomly replaced row is added to the row it copied.
void region_mask_backward(std::uintptr_t grad_out, std::int64_t stride_gb, std::int64_t stride_gr,
                          std::uintptr_t source, std::uintptr_t grad_in, std::uintptr_t emb_partial,
                          std::int64_t batch, std::int64_t regions, std::int64_t dim, int dtype,
                          bool bert, int device, std::uintptr_t stream);

// pred, target (B, R, K) with (b, r) strides, mask (B, R) uint8 -> loss (B, R) float32 and, for
// kind kKl, stats (B, R, 2) float32 = (log-sum-exp of pred, sum of target) per region.
void masked_region_loss_forward(std::uintptr_t pred, std::int64_t stride_pb, std::int64_t stride_pr,
                                std::uintptr_t target, std::int64_t stride_tb, std::int64_t stride_tr,
                                std::uintptr_t mask, std::int64_t stride_mb, std::int64_t stride_mr,
                                std::uintptr_t loss, std::uintptr_t stats, std::int64_t batch,
                                std::int64_t regions, std::int64_t dim, int dtype, int kind,
                                double beta, int device, std::uintptr_t stream);

// grad_loss (B, R) float32 with strides (stride_gb, stride_gr), any of them 0 -> grad_pred and,
// when non-zero, grad_target, both (B, R, K) contiguous.
void masked_region_loss_backward(std::uintptr_t grad_loss, std::int64_t stride_gb,
                                 std::int64_t stride_gr, std::uintptr_t pred, std::int64_t stride_pb,
                                 std::int64_t stride_pr, std::uintptr_t target,
                                 std::int64_t stride_tb, std::int64_t stride_tr, std::uintptr_t mask,
                                 std::int64_t stride_mb, std::int64_t stride_mr, std::uintptr_t stats,
                                 std::uintptr_t grad_pred, std::uintptr_t grad_target,
                                 std::int64_t batch, std::int64_t regions, std::int64_t dim,
                                 int dtype, int kind, double beta, int device, std::uintptr_t stream);

}  // namespace mmkernels
