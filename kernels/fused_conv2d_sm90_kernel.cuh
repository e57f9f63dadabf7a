// The Hopper fused convolution of kernels/fused_conv2d_sm90.h, built from CUTLASS 3 / CuTe parts:
//
//  * mainloop: CUTLASS's sm90 implicit-GEMM fprop collective (TMA im2col loads of the NHWC
//    activation, tiled TMA loads of the KRSC filter, GMMA from shared memory, fp32 accumulators),
//    warp-specialized: one producer warp group, one consumer warp group, 128x128x64 tiles.
//    The GEMM view: M = output pixels (CUTLASS linearises the conv's M mode (Q, P, N), i.e. w, h,
//    image, into one index m = (n * H + h) * W + w), N = output channels, K = (C, S, R);
//  * epilogue: the TMA warp-specialized collective (TMA store of whole tiles; the "auto" epilogue
//    stores 2-byte scalars) with an epilogue visitor tree (EVT) that computes, in fp32,
//
//        D = (acc + bias[n] + temb[image(m), n] + residual[m, n]) * scale
//
//    bias:      Sm90RowBroadcast (a row vector over N), nullable;
//    temb:      PerImageRowBroadcast below: one row per image, broadcast over that image's pixels;
//    residual:  Sm90AuxLoad (TMA-loaded like a C source, whose place it takes: C is void) with a
//               flat (pixel, channel) stride, through OptionalAuxLoad below, nullable;
//    scale:     Sm90ScalarBroadcast.
//
// Why temb is its own node and not an aux load with zero strides over H and W: Sm90AuxLoad
// flattens the M mode to size(M) and needs an affine stride over the flat m, but temb's element
// for m is temb[m / (H * W), n], not affine in m. A hierarchical M stride ((W, H, N):(0, 0, ld))
// does not help either: the kernel tiles the *linearised* M (128 pixels a tile, which may straddle
// two images, or hold several when H * W < 128), which no single TMA box over a (pixel, image)
// layout covers, and CuTe's TMA builder only drops statically-zero strides. So the temb node reads
// its row for each accumulator element straight from global memory (L1/L2-resident: N x C_out
// entries), with the image index from a fast division of the element's absolute m.
//
// Device code is compiled only for sm_90a: the kernel body is guarded by __CUDA_ARCH_FEAT_SM90_ALL,
// and for any other arch it is an empty stub that the launcher never launches (it runs the kernel
// only on compute capability 9.0 devices; setup.py builds 9.0 as sm_90a).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/fast_math.h>
#include <cutlass/kernel_hardware_info.hpp>  // before the conv headers, which use it undeclared
#include <cutlass/numeric_types.h>
#include <cutlass/conv/collective/collective_builder.hpp>
#include <cutlass/conv/convnd_problem_shape.hpp>
#include <cutlass/conv/dispatch_policy.hpp>
#include <cutlass/conv/kernel/conv_universal.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>

#include "fused_conv2d_sm90.h"

namespace pyevo {
namespace cuda {
namespace fused_conv2d_sm90_detail {

namespace fusion = cutlass::epilogue::fusion;

// ---------------------------------------------------------------------------------------------
// EVT nodes of our own
// ---------------------------------------------------------------------------------------------

// The workspace half of an EVT node's host interface, for nodes that need none.
struct NoWorkspace {
  template <class ProblemShape, class Arguments>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }

  template <class ProblemShape, class Arguments>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
};

// A row vector per image, broadcast over the image's pixels: element (m, n) of the GEMM output
// reads rows[(m / pixels_per_image) * image_stride + n]. For the time embedding of a resnet's
// conv1 (temb[n_image, c]). Consumer-only: no shared memory, no producer loads.
template <class ElementInput, class ElementCompute>
struct PerImageRowBroadcast : NoWorkspace {
  struct SharedStorage {};

  struct Arguments {
    ElementInput const* rows = nullptr;  // nullptr: the node reads as zero
    int64_t image_stride = 0;            // elements between consecutive images' rows
    int pixels_per_image = 1;            // GEMM rows per image (output height * width)
  };

  struct Params {
    ElementInput const* rows = nullptr;
    int64_t image_stride = 0;
    cutlass::FastDivmod pixels_per_image{};
  };

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return {args.rows, args.image_stride, cutlass::FastDivmod(args.pixels_per_image)};
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.pixels_per_image >= 1;
  }

  CUTLASS_HOST_DEVICE PerImageRowBroadcast() {}

  CUTLASS_HOST_DEVICE PerImageRowBroadcast(Params const& params, SharedStorage const&)
      : params(params) {}

