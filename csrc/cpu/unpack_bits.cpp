// CPU op fastkd::unpack_bits, a teacher-cache decoder (docs/cache-format.md; the encoder is in
// fastkd/cache/_bits.py, the torch twin in fastkd/reference/unpack_bits.py):
//   unpack_bits(stream, width, start, stop): values [start, stop) of an LSB-first stream of
//     `width`-bit values (value i occupies bits [i w, (i + 1) w)) -> int64 [stop - start]
// Scalar code: a few operations per value, far below the cost of reading the shard.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace fastkd::cpu {
namespace {

at::Tensor unpack_bits_cpu(const at::Tensor& stream, int64_t width, int64_t start, int64_t stop) {
  TORCH_CHECK_VALUE(stream.dim() == 1 && stream.scalar_type() == at::kByte,
              "fastkd::unpack_bits: stream must be a 1-D uint8 tensor, got ", stream.scalar_type(), " ",
              stream.sizes());
  TORCH_CHECK_VALUE(width >= 1 && width <= 24, "fastkd::unpack_bits: width must lie in [1, 24], got ", width);
  // stop * width could overflow int64 for a forged stop: compare against numel * 8 / width instead
  TORCH_CHECK_VALUE(0 <= start && start <= stop && stop <= stream.numel() * 8 / width,
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

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("unpack_bits", &fastkd::cpu::unpack_bits_cpu);
}
