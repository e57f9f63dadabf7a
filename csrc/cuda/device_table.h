// Copies a small host array (a launch's problem descriptors) to the current CUDA device, ordered
// on the current stream: staged through pinned memory, whose block the caching host allocator
// keeps until the copy has run. The returned tensor owns the device copy; the caching allocator
// reuses it only after the work queued on this stream, so it may be dropped once the kernel that
// reads it is enqueued.
#pragma once

#include <ATen/ATen.h>

#include <cstring>

namespace pyevo {

inline at::Tensor upload_table(const void* data, int64_t bytes, const at::Device& device) {
  at::Tensor host =
      at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), data, static_cast<size_t>(bytes));
  return host.to(device, /*non_blocking=*/true);
}

}  // namespace pyevo
