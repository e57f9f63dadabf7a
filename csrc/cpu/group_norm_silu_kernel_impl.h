// The CPU GroupNorm+SiLU loops. group_norm_silu_cpu.cpp includes this file once per instruction
// set (baseline x86-64, AVX2+FMA, AVX-512), each time inside its own namespace and
// `#pragma GCC target`, and picks one at run time. So this file includes nothing
// itself (its includer provides <ATen/Parallel.h>, <ATen/OpMathType.h>, <cmath>, <cstring>,
// <algorithm>, <vector>) and must only be included from that file.
//
// Work is split over (sample, group) slabs with at::parallel_for. One task handles a slab
// (channels_per_group * HxW contiguous values) completely: the statistics passes, then the
// normalise+SiLU pass (or the backward's two passes), so each pass after the first re-reads a
// slab that is still in the core's cache (16-112 KiB for the UNets we compress).
//
// Statistics are exact two-pass moments (the mean, then the mean of squared deviations), each
// a two-level sum: SIMD partial sums over blocks of kSumBlock values, then a sum over blocks, in
// the op-math type (double for float64; float for float32, float16 and bfloat16). The two passes
// avoid the cancellation of E[x^2] - E[x]^2; the blocks keep every partial sum short.
//
// The backward does not receive the forward's mean/rstd: it recomputes them from the input, one
// more pass over a slab it has to read anyway, while it is cached. So the public op returns a
// single tensor and autograd saves nothing but the op's inputs.

// Values per first-level block of the two-level sums: each SIMD lane adds a few dozen values;
// the second level is a short loop.
constexpr int64_t kSumBlock = 256;

// Tasks of at::parallel_for cover at least this many values (ATen's own grain size), so small
// tensors are not split into tasks cheaper than waking a thread.
constexpr int64_t kValuesPerTask = 32768;

inline int64_t slabs_per_task(int64_t slab_size) {
  return std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(1, slab_size));
}

// exp(x) for float that the compiler can vectorise (std::exp is a library call it cannot;
// vectorising the clamps needs -fno-trapping-math, set in setup.py):
// exp(x) = 2^n exp(r) with n = round(x / ln 2), |r| <= ln(2) / 2, and exp(r) from the Cephes
// degree-5 polynomial (relative error about 1e-7 there). x is clamped to [-87, 88] first, which
// keeps 2^n a normal float; NaN becomes -87 (the callers multiply by their argument again, so a
// NaN input still gives a NaN output).
inline float vectorizable_exp(float x) {
  constexpr float kLog2E = 1.44269504088896341f;
  constexpr float kLn2High = 0.693359375f;  // ln 2 split in two so n * ln 2 is exact enough
  constexpr float kLn2Low = -2.12194440e-4f;
  x = x > -87.0f ? x : -87.0f;
  x = x < 88.0f ? x : 88.0f;
  const float n = std::floor(x * kLog2E + 0.5f);
  const float r = x - n * kLn2High - n * kLn2Low;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float exp_r = p * r * r + r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &exponent_bits, sizeof(two_to_n));
  return exp_r * two_to_n;
}

inline double vectorizable_exp(double x) { return std::exp(x); }

template <typename acc_t>
inline acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + vectorizable_exp(-v));
}

template <typename scalar_t, typename acc_t>
inline acc_t sum_values(const scalar_t* values, int64_t count) {
  acc_t total = 0;
  for (int64_t start = 0; start < count; start += kSumBlock) {
    const int64_t end = std::min(count, start + kSumBlock);
    acc_t block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
    for (int64_t i = start; i < end; ++i) block_sum += static_cast<acc_t>(values[i]);
    total += block_sum;
  }
  return total;
}