  Params params;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_zero() const { return params.rows == nullptr; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(fusion::detail::ProducerLoadArgs<Args...> const&) {
    return fusion::detail::EmptyProducerLoadCallbacks{};
  }

  // coords: this thread's accumulator coordinates (CPY, CPY_M, CPY_N, EPI_M, EPI_N), relative to
  // its first element, which sits at (m_origin, n_origin); residue: the extent left from there,
  // so a coordinate c is in bounds iff elem_less(c, residue).
  template <class CoordTensor, class Residue>
  struct ConsumerStoreCallbacks : fusion::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CoordTensor coords, Residue residue, int m_origin,
                                          int n_origin, Params const& params)
        : coords(coords), residue(residue), m_origin(m_origin), n_origin(n_origin),
          params(params) {}

    CoordTensor coords;
    Residue residue;
    int m_origin;
    int n_origin;
    Params const& params;

    template <typename ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<ElementCompute, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n) {
      cutlass::Array<ElementCompute, FragmentSize> values;
      values.fill(ElementCompute(0));
      if (params.rows == nullptr) return values;
      auto subtile_coords = coords(cute::_, cute::_, cute::_, epi_m, epi_n);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        auto coord = subtile_coords(epi_v * FragmentSize + i);
        if (cute::elem_less(coord, residue)) {
          const int image = params.pixels_per_image.div(m_origin + int(cute::get<0>(coord)));
          values[i] = ElementCompute(
              params.rows[image * params.image_stride + n_origin + int(cute::get<1>(coord))]);
        }
      }
      return values;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(
      fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    // The epilogue hands out coordinates relative to the thread's first element and the residue
    // (M, N) minus that element's absolute coordinate, so the absolute origin is (M, N) - residue.
    // M is the linearised pixel count here (the conv kernel's runtime problem shape).
    auto [M, N, K, L] = args.problem_shape_mnkl;
    const int m_origin = int(M) - int(cute::get<0>(args.residue_tCcD));
    const int n_origin = int(N) - int(cute::get<1>(args.residue_tCcD));
    return ConsumerStoreCallbacks<decltype(args.tCcD), decltype(args.residue_tCcD)>(
        args.tCcD, args.residue_tCcD, m_origin, n_origin, params);
  }
};

// Sm90AuxLoad (EnableNullptr) for the conv kernel, with a pointer that may be null (reading as
// zero then). Sm90AuxLoad encodes
// its TMA descriptor from the pointer whether or not it is used; what cuTensorMapEncodeTiled does
// with a null address is not documented, so a null residual is encoded with a placeholder
// (any 16-byte-aligned device address; nothing is read from it).
template <class AuxLoad>
struct OptionalAuxLoad : AuxLoad, NoWorkspace {
  using AuxLoad::AuxLoad;
  using AuxPointer = decltype(typename AuxLoad::Arguments{}.ptr_aux);

  struct Arguments {
    typename AuxLoad::Arguments aux;     // aux.ptr_aux nullptr: the node reads as zero
    void const* placeholder = nullptr;   // encodes the unused descriptor when aux.ptr_aux is null
  };

  template <class ProblemShape>
  static typename AuxLoad::Params to_underlying_arguments(ProblemShape const& problem_shape,
                                                          Arguments const& args, void* workspace) {
    typename AuxLoad::Arguments encoded = args.aux;
    if (encoded.ptr_aux == nullptr) encoded.ptr_aux = static_cast<AuxPointer>(args.placeholder);
    // The conv kernel's problem shape has a hierarchical M and a static L (_1); Sm90AuxLoad's TMA
    // type is declared for plain integer extents, so hand it those.
    auto [M, N, K, L] = cute::append<4>(problem_shape, 1);
    auto flat_shape = cute::make_shape(int(cute::size(M)), int(N), int(cute::size(K)),
                                       int(cute::size(L)));
    typename AuxLoad::Params params =
        AuxLoad::to_underlying_arguments(flat_shape, encoded, workspace);
    params.use_default = args.aux.ptr_aux == nullptr;
    return params;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }

  // AuxLoad's take its own Arguments; these nodes' take ours.
  using NoWorkspace::get_workspace_size;
  using NoWorkspace::initialize_workspace;
};

// The EVT's one compute node: (acc + bias + temb + residual) * scale, elementwise on fp32
// fragments (Sm90Compute converts every input to the compute type first).
template <class T>
struct ResnetEpilogue {
  CUTLASS_HOST_DEVICE T operator()(T const& acc, T const& bias, T const& temb, T const& residual,
                                   T const& scale) const {
    cutlass::plus<T> add;
    cutlass::multiplies<T> multiply;
    return multiply(add(add(add(acc, bias), temb), residual), scale);
  }
};

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------

