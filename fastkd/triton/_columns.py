"""The columns of the vocab-parallel row tensors, by name, for the Triton kernels: constexprs looked
up in fastkd/_ops.py's DENSE_STATS (DS_), DENSE_ROW (DR_), SPARSE_STATS (SS_) and SPARSE_ROW (SR_)
themselves, so a column moved there moves here (the C++ twin, csrc/row_columns.h, is checked
against the same tuples by tests/test_headers.py); <prefix>_WIDTH is each tensor's width."""
import triton.language as tl

from .. import _ops


def _columns(layout, names: str):
    """The constexpr index of each of `names` (space-separated: the layout's own names, in its order),
    then the layout's width."""
    if tuple(names.split()) != tuple(layout):
        raise AssertionError(f"fastkd/triton/_columns.py names {names.split()} where fastkd/_ops.py has {layout}")
    return tuple(tl.constexpr(j) for j in range(len(layout))) + (tl.constexpr(len(layout)),)


DS_M_A, DS_S_A, DS_R_A, DS_FAR, DS_M_B, DS_S_B, DS_M_1, DS_S_1, DS_WIDTH = _columns(
    _ops.DENSE_STATS, "m_a s_a r_a far m_b s_b m_1 s_1")
DR_M_A, DR_LOG_S_A, DR_M_B, DR_LOG_S_B, DR_DL, DR_M_1, DR_LOG_S_1, DR_U, DR_WIDTH = _columns(
    _ops.DENSE_ROW, "m_a log_s_a m_b log_s_b dl m_1 log_s_1 u")
SS_M_IN, SS_S_IN, SS_M_OUT, SS_S_OUT, SS_M_1, SS_S_1, SS_WIDTH = _columns(
    _ops.SPARSE_STATS, "m_in s_in m_out s_out m_1 s_1")
SR_SHIFT, SR_IN_SCALE, SR_IN_NORM, SR_OUT_SCALE, SR_LSE_ALL, SR_TAIL_SCALE, SR_LSE_TAIL, SR_LSE_1, SR_WIDTH = _columns(
    _ops.SPARSE_ROW, "shift in_scale in_norm out_scale lse_all tail_scale lse_tail lse_1")