template <typename scalar_t, typename acc_t>
inline acc_t sum_squared_deviations(const scalar_t* values, int64_t count, acc_t mean) {
  acc_t total = 0;
  for (int64_t start = 0; start < count; start += kSumBlock) {
    const int64_t end = std::min(count, start + kSumBlock);
    acc_t block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
    for (int64_t i = start; i < end; ++i) {
      const acc_t deviation = static_cast<acc_t>(values[i]) - mean;
      block_sum += deviation * deviation;
    }
    total += block_sum;
  }
  return total;
}

template <typename acc_t>
struct GroupStatistics {
  acc_t mean;
  acc_t rstd;
};

template <typename scalar_t, typename acc_t>
inline GroupStatistics<acc_t> group_statistics(const scalar_t* slab, int64_t count, acc_t eps) {
  const acc_t mean = sum_values<scalar_t, acc_t>(slab, count) / static_cast<acc_t>(count);
  const acc_t variance =
      sum_squared_deviations<scalar_t, acc_t>(slab, count, mean) / static_cast<acc_t>(count);
  return {mean, acc_t(1) / std::sqrt(variance + eps)};
}

// output = silu((x - mean) * rstd * weight[c] + bias[c]) over contiguous (N, C, HxW) data.
template <typename scalar_t>
void group_norm_silu_forward(const scalar_t* input, const scalar_t* weight, const scalar_t* bias,
                             scalar_t* output, int64_t batch, int64_t channels, int64_t spatial,
                             int64_t channels_per_group, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = channels / channels_per_group;
  const int64_t slab_size = channels_per_group * spatial;
  at::parallel_for(0, batch * groups, slabs_per_task(slab_size), [&](int64_t begin, int64_t end) {
    for (int64_t slab = begin; slab < end; ++slab) {
      // In the contiguous layout, group g of sample n starts at (n * C + g * cpg) * HxW.
      const scalar_t* x = input + slab * slab_size;
      scalar_t* y = output + slab * slab_size;
      const GroupStatistics<acc_t> stats =
          group_statistics<scalar_t, acc_t>(x, slab_size, static_cast<acc_t>(eps));
      const int64_t first_channel = (slab % groups) * channels_per_group;
      for (int64_t c = 0; c < channels_per_group; ++c) {
        const acc_t mean = stats.mean;
        const acc_t scale = stats.rstd * static_cast<acc_t>(weight[first_channel + c]);
        const acc_t shift = static_cast<acc_t>(bias[first_channel + c]);
        const scalar_t* x_row = x + c * spatial;
        scalar_t* y_row = y + c * spatial;
#pragma omp simd
        for (int64_t i = 0; i < spatial; ++i) {
          // (x - mean) * scale rather than x * scale - mean * scale: no cancellation when the
          // mean is large next to the spread.
          const acc_t z = (static_cast<acc_t>(x_row[i]) - mean) * scale + shift;
          y_row[i] = static_cast<scalar_t>(z * sigmoid(z));
        }
      }
    }
  });
}