template <class Element>
struct FusedConv {
  using ElementAccumulator = float;
  using ElementCompute = float;
  // 16-byte TMA accesses: 8 half-precision elements, so channel counts and strides are multiples
  // of 8.
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  using Layout = cutlass::layout::TensorNHWC;  // activation NHWC, filter KRSC, output NPQK
  // The K tile is nested, Shape<_64>, so that it tiles the C sub-mode of K = (C, S, R): a K tile
  // holds up to 64 channels of one filter tap (a channel count that is not a multiple of 64 leaves
  // the last tile of each tap part-filled; TMA fills the rest with zeros).
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::Shape<cute::_64>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  // The sm90 conv mainloop has no persistent (cooperative/ping-pong) schedules yet.
  using KernelSchedule = cutlass::conv::KernelImplicitTmaWarpSpecializedSm90;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
  using EpilogueTileType = cutlass::epilogue::collective::EpilogueTileAuto;

  // The residual node must agree with the epilogue the builder makes (stages, subtile), so derive
  // it from the same descriptor; ElementC is void: no C source, the residual is an aux load with a
  // flat (pixel, channel) stride, N-major like the output.
  using EpilogueDescriptor = cutlass::epilogue::collective::detail::EpilogueDescriptor<
      TileShape, EpilogueTileType, void, Element, EpilogueSchedule>;
  using ResidualDescriptor = cutlass::epilogue::collective::detail::AuxLoadDescriptor<
      EpilogueDescriptor, cutlass::layout::RowMajor, Element>;
  using ResidualStride = typename ResidualDescriptor::Stride;  // (pixel stride, _1, batch stride)

  using Bias = fusion::Sm90RowBroadcast<0, TileShape, Element, ElementCompute,
                                        cute::Stride<cute::_0, cute::_1, cute::_0>>;
  using Temb = PerImageRowBroadcast<Element, ElementCompute>;
  using Residual = OptionalAuxLoad<fusion::Sm90AuxLoad<
      ResidualDescriptor::Stages, typename EpilogueDescriptor::EpilogueTile, Element,
      ResidualStride, typename ResidualDescriptor::SmemLayoutAtom,
      typename ResidualDescriptor::CopyOpS2R>>;
  using Scale = fusion::Sm90ScalarBroadcast<ElementCompute>;
  using EpilogueTree = fusion::Sm90EVT<
      fusion::Sm90Compute<ResnetEpilogue, Element, ElementCompute,
                          cutlass::FloatRoundStyle::round_to_nearest>,
      fusion::Sm90AccFetch, Bias, Temb, Residual, Scale>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      EpilogueTileType, ElementAccumulator, ElementCompute,
      void, Layout, kAlignment,      // C: none
      Element, Layout, kAlignment,   // D
      EpilogueSchedule, EpilogueTree>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop,
      Element, Layout, kAlignment, Element, Layout, kAlignment, ElementAccumulator, TileShape,
      ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using ProblemShape = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, 2>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Arguments = typename Kernel::Arguments;
  using Params = typename Kernel::Params;

  static Arguments make_arguments(const FusedConvProblem& p) {
    const int k = p.kernel_size;
    const int pad = k / 2;
    const int64_t out_pixel = p.out_channels;  // the output is packed NHWC
    const int64_t out_row = int64_t(p.width) * out_pixel;
    const int64_t out_image = int64_t(p.height) * out_row;
    ProblemShape shape(cutlass::conv::Mode::kCrossCorrelation,
                       {p.batch, p.height, p.width, p.in_channels},
                       {p.input_stride[0], p.input_stride[1], p.input_stride[2], 1},
                       {p.out_channels, k, k, p.in_channels},
                       {p.weight_stride[0], p.weight_stride[1], p.weight_stride[2], 1},
                       {out_image, out_row, out_pixel, 1},
                       {pad, pad}, {pad, pad}, {1, 1}, {1, 1}, /*groups=*/1);

    // Output strides in the epilogue's M mode order (W, H, N).
    typename CollectiveEpilogue::StrideD output_stride{};
    cute::get<0, 0>(output_stride) = out_pixel;
    cute::get<0, 1>(output_stride) = out_row;
    cute::get<0, 2>(output_stride) = out_image;

    ResidualStride residual_stride{};
    cute::get<0>(residual_stride) = p.residual_stride;

    auto const* bias = static_cast<Element const*>(p.bias);
    auto const* temb = static_cast<Element const*>(p.temb);
    auto const* residual = static_cast<Element const*>(p.residual);
    typename EpilogueTree::Arguments tree{
        {},                                                     // acc
        {bias, Element(0), {}},                                 // bias
        {temb, p.temb_stride, p.height * p.width},              // temb
        {{residual, Element(0), residual_stride}, p.input},     // residual (input: placeholder)
        {{p.scale}},                                            // scale
        {}};                                                    // (acc + ...) * scale

    typename CollectiveEpilogue::Arguments epilogue{
        tree, nullptr, output_stride, static_cast<Element*>(p.output), output_stride};
    typename CollectiveMainloop::Arguments mainloop{static_cast<Element const*>(p.input),
                                                    static_cast<Element const*>(p.weight)};
    return Arguments(shape, mainloop, epilogue);
  }
};

