// Device code of the implicit-GEMM convolutions (launched by kernels/conv_igemm.cu).
//
// A convolution is a matrix product whose operands are gathered on the fly ("implicit GEMM"):
//
//   pass         C (rows x columns)                 reduction over       A(m, r)      B(r, n)
//   forward      y: (N*OH*OW) x C_out               (ci, kh, kw)          x gathered   w crop
//   grad_input   dx: (N*H*W) x C_in                 (co, kh, kw)          dy gathered  w crop
//   grad_weight  dw: C_out x (ci, kh, kw)           (n, oh, ow)           dy           x gathered
//
// The weight crop w[co, ci, c + kh, c + kw] (c = (K - k) / 2) is read in place through the shared
// weight's strides: nothing is sliced or copied. One thread block computes a BM x BN tile of C:
// each step it gathers a BK-deep slice of A and B into shared memory (registers first, so the
// global loads of step i + 1 are in flight while step i multiplies), multiplies the tiles, and at
// the end writes its tile through shared memory so that global stores are coalesced.
//
// Engines (the multiply of the shared-memory tiles):
//  * kWmma16: tensor cores through WMMA, 16x16x16 fragments of float16/bfloat16, float
//    accumulators; 8 warps, each 32x32 of a 128x64 tile.
//  * kWmmaTf32: the same with tf32 fragments (16x16x8) for float32 when TF32 is allowed.
//  * kFma: plain FMAs in the accumulation type (float32 without TF32, float64); 64x64 tiles, each
//    thread 4x4 outputs.
//
// A launch may hold several problems (the candidates of pyevo::population_conv2d): each has its
// own sizes, channel counts, kernel size and input, and a range of the grid's tiles; a block finds
// its problem by binary search over the problems' first tiles.
#pragma once

#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "conv_igemm.h"
#include "numeric.cuh"