// grad_input, and per-(sample, channel) partial sums of grad_weight and grad_bias that the
// caller reduces over the batch (in a fixed order: the result does not depend on threading).
template <typename scalar_t>
void group_norm_silu_backward(const scalar_t* grad_output, const scalar_t* input,
                              const scalar_t* weight, const scalar_t* bias, scalar_t* grad_input,
                              at::opmath_type<scalar_t>* grad_weight_partial,
                              at::opmath_type<scalar_t>* grad_bias_partial, int64_t batch,
                              int64_t channels, int64_t spatial, int64_t channels_per_group,
                              double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = channels / channels_per_group;
  const int64_t slab_size = channels_per_group * spatial;
  at::parallel_for(0, batch * groups, slabs_per_task(slab_size), [&](int64_t begin, int64_t end) {
    // dL/dz of the current slab (z = the affine-normalised value that enters SiLU), kept so the
    // second pass does not evaluate the sigmoid again.
    std::vector<acc_t> grad_z(slab_size);
    for (int64_t slab = begin; slab < end; ++slab) {
      const scalar_t* x = input + slab * slab_size;
      const scalar_t* dy = grad_output + slab * slab_size;
      scalar_t* dx = grad_input + slab * slab_size;
      const GroupStatistics<acc_t> stats =
          group_statistics<scalar_t, acc_t>(x, slab_size, static_cast<acc_t>(eps));
      const acc_t mean = stats.mean;
      const acc_t rstd = stats.rstd;
      const int64_t first_channel = (slab % groups) * channels_per_group;
      const int64_t sample = slab / groups;

      // Pass 1: dL/dz = dy * silu'(z), silu'(z) = s (1 + z (1 - s)) with s = sigmoid(z); per
      // channel sum(dL/dz) (= grad_bias) and sum(dL/dz * x_hat) (= grad_weight). As
      // dL/dx_hat = weight[c] * dL/dz, their weighted sums over the group's channels are the
      // group sums of dL/dx_hat and dL/dx_hat * x_hat that the normalisation's backward needs.
      acc_t group_sum_grad_xhat = 0;
      acc_t group_sum_grad_xhat_xhat = 0;
      for (int64_t c = 0; c < channels_per_group; ++c) {
        const acc_t gamma = static_cast<acc_t>(weight[first_channel + c]);
        const acc_t beta = static_cast<acc_t>(bias[first_channel + c]);
        const scalar_t* x_row = x + c * spatial;
        const scalar_t* dy_row = dy + c * spatial;
        acc_t* dz_row = grad_z.data() + c * spatial;
        acc_t channel_sum_dz = 0;
        acc_t channel_sum_dz_xhat = 0;
        for (int64_t start = 0; start < spatial; start += kSumBlock) {
          const int64_t end_of_block = std::min(spatial, start + kSumBlock);
          acc_t block_sum_dz = 0;
          acc_t block_sum_dz_xhat = 0;
#pragma omp simd reduction(+ : block_sum_dz, block_sum_dz_xhat)
          for (int64_t i = start; i < end_of_block; ++i) {
            const acc_t xhat = (static_cast<acc_t>(x_row[i]) - mean) * rstd;
            const acc_t z = xhat * gamma + beta;
            const acc_t s = sigmoid(z);
            const acc_t dz = static_cast<acc_t>(dy_row[i]) * s * (acc_t(1) + z * (acc_t(1) - s));
            dz_row[i] = dz;
            block_sum_dz += dz;
            block_sum_dz_xhat += dz * xhat;
          }
          channel_sum_dz += block_sum_dz;
          channel_sum_dz_xhat += block_sum_dz_xhat;
        }
        grad_bias_partial[sample * channels + first_channel + c] = channel_sum_dz;
        grad_weight_partial[sample * channels + first_channel + c] = channel_sum_dz_xhat;
        group_sum_grad_xhat += gamma * channel_sum_dz;
        group_sum_grad_xhat_xhat += gamma * channel_sum_dz_xhat;
      }

      // Pass 2: dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)).
      const acc_t mean_grad_xhat = group_sum_grad_xhat / static_cast<acc_t>(slab_size);
      const acc_t mean_grad_xhat_xhat = group_sum_grad_xhat_xhat / static_cast<acc_t>(slab_size);
      for (int64_t c = 0; c < channels_per_group; ++c) {
        const acc_t gamma = static_cast<acc_t>(weight[first_channel + c]);
        const scalar_t* x_row = x + c * spatial;
        const acc_t* dz_row = grad_z.data() + c * spatial;
        scalar_t* dx_row = dx + c * spatial;
#pragma omp simd
        for (int64_t i = 0; i < spatial; ++i) {
          const acc_t xhat = (static_cast<acc_t>(x_row[i]) - mean) * rstd;
          dx_row[i] = static_cast<scalar_t>(
              rstd * (gamma * dz_row[i] - mean_grad_xhat - xhat * mean_grad_xhat_xhat));
        }
      }
    }
  });
}