// Element-count conditions the TMA descriptors need, checked before CUTLASS's can_implement
// (whose own checks assert rather than answer on some of them).
inline const char* layout_unsupported(const FusedConvProblem& p, int alignment) {
  auto aligned = [](const void* pointer) {
    return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0;
  };
  if (p.kernel_size < 1 || p.kernel_size % 2 == 0) return "kernel_size must be odd";
  if (p.in_channels % alignment != 0) return "in_channels is not a multiple of 8";
  if (p.out_channels % alignment != 0) return "out_channels is not a multiple of 8";
  if (!aligned(p.input) || !aligned(p.weight) || !aligned(p.output) ||
      (p.residual != nullptr && !aligned(p.residual))) {
    return "a tensor's data is not 16-byte aligned";
  }
  for (int d = 0; d < 3; ++d) {
    if (p.input_stride[d] % alignment != 0 || p.weight_stride[d] % alignment != 0) {
      return "an input or weight stride is not a multiple of 8 elements";
    }
  }
  if (p.residual != nullptr && p.residual_stride % alignment != 0) {
    return "the residual's pixel stride is not a multiple of 8 elements";
  }
  const int64_t pixels = int64_t(p.batch) * p.height * p.width;
  if (pixels > INT_MAX || pixels * p.out_channels > INT_MAX) {
    return "the problem is too large for 32-bit indexing";
  }
  return nullptr;
}

template <class Element>
const char* unsupported(const FusedConvProblem& p) {
  using Conv = FusedConv<Element>;
  if (const char* reason = layout_unsupported(p, Conv::kAlignment)) return reason;
  if (!Conv::Kernel::can_implement(Conv::make_arguments(p))) {
    return "CUTLASS's can_implement rejected the problem";
  }
  if (Conv::Kernel::get_workspace_size(Conv::make_arguments(p)) != 0) {
    return "the kernel wants a workspace";
  }
  return nullptr;
}

// Our own entry point rather than cutlass::device_kernel: the arch guard is ours, and the symbol
// carries "pyevo" (the device script's compute-sanitizer run instruments kernels by that name).
template <class Kernel>
__global__ void __launch_bounds__(Kernel::MaxThreadsPerBlock, Kernel::MinBlocksPerMultiprocessor)
pyevo_fused_conv2d_sm90_kernel(CUTLASS_GRID_CONSTANT typename Kernel::Params const params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ char shared_memory[];
  Kernel kernel;
  kernel(params, shared_memory);
#endif
  // Other archs: an empty stub, never launched (the launcher requires compute capability 9.0).
}

// Dynamic shared memory above 48 KiB must be allowed once per kernel and device.
template <auto KernelFunction>
cudaError_t allow_shared_memory(int bytes) {
  constexpr int kDevices = 64;
  static std::atomic<int> allowed[kDevices];
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  if (bytes <= 48 * 1024) return cudaSuccess;
  if (device < kDevices && allowed[device].load() >= bytes) return cudaSuccess;
  status = cudaFuncSetAttribute(reinterpret_cast<const void*>(KernelFunction),
                                cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (status == cudaSuccess && device < kDevices) allowed[device].store(bytes);
  return status;
}

template <class Element>
const char* run(const FusedConvProblem& p, cudaStream_t stream) {
  using Conv = FusedConv<Element>;
  using Kernel = typename Conv::Kernel;
  if (const char* reason = unsupported<Element>(p)) return reason;
  typename Conv::Params params = Kernel::to_underlying_arguments(Conv::make_arguments(p), nullptr);

  constexpr auto kernel_function = &pyevo_fused_conv2d_sm90_kernel<Kernel>;
  constexpr int kSharedBytes = Kernel::SharedStorageSize;
  if (allow_shared_memory<kernel_function>(kSharedBytes) != cudaSuccess) {
    return "cudaFuncSetAttribute(MaxDynamicSharedMemorySize) failed";
  }
  // Cluster shape 1x1x1: an ordinary launch (no cluster launch attributes needed).
  kernel_function<<<Kernel::get_grid_shape(params), Kernel::get_block_shape(), kSharedBytes,
                    stream>>>(params);
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace fused_conv2d_sm90_detail
}  // namespace cuda
}  // namespace pyevo