namespace pyevo {
namespace cuda {
namespace conv_detail {

enum class Mode { kForward, kGradInput, kGradWeight };
enum class Engine { kFma, kWmma16, kWmmaTf32 };

template <typename T, Engine kEngine>
struct Tile;

template <typename T>
struct Tile<T, Engine::kWmma16> {
  static constexpr int BM = 128, BN = 64, BK = 32, THREADS = 256, PAD = 8;
  using SmemT = T;
};

template <>
struct Tile<float, Engine::kWmmaTf32> {
  static constexpr int BM = 128, BN = 64, BK = 32, THREADS = 256, PAD = 4;
  using SmemT = float;
};

template <typename T>
struct Tile<T, Engine::kFma> {
  static constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256, PAD = 4;
  using SmemT = acc_t<T>;
};

struct ConvParams {
  ConvShared shared;
  ConvProblem first;         // problem 0 (the only one when count == 1)
  const ConvProblem* table;  // device copy of all problems when count > 1
  int count;
  // grad_weight only: partial sums, one slab of C_out x (C_in * k * k) per split.
  void* workspace;
  int64_t split_length;
};

template <typename SmemT, typename T>
__device__ __forceinline__ SmemT to_smem(T v) {
  if constexpr (std::is_same<SmemT, T>::value) {
    return v;
  } else {
    return static_cast<SmemT>(Numeric<T>::to_acc(v));
  }
}

template <typename T, Engine kEngine, Mode kMode>
__global__ void __launch_bounds__(256) conv_igemm_kernel(const __grid_constant__ ConvParams params) {
  using Cfg = Tile<T, kEngine>;
  using SmemT = typename Cfg::SmemT;
  using Acc = acc_t<T>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, THREADS = Cfg::THREADS;
  constexpr int A_LD = BM + Cfg::PAD, B_LD = BN + Cfg::PAD, C_LD = BM + 4;
  constexpr int A_PER = BM * BK / THREADS;  // A values each thread gathers per step
  constexpr int B_PER = BN * BK / THREADS;
  constexpr int K_STEP = THREADS / BK;      // row stride of the "reduction-contiguous" mappings
  constexpr int AB_BYTES = (BK * A_LD + BK * B_LD) * static_cast<int>(sizeof(SmemT));
  constexpr int C_BYTES = BN * C_LD * static_cast<int>(sizeof(Acc));
  constexpr int SMEM_BYTES = AB_BYTES > C_BYTES ? AB_BYTES : C_BYTES;
  static_assert(THREADS % BM == 0 && THREADS % BK == 0, "tile mapping");
  static_assert(BM * BK % THREADS == 0 && BN * BK % THREADS == 0, "tile mapping");

  __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
  SmemT* As = reinterpret_cast<SmemT*>(smem);  // [BK][A_LD]: A(m, r) at r * A_LD + m
  SmemT* Bs = As + BK * A_LD;                  // [BK][B_LD]: B(r, n) at r * B_LD + n
  Acc* Cs = reinterpret_cast<Acc*>(smem);      // [BN][C_LD]: C(m, n) at n * C_LD + m (epilogue)

  const int tid = threadIdx.x;

  // ---- the problem and tile of this block
  const ConvProblem* problem = &params.first;
  int64_t tile = blockIdx.x;
  if (params.count > 1) {
    int lo = 0, hi = params.count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (params.table[mid].tile_begin <= tile) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    problem = params.table + lo;
  }
  const ConvProblem& p = *problem;
  tile -= p.tile_begin;
  const int64_t m0 = (tile / p.tiles_n) * BM;
  const int n0 = static_cast<int>(tile % p.tiles_n) * BN;

  const int k = p.kernel_size, kk2 = k * k, pad = k / 2, c0 = p.crop_offset;
  const int H = p.height, W = p.width, OH = p.out_height, OW = p.out_width;
  const int stride = params.shared.stride;
  const T* __restrict__ x = static_cast<const T*>(p.input);
  const T* __restrict__ dy = static_cast<const T*>(p.grad_output);
  const T* __restrict__ w = static_cast<const T*>(params.shared.weight);
  const int64_t xs0 = p.input_stride[0], xs1 = p.input_stride[1], xs2 = p.input_stride[2],
                xs3 = p.input_stride[3];
  const int64_t gs0 = p.grad_output_stride[0], gs1 = p.grad_output_stride[1],
                gs2 = p.grad_output_stride[2], gs3 = p.grad_output_stride[3];
  const int64_t ws0 = params.shared.weight_stride[0], ws1 = params.shared.weight_stride[1],
                ws2 = params.shared.weight_stride[2], ws3 = params.shared.weight_stride[3];

  // ---- GEMM sizes and the reduction range
  int64_t Mg, Kbegin = 0, Kend;
  int Ng;
  if constexpr (kMode == Mode::kForward) {
    Mg = static_cast<int64_t>(p.batch) * OH * OW;
    Ng = p.out_channels;
    Kend = static_cast<int64_t>(p.in_channels) * kk2;
  } else if constexpr (kMode == Mode::kGradInput) {
    Mg = static_cast<int64_t>(p.batch) * H * W;
    Ng = p.in_channels;
    Kend = static_cast<int64_t>(p.out_channels) * kk2;
  } else {
    Mg = p.out_channels;
    Ng = p.in_channels * kk2;
    const int64_t reduction = static_cast<int64_t>(p.batch) * OH * OW;
    Kbegin = static_cast<int64_t>(blockIdx.y) * params.split_length;
    Kend = Kbegin + params.split_length < reduction ? Kbegin + params.split_length : reduction;
  }

  // ---- per-thread gather state
  // A of forward / grad_input: this thread's row m = tid % BM (fixed), reductions
  // a_r0 .. a_r0 + A_PER - 1 of each step (consecutive, so decoded incrementally).
  const int a_m = tid % BM;
  const int a_r0 = (tid / BM) * A_PER;
  // Everything "reduction-contiguous": the thread's reduction index r = tid % BK of each step,
  // rows/columns tid / BK + j * K_STEP.
  const int r_lane = tid % BK;
  const int rc0 = tid / BK;

  bool a_row_ok = false;
  int a_h0 = 0, a_w0 = 0;   // forward: oh*s - pad, ow*s - pad; grad_input: ih + pad, iw + pad
  int64_t a_base = 0;       // image offset of the row's sample
  int64_t out_base = 0;     // epilogue: offset of the row's output pixel (channel 0)
  if constexpr (kMode == Mode::kForward || kMode == Mode::kGradInput) {
    const int64_t m = m0 + a_m;
    a_row_ok = m < Mg;
    if (a_row_ok) {
      const int rows = kMode == Mode::kForward ? OH : H;
      const int cols = kMode == Mode::kForward ? OW : W;
      const int64_t plane = static_cast<int64_t>(rows) * cols;
      const int64_t n_img = m / plane;
      const int rem = static_cast<int>(m - n_img * plane);
      const int r = rem / cols, c = rem - r * cols;
      if constexpr (kMode == Mode::kForward) {
        a_h0 = r * stride - pad;
        a_w0 = c * stride - pad;
        a_base = n_img * xs0;
      } else {
        a_h0 = r + pad;
        a_w0 = c + pad;
        a_base = n_img * gs0;
      }
      out_base = n_img * Ng * plane + rem;
    }
  }
  // B of grad_weight: the thread's B_PER columns (ci, kh, kw), fixed for the whole block.
  int64_t col_offset[kMode == Mode::kGradWeight ? B_PER : 1];
  int col_dh[kMode == Mode::kGradWeight ? B_PER : 1];
  int col_dw[kMode == Mode::kGradWeight ? B_PER : 1];
  if constexpr (kMode == Mode::kGradWeight) {
#pragma unroll
    for (int j = 0; j < B_PER; ++j) {
      const int col = n0 + rc0 + j * K_STEP;
      if (col < Ng) {
        const int ci = col / kk2, rem = col - ci * kk2, kh = rem / k;
        col_offset[j] = ci * xs1;
        col_dh[j] = kh - pad;
        col_dw[j] = rem - kh * k - pad;
      } else {
        col_offset[j] = 0;
        col_dh[j] = -(1 << 30);  // never in range: the column does not exist
        col_dw[j] = 0;
      }
    }
  }

  T a_regs[A_PER];
  T b_regs[B_PER];
  const T zero = zero_value<T>();

  auto gather = [&](int64_t k0) {
    if constexpr (kMode == Mode::kForward) {
      int r = static_cast<int>(k0) + a_r0;
      int ci = r / kk2, rem = r - ci * kk2, kh = rem / k, kw = rem - kh * k;
#pragma unroll
      for (int j = 0; j < A_PER; ++j) {
        const int ih = a_h0 + kh, iw = a_w0 + kw;
        const bool ok = a_row_ok && r < Kend && ih >= 0 && ih < H && iw >= 0 && iw < W;
        a_regs[j] = ok ? x[a_base + ci * xs1 + ih * xs2 + iw * xs3] : zero;
        ++r;
        if (++kw == k) {
          kw = 0;
          if (++kh == k) {
            kh = 0;
            ++ci;
          }
        }
      }
      const int rb = static_cast<int>(k0) + r_lane;
      const bool r_ok = rb < Kend;
      int64_t w_offset = 0;
      if (r_ok) {
        const int bci = rb / kk2, brem = rb - bci * kk2, bkh = brem / k, bkw = brem - bkh * k;
        w_offset = bci * ws1 + (c0 + bkh) * ws2 + (c0 + bkw) * ws3;
      }
#pragma unroll
      for (int j = 0; j < B_PER; ++j) {
        const int co = n0 + rc0 + j * K_STEP;
        b_regs[j] = r_ok && co < Ng ? w[co * ws0 + w_offset] : zero;
      }
    } else if constexpr (kMode == Mode::kGradInput) {
      int r = static_cast<int>(k0) + a_r0;
      int co = r / kk2, rem = r - co * kk2, kh = rem / k, kw = rem - kh * k;
#pragma unroll
      for (int j = 0; j < A_PER; ++j) {
        // dx[ih] collects dy[oh] for oh * s - pad + kh == ih, i.e. oh * s == ih + pad - kh.
        const int th = a_h0 - kh, tw = a_w0 - kw;
        bool ok = a_row_ok && r < Kend && th >= 0 && tw >= 0;
        int oh = th, ow = tw;
        if (stride != 1) {
          ok = ok && th % stride == 0 && tw % stride == 0;
          oh = th / stride;
          ow = tw / stride;
        }
        ok = ok && oh < OH && ow < OW;
        a_regs[j] = ok ? dy[a_base + co * gs1 + oh * gs2 + ow * gs3] : zero;
        ++r;
        if (++kw == k) {
          kw = 0;
          if (++kh == k) {
            kh = 0;
            ++co;
          }
        }
      }
      const int rb = static_cast<int>(k0) + r_lane;
      const bool r_ok = rb < Kend;
      int64_t w_offset = 0;
      if (r_ok) {
        const int bco = rb / kk2, brem = rb - bco * kk2, bkh = brem / k, bkw = brem - bkh * k;
        w_offset = bco * ws0 + (c0 + bkh) * ws2 + (c0 + bkw) * ws3;
      }
#pragma unroll
      for (int j = 0; j < B_PER; ++j) {
        const int ci = n0 + rc0 + j * K_STEP;
        b_regs[j] = r_ok && ci < Ng ? w[w_offset + ci * ws1] : zero;
      }
    } else {
      const int64_t pix = k0 + r_lane;
      const bool p_ok = pix < Kend;
      int64_t dy_offset = 0, x_base = 0;
      int h_base = 0, w_base = 0;
      if (p_ok) {
        const int64_t plane = static_cast<int64_t>(OH) * OW;
        const int64_t n_img = pix / plane;
        const int rem = static_cast<int>(pix - n_img * plane);
        const int oh = rem / OW, ow = rem - oh * OW;
        dy_offset = n_img * gs0 + oh * gs2 + ow * gs3;
        x_base = n_img * xs0;
        h_base = oh * stride;
        w_base = ow * stride;
      }
#pragma unroll
      for (int j = 0; j < A_PER; ++j) {
        const int64_t co = m0 + rc0 + j * K_STEP;
        a_regs[j] = p_ok && co < Mg ? dy[dy_offset + co * gs1] : zero;
      }
#pragma unroll
      for (int j = 0; j < B_PER; ++j) {
        const int ih = h_base + col_dh[j], iw = w_base + col_dw[j];
        const bool ok = p_ok && ih >= 0 && ih < H && iw >= 0 && iw < W;
        b_regs[j] = ok ? x[x_base + col_offset[j] + ih * xs2 + iw * xs3] : zero;
      }
    }
  };

  auto stage = [&]() {
    if constexpr (kMode == Mode::kGradWeight) {
#pragma unroll
      for (int j = 0; j < A_PER; ++j) As[r_lane * A_LD + rc0 + j * K_STEP] = to_smem<SmemT>(a_regs[j]);
    } else {
#pragma unroll
      for (int j = 0; j < A_PER; ++j) As[(a_r0 + j) * A_LD + a_m] = to_smem<SmemT>(a_regs[j]);
    }
#pragma unroll
    for (int j = 0; j < B_PER; ++j) Bs[r_lane * B_LD + rc0 + j * K_STEP] = to_smem<SmemT>(b_regs[j]);
  };

  const int64_t steps = Kend > Kbegin ? (Kend - Kbegin + BK - 1) / BK : 0;

  if constexpr (kEngine == Engine::kFma) {
    const int tm = tid % 16, tn = tid / 16;
    Acc acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);
    }
    if (steps > 0) gather(Kbegin);
    for (int64_t s = 0; s < steps; ++s) {
      stage();
      __syncthreads();
      if (s + 1 < steps) gather(Kbegin + (s + 1) * BK);
#pragma unroll
      for (int r = 0; r < BK; ++r) {
        Acc a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[r * A_LD + tm + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[r * B_LD + tn + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(tn + 16 * j) * C_LD + tm + 16 * i] = acc[i][j];
    }
  } else {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    constexpr int WK = kEngine == Engine::kWmma16 ? 16 : 8;
    using FragA = typename std::conditional<
        kEngine == Engine::kWmma16, wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>,
        wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>>::type;
    using FragB = typename std::conditional<
        kEngine == Engine::kWmma16, wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>,
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>>::type;
    using FragC = wmma::fragment<wmma::accumulator, 16, 16, WK, float>;
    const int warp = tid / 32;
    const int wm = (warp % 4) * 32, wn = (warp / 4) * 32;
    FragC acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
    if (steps > 0) gather(Kbegin);
    for (int64_t s = 0; s < steps; ++s) {
      stage();
      __syncthreads();
      if (s + 1 < steps) gather(Kbegin + (s + 1) * BK);
#pragma unroll
      for (int kk = 0; kk < BK; kk += WK) {
        FragA a[2];
        FragB b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(a[i], As + kk * A_LD + wm + 16 * i, A_LD);
          if constexpr (kEngine == Engine::kWmmaTf32) {
#pragma unroll
            for (int e = 0; e < a[i].num_elements; ++e) a[i].x[e] = wmma::__float_to_tf32(a[i].x[e]);
          }
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::load_matrix_sync(b[j], Bs + kk * B_LD + wn + 16 * j, B_LD);
          if constexpr (kEngine == Engine::kWmmaTf32) {
#pragma unroll
            for (int e = 0; e < b[j].num_elements; ++e) b[j].x[e] = wmma::__float_to_tf32(b[j].x[e]);
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(Cs + (wn + 16 * j) * C_LD + wm + 16 * i, acc[i][j], C_LD,
                                wmma::mem_col_major);
      }
    }
#else
    __trap();  // the launcher never picks a tensor-core engine below compute capability 8.0
#endif
  }
  __syncthreads();

  // ---- epilogue: the tile from shared memory to global memory, coalesced
  if constexpr (kMode == Mode::kGradWeight) {
    Acc* workspace = static_cast<Acc*>(params.workspace) +
                     static_cast<int64_t>(blockIdx.y) * Mg * Ng;
#pragma unroll 4
    for (int e = tid; e < BM * BN; e += THREADS) {
      const int n = e % BN, m = e / BN;
      const int64_t gm = m0 + m;
      const int gn = n0 + n;
      if (gm < Mg && gn < Ng) workspace[gm * Ng + gn] = Cs[n * C_LD + m];
    }
  } else {
    if (a_row_ok) {
      T* __restrict__ out = static_cast<T*>(p.output);
      const int64_t plane = kMode == Mode::kForward ? static_cast<int64_t>(OH) * OW
                                                    : static_cast<int64_t>(H) * W;
      const T* bias = static_cast<const T*>(params.shared.bias);
      constexpr int ROW_STEP = THREADS / BM;
#pragma unroll 4
      for (int n = tid / BM; n < BN; n += ROW_STEP) {
        const int gn = n0 + n;
        if (gn >= Ng) break;
        Acc v = Cs[n * C_LD + a_m];
        if constexpr (kMode == Mode::kForward) {
          if (bias != nullptr) v += Numeric<T>::to_acc(bias[gn * params.shared.bias_stride]);
        }
        out[out_base + gn * plane] = Numeric<T>::from_acc(v);
      }
    }
  }
}

// Sums the grad_weight partials of every split in a fixed order and writes them into the crop of
// the full-shape gradient.
template <typename T>
__global__ void conv_grad_weight_reduce_kernel(const acc_t<T>* __restrict__ workspace, int splits,
                                               int64_t rows, int columns, int kernel_size,
                                               int crop_offset, T* __restrict__ grad_weight,
                                               int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
  const int64_t total = rows * columns;
  const int kk2 = kernel_size * kernel_size;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t<T> sum = 0;
    for (int s = 0; s < splits; ++s) sum += workspace[s * total + i];
    const int64_t co = i / columns;
    const int col = static_cast<int>(i - co * columns);
    const int ci = col / kk2, rem = col - ci * kk2, kh = rem / kernel_size;
    const int kw = rem - kh * kernel_size;
    grad_weight[co * s0 + ci * s1 + (crop_offset + kh) * s2 + (crop_offset + kw) * s3] =
        Numeric<T>::from_acc(sum);
  }
}

}  // namespace conv_detail
}  // namespace cuda
}  // namespace pyevo
