// CPU kernels of the teacher cache's decoders (docs/cache-format.md; the torch twins and the
// encoders are in fastkd/cache/_bits.py):
//   unpack_bits(stream, width, start, stop): values [start, stop) of an LSB-first stream of
//     `width`-bit values (value i occupies bits [i w, (i + 1) w)) -> int64 [stop - start]
//   unpack_monotone(bitmap [n, B], count): each row is a non-decreasing sequence c_0 <= ... of
//     `count` values stored as a bitmap with a one at bit c_i + i -> int64 [n, count]
// Scalar code: both are a few operations per value, far below the cost of reading the shard.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace fastkd::cpu {
namespace {

at::Tensor unpack_bits_cpu(const at::Tensor& stream, int64_t width, int64_t start, int64_t stop) {
  TORCH_CHECK(stream.dim() == 1 && stream.scalar_type() == at::kByte,
              "fastkd::unpack_bits: stream must be a 1-D uint8 tensor, got ", stream.scalar_type(), " ",
              stream.sizes());
  TORCH_CHECK(width >= 1 && width <= 24, "fastkd::unpack_bits: width must lie in [1, 24], got ", width);
  TORCH_CHECK(0 <= start && start <= stop && (stop * width + 7) / 8 <= stream.numel(),
              "fastkd::unpack_bits: values [", start, ", ", stop, ") lie outside a stream of ",
              stream.numel(), " bytes at ", width, " bits");
  const at::Tensor s = stream.contiguous();
  const uint8_t* bytes = s.const_data_ptr<uint8_t>();
  const int64_t nbytes = s.numel();
  at::Tensor out = at::empty({stop - start}, stream.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  const uint32_t mask = (1u << width) - 1;
  at::parallel_for(start, stop, 1 << 16, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t bit = i * width, byte = bit >> 3;
      uint32_t word = 0;  // little-endian read of 4 bytes (fewer at the stream's very end)
      if (byte + 4 <= nbytes) {
        std::memcpy(&word, bytes + byte, 4);
      } else {
        std::memcpy(&word, bytes + byte, nbytes - byte);
      }
      o[i - start] = (word >> (bit & 7)) & mask;
    }
  });
  return out;
}

at::Tensor unpack_monotone_cpu(const at::Tensor& bitmap, int64_t count) {
  TORCH_CHECK(bitmap.dim() == 2 && bitmap.scalar_type() == at::kByte,
              "fastkd::unpack_monotone: bitmap must be a 2-D uint8 tensor, got ", bitmap.scalar_type(), " ",
              bitmap.sizes());
  TORCH_CHECK(count >= 0, "fastkd::unpack_monotone: count must be >= 0, got ", count);
  const at::Tensor m = bitmap.contiguous();
  const int64_t n = m.size(0), width = m.size(1);
  const uint8_t* bits = m.const_data_ptr<uint8_t>();
  at::Tensor out = at::empty({n, count}, bitmap.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, n, 1024, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const uint8_t* row = bits + r * width;
      int64_t* c = o + r * count;
      int64_t found = 0;
      for (int64_t byte = 0; byte < width && found < count; ++byte) {
        for (unsigned v = row[byte]; v && found < count; v &= v - 1) {
          c[found] = byte * 8 + __builtin_ctz(v) - found;
          ++found;
        }
      }
      TORCH_CHECK(found == count, "fastkd::unpack_monotone: row ", r, " holds ", found, " values, expected ",
                  count, " (a corrupt bitmap)");
    }
  });
  return out;
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("unpack_bits", &fastkd::cpu::unpack_bits_cpu);
  m.impl("unpack_monotone", &fastkd::cpu::unpack_monotone_cpu);
}
