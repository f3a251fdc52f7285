// csrc/row_columns.h -- the columns of the vocab-parallel row tensors, by name: the [N, k] float64
// tensors that pass between a rank's kernels and the all-reduces (docs/distributed.md). The names
// and their order are fastkd/_ops.py's DENSE_STATS, DENSE_ROW, SPARSE_STATS and SPARSE_ROW (its
// comment says what each holds); tests/test_headers.py checks that the two agree, and
// fastkd/triton/_columns.py gives Triton the same names from _ops.py itself.
#pragma once

namespace fastkd::columns {

namespace dense_stats {  // dense_kd_stats -> [N, width]
enum : int { m_a, s_a, r_a, far, m_b, s_b, m_1, s_1, width };
}
namespace dense_row {  // dense_kd_shard / dense_kd_finish <- [N, width]
enum : int { m_a, log_s_a, m_b, log_s_b, dl, m_1, log_s_1, u, width };
}
namespace sparse_stats {  // sparse_kd_stats -> [N, width]
enum : int { m_in, s_in, m_out, s_out, m_1, s_1, width };
}
namespace sparse_row {  // sparse_kd_shard <- [N, width]
enum : int { shift, in_scale, in_norm, out_scale, lse_all, tail_scale, lse_tail, lse_1, width };
}

}  // namespace fastkd::columns
