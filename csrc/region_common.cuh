// What the region kernels share: element types, vectors and error checks (the RNG and the loss
// math, which need no CUDA, are in region_math.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "region_math.h"

namespace mmkernels {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N elements moved as one load/store: 16 bytes when N = 16 / sizeof(T), one element when N = 1.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> zero_vec() {
  Vec<T, N> z;
#pragma unroll
  for (int i = 0; i < N; ++i) z.v[i] = from_float<T>(0.0f);
  return z;
}

// Whether every pointer is 16-byte aligned and every stride keeps rows 16-byte aligned.
inline bool aligned16(std::initializer_list<std::uintptr_t> ptrs,
                      std::initializer_list<std::int64_t> strides, std::int64_t elem_size) {
  for (auto p : ptrs)
    if (p % 16 != 0) return false;
  for (auto s : strides)
    if ((s * elem_size) % 16 != 0) return false;
  return true;
}

inline std::int64_t elem_size(int dtype) { return dtype == 0 ? 4 : 2; }

// Makes `device` current for the guard's lifetime and restores the caller's device after it, or
// throws a clear error when no CUDA device (or driver) is usable.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
      std::string why = err != cudaSuccess ? cudaGetErrorString(err) : "no device found";
      cudaGetLastError();
      throw std::runtime_error("mmkernels._C: no usable CUDA device (cudaGetDeviceCount: " + why +
                               "); the CUDA kernels need an NVIDIA GPU and its driver");
    }
    if (device < 0 || device >= count)
      throw std::runtime_error("mmkernels._C: device " + std::to_string(device) +
                               " out of range [0, " + std::to_string(count) + ")");
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  static void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("mmkernels._C: ") + what + " failed: " +
                               cudaGetErrorString(err));
  }
  int previous_ = 0;
};

inline void check_launch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("mmkernels._C: launching ") + kernel +
                             " failed: " + cudaGetErrorString(err));
}

inline void check_dtype(int dtype) {
  if (dtype < 0 || dtype > 2)
    throw std::runtime_error("mmkernels._C: unsupported dtype code " + std::to_string(dtype));
}

// Calls f(T{}) with T the element type of `dtype`.
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  check_dtype(dtype);
  if (dtype == 0)
    f(float{});
  else if (dtype == 1)
    f(__half{});
  else
    f(__nv_bfloat16{});
}

}  // namespace mmkernels
