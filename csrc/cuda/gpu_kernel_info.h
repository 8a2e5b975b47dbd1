// What tools/gpu_static.py needs to know about a CUDA kernel beyond what cuobjdump reads from
// the compiled extension: the block sizes its launcher chooses from (occupancy depends on them)
// and the bytes one row moves (the memory bound a GPU measurement is compared with).
//
//   #define FASTKD_FOO_THREADS 128, 256, 512
//   FASTKD_GPU_KERNEL_INFO(foo_kernel, "V*(2*$0+$1)+$2+8", FASTKD_FOO_THREADS);
//   constexpr int kFooThreads[] = {FASTKD_FOO_THREADS};   // the launcher picks from this
//
// row_bytes is a formula in V (the row length) and $i (sizeof the kernel's i-th template
// argument). The declaration is kept in the library as a string that the report finds by
// scanning fastkd/_C*.so; tests/test_gpu_static.py fails for a kernel without one. Define the
// launcher's table from the same macro, as above, so that the two cannot differ.
#pragma once

#include <cstddef>
#include <cstdint>

#define FASTKD_GPU_KERNEL_INFO_STR(...) #__VA_ARGS__
#define FASTKD_GPU_KERNEL_INFO_XSTR(...) FASTKD_GPU_KERNEL_INFO_STR(__VA_ARGS__)
#define FASTKD_GPU_KERNEL_INFO(kernel, row_bytes, ...)                                     \
  [[gnu::used, maybe_unused]] constexpr char fastkd_gpu_kernel_info_##kernel[] =                         \
      "fastkd-gpu-kernel;" #kernel ";threads=" FASTKD_GPU_KERNEL_INFO_XSTR(__VA_ARGS__) \
      ";row_bytes=" row_bytes ";"

namespace fastkd {

// A launcher's block-size table is valid when every entry is whole warps (the block reductions
// need them) and the entries increase (block_for_row picks the first that fits).
template <size_t N>
constexpr bool valid_block_table(const int (&threads)[N]) {
  for (size_t i = 0; i < N; ++i) {
    if (threads[i] % 32 != 0 || (i > 0 && threads[i] <= threads[i - 1])) return false;
  }
  return true;
}

// The smallest block of the table whose chunk (elems entries per thread) covers a row of vocab
// entries, else the largest: a row is one block, so a smaller block leaves fewer threads idle.
template <size_t N>
inline int block_for_row(const int (&threads)[N], int64_t vocab, int64_t elems) {
  for (const int t : threads) {
    if (t * elems >= vocab) return t;
  }
  return threads[N - 1];
}

}  // namespace fastkd
