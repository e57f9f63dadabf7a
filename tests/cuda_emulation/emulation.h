// A host emulation of the CUDA features pyevo's kernels use, so that the real device code in
// kernels/ can be compiled with g++ and run on a CPU (tests/test_cuda_emulation.py). It checks
// the kernels' indexing, tiling, masking, reductions and use of the WMMA API; it says nothing of
// their speed, and it is no substitute for running them on a GPU.
//
// How: force-included (g++ -include) before the kernel sources, with PYEVO_HOST_EMULATION set.
//  * A launch runs the grid's blocks one after another with one std::thread per CUDA thread;
//    __syncthreads is a std::barrier over the block, __syncwarp and the shuffles a barrier over the
//    warp. Blocks must be 1-D (every pyevo kernel is).
//  * __shared__ variables become function statics: one copy, shared by the block's threads, reused
//    by the next block (blocks run one at a time). Dynamic shared memory is one buffer, filled with
//    NaN bytes before every block so a read of an unwritten element shows.
//  * WMMA fragments hold the whole 16x16 tile in every lane (the API's semantics, not the
//    hardware's register layout); store_matrix_sync writes from lane 0 only, so a missing
//    __syncwarp/__syncthreads after it shows up as a wrong result.
#pragma once

#ifndef PYEVO_HOST_EMULATION
#error "emulation.h is for host emulation builds (define PYEVO_HOST_EMULATION)"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __grid_constant__
#define __grid_constant__
#define __launch_bounds__(...)

namespace pyevo_emulation {

struct BlockContext {
  std::barrier<>* block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>>* warp_barriers;
  uint64_t* shuffle_slots;  // 32 per warp
};

inline thread_local uint3 thread_index;
inline thread_local uint3 block_index;
inline dim3 block_dim;
inline dim3 grid_dim;
inline thread_local BlockContext* context = nullptr;
inline std::vector<unsigned char> dynamic_shared;

inline unsigned char* dynamic_smem() {
  return dynamic_shared.data();
}

inline void sync_block() { context->block_barrier->arrive_and_wait(); }
inline void sync_warp() { (*context->warp_barriers)[thread_index.x / 32]->arrive_and_wait(); }

template <typename T>
T shuffle_from(T value, int source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a wide type");
  const int lane = thread_index.x % 32;
  uint64_t* slots = context->shuffle_slots + (thread_index.x / 32) * 32;
  std::memcpy(&slots[lane], &value, sizeof(T));
  sync_warp();
  T result;
  std::memcpy(&result, &slots[source_lane], sizeof(T));
  sync_warp();
  return result;
}

// Runs kernel(args...) over the grid. Returns cudaSuccess (errors abort).
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1 || threads == 0 || threads > 1024) std::abort();
  block_dim = block;
  grid_dim = grid;
  dynamic_shared.assign(shared_bytes + 128, 0xff);
  std::barrier<> block_barrier(threads);
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  for (unsigned w = 0; w * 32 < threads; ++w) {
    warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - w * 32)));
  }
  std::vector<uint64_t> slots(((threads + 31) / 32) * 32);
  BlockContext block_context{&block_barrier, &warp_barriers, slots.data()};
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t]() {
      context = &block_context;
      thread_index = make_uint3(t, 0, 0);
      for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
          for (unsigned x = 0; x < grid.x; ++x) {
            if (t == 0) std::memset(dynamic_shared.data(), 0xff, dynamic_shared.size());
            sync_block();
            block_index = make_uint3(x, y, z);
            kernel(args...);
            sync_block();
          }
        }
      }
    });
  }
  for (std::thread& thread : pool) thread.join();
  return cudaSuccess;
}

}  // namespace pyevo_emulation

#define threadIdx (::pyevo_emulation::thread_index)
#define blockIdx (::pyevo_emulation::block_index)
#define blockDim (::pyevo_emulation::block_dim)
#define gridDim (::pyevo_emulation::grid_dim)

inline void __syncthreads() { pyevo_emulation::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { pyevo_emulation::sync_warp(); }
[[noreturn]] inline void __trap() { std::abort(); }

template <typename T>
T __shfl_down_sync(unsigned, T value, unsigned delta, int = 32) {
  const int lane = pyevo_emulation::thread_index.x % 32;
  const int source = lane + static_cast<int>(delta) < 32 ? lane + static_cast<int>(delta) : lane;
  return pyevo_emulation::shuffle_from(value, source);
}
template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask, int = 32) {
  const int lane = pyevo_emulation::thread_index.x % 32;
  return pyevo_emulation::shuffle_from(value, lane ^ mask);
}
template <typename T>
T __shfl_sync(unsigned, T value, int source_lane, int = 32) {
  return pyevo_emulation::shuffle_from(value, source_lane);
}

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline float __expf(float v) { return std::exp(v); }
inline float __fdividef(float a, float b) { return a / b; }
template <typename T>
T __ldg(const T* p) {
  return *p;
}

// ---- WMMA: the API's semantics, every lane holding the whole tile.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = T;
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];  // row-major
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      const size_t index = std::is_same<Layout, row_major>::value ? static_cast<size_t>(r) * ldm + c
                                                                    : static_cast<size_t>(c) * ldm + r;
      f.x[r * F::cols + c] = p[index];
    }
  }
}

template <int M, int N, int K, typename T, typename P>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const P* p, unsigned ldm,
                      layout_t layout) {
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      const size_t index = layout == mem_row_major ? static_cast<size_t>(r) * ldm + c
                                                   : static_cast<size_t>(c) * ldm + r;
      f.x[r * N + c] = p[index];
    }
  }
}

template <int M, int N, int K, typename T, typename P>
void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                       layout_t layout) {
  if (pyevo_emulation::thread_index.x % 32 != 0) return;  // one lane writes: see the header
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      const size_t index = layout == mem_row_major ? static_cast<size_t>(r) * ldm + c
                                                   : static_cast<size_t>(c) * ldm + r;
      p[index] = f.x[r * N + c];
    }
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V value) {
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, Layout>::element_type>(value);
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b,
              const fragment<accumulator, M, N, K, TC>& c) {
  TC result[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) sum += to_float(a.x[i * K + k]) * to_float(b.x[k * N + j]);
      result[i * N + j] = sum;
    }
  }
  std::memcpy(d.x, result, sizeof(result));
}

}  // namespace wmma
}  // namespace nvcuda
