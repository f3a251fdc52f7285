// CPU op fastkd::unpack_monotone, a teacher-cache decoder (docs/cache-format.md; the encoder is
// in fastkd/cache/_bits.py, the torch twin in fastkd/reference/unpack_monotone.py):
//   unpack_monotone(bitmap [n, B], count): each row is a non-decreasing sequence c_0 <= ... of
//     `count` values stored as a bitmap with a one at bit c_i + i -> int64 [n, count]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace fastkd::cpu {
namespace {

at::Tensor unpack_monotone_cpu(const at::Tensor& bitmap, int64_t count) {
  TORCH_CHECK_VALUE(bitmap.dim() == 2 && bitmap.scalar_type() == at::kByte,
              "fastkd::unpack_monotone: bitmap must be a 2-D uint8 tensor, got ", bitmap.scalar_type(), " ",
              bitmap.sizes());
  const at::Tensor m = bitmap.contiguous();
  const int64_t n = m.size(0), width = m.size(1);
  TORCH_CHECK_VALUE(count >= 0 && count <= width * 8, "fastkd::unpack_monotone: count must lie in [0, ", width * 8,
              "], got ", count);
  const uint8_t* bits = m.const_data_ptr<uint8_t>();
  at::Tensor out = at::empty({n, count}, bitmap.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, n, 1024, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const uint8_t* row = bits + r * width;
      int64_t* c = o + r * count;
      int64_t ones = 0;  // every one of the row, so that a bitmap with more than `count` is refused
      for (int64_t byte = 0; byte < width; ++byte) ones += __builtin_popcount(row[byte]);
      TORCH_CHECK_VALUE(ones == count, "fastkd::unpack_monotone: row ", r, " holds ", ones, " values, expected ",
                  count, " (a corrupt bitmap)");
      int64_t found = 0;
      for (int64_t byte = 0; byte < width && found < count; ++byte) {
        for (unsigned v = row[byte]; v && found < count; v &= v - 1) {
          c[found] = byte * 8 + __builtin_ctz(v) - found;
          ++found;
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("unpack_monotone", &fastkd::cpu::unpack_monotone_cpu); }
