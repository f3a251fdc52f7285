"""The per-element and per-row math of every loss, in Triton: the twin of csrc/kd_math.h (dense
divergences) and csrc/sparse_math.h (sparse tails), kept line-for-line alike with them and with
fastkd/_math.py. Every kernel of this backend calls these."""
import os

import triton
import triton.language as tl

from .._math import DIVERGENCES, TAILS

# Globals a @triton.jit function reads must be tl.constexpr *instances*: an annotation
# (`X: tl.constexpr = 1.0`) leaves a plain float, which the compiler refuses (the interpreter does not).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SKEW_FORWARD_KL = tl.constexpr(3)
SKEW_REVERSE_KL = tl.constexpr(4)
TVD = tl.constexpr(5)
BUCKET = tl.constexpr(0)
RENORM_TEACHER = tl.constexpr(1)
RENORM_BOTH = tl.constexpr(2)
# The ignore_index a row-loss launcher passes when there are no labels: its kernel's stand-in label
# is -1, which must not equal it (with a user's ignore_index=-1 every row was dropped).
NO_LABELS = -100
DIVERGENCE_CODES = {name: code for code, name in enumerate(DIVERGENCES)}  # the constexprs' values
TAIL_CODES = {name: code for code, name in enumerate(TAILS)}
assert (DIVERGENCE_CODES["forward_kl"], DIVERGENCE_CODES["jsd"], DIVERGENCE_CODES["tvd"],
        TAIL_CODES["renorm_both"]) == \
    (FORWARD_KL.value, JSD.value, TVD.value, RENORM_BOTH.value)


@triton.jit
def unless_zero(w, y):
    """y where w != 0, else 0: the 0 * log 0 = 0 convention."""
    return tl.where(w == 0, 0.0, y)


@triton.jit
def logaddexp(x, y):
    """log(exp(x) + exp(y)), -inf when both are -inf."""
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    return tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))


if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    from triton.language.extra import libdevice

    @triton.jit
    def expm1(x):
        return libdevice.expm1(x)

    @triton.jit
    def log1p(x):
        return libdevice.log1p(x)
else:  # Triton's interpreter has no libdevice: Kahan's forms, exact to a few ulps with IEEE exp/log

    @triton.jit
    def expm1(x):
        u = tl.exp(x)
        um1 = u - 1.0
        return tl.where(u == 1.0, x, tl.where((um1 == -1.0) | (u == float("inf")), um1, um1 * x / tl.log(u)))

    @triton.jit
    def log1p(x):
        u = 1.0 + x
        return tl.where(u == 1.0, x, tl.where(u == float("inf"), u, tl.log(u) * (x / (u - 1.0))))


@triton.jit
def mix_log_ratios(d, w, omw, log_w, log_omw):
    """kd_math.h's mix_log_ratios: (log x/m, log y/m) for m = w x + (1 - w) y from d = log x - log y."""
    near = tl.abs(d) < 1.0
    lx_m = tl.where(near, -log1p(omw * expm1(-d)), -logaddexp(log_w + tl.zeros_like(d), log_omw - d))
    ly_m = tl.where(near, -log1p(w * expm1(d)), -logaddexp(log_w + d, log_omw + tl.zeros_like(d)))
    return lx_m, ly_m


@triton.jit
def sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def elem(DIVERGENCE: tl.constexpr, p, q, lp, lq, d, beta, omb, log_beta, log_omb):
    """(term, u) of kd_math.h's Elem<D>: D = sum term; dD/da_j = u_j - q_j sum u."""
    if DIVERGENCE == FORWARD_KL:
        term = unless_zero(p, p * d)
        u = -p
    elif DIVERGENCE == REVERSE_KL:
        term = unless_zero(q, -q * d)
        u = term
    elif DIVERGENCE == JSD:
        lp_m, lq_m = mix_log_ratios(d, beta, omb, log_beta, log_omb)
        kq = unless_zero(q, q * lq_m)
        term = unless_zero(p, beta * p * lp_m) + omb * kq
        u = omb * kq
    elif DIVERGENCE == SKEW_FORWARD_KL:
        lp_m, lq_m = mix_log_ratios(d, beta, omb, log_beta, log_omb)
        term = unless_zero(p, p * lp_m)
        u = unless_zero(p, -omb * q * tl.exp(lp_m))
    elif DIVERGENCE == SKEW_REVERSE_KL:
        lq_m, lp_m = mix_log_ratios(-d, beta, omb, log_beta, log_omb)
        term = unless_zero(q, q * lq_m)
        u = unless_zero(q, q * (lq_m - beta * tl.exp(lq_m)))
    else:  # TVD
        diff = tl.where(tl.abs(d) < 1.0, q * expm1(d), p - q)  # p - q, exact near d = 0
        term = 0.5 * tl.abs(diff)
        u = 0.5 * q * sign(-diff)
    return term, u


@triton.jit
def tail_coefficients(TAIL: tl.constexpr, lse_all, lse_in, lse_tail, log_p, tail_lp):
    """sparse_math.h's tail_coefficients -> (shift, norm, extra, in_scale, in_norm, out_scale, tail_scale)."""
    zero = lse_all * 0.0
    if TAIL == BUCKET:
        r_p = tl.exp(tail_lp)
        scale = tl.exp(log_p) + r_p  # the teacher's whole stored mass, P + r_p
        # r_p (log r_p - log r_q); a tail of no student mass is +inf (the exact value)
        extra = tl.where(r_p > 0, r_p * (tail_lp - (lse_tail - lse_all)), zero)
        shift, norm, in_scale, in_norm, out_scale, tail_scale = zero, lse_all, scale, lse_all, scale, r_p
    else:
        active = log_p > float("-inf")  # no teacher entry: no KD term
        one = tl.where(active, 1.0, zero)
        shift = tl.where(active, log_p, zero)  # t = p / P
        extra = zero
        tail_scale = zero
        in_scale = one
        if TAIL == RENORM_TEACHER:
            norm, in_norm, out_scale = lse_all, lse_all, one
        else:  # renorm_both: q^ over I, nothing outside I
            norm = tl.where(active, lse_in, lse_all)
            in_norm, out_scale = norm, zero
    return shift, norm, extra, in_scale, in_norm, out_scale, tail_scale


@triton.jit
def sparse_term(lp, a, shift, norm):
    """The loss term of each id of I, 0 for a padding entry (lp = -inf)."""
    lt = lp - shift
    return tl.where(lp > float("-inf"), tl.exp(lt) * (lt - (a - norm)), 0.0)


@triton.jit
def exp_below(a, norm):
    """exp(a - norm), 0 where a = -inf (norm may then be -inf too)."""
    return tl.where(a > float("-inf"), tl.exp(a - norm), 0.0)


@triton.jit
def online_update(m, s, x):
    """Fold the block x (log2 units; -inf entries allowed) into the running max m and sum of
    exp2(x - m) s: -> (m', s'), with no NaN while everything is -inf."""
    m_new = tl.maximum(m, tl.max(x, 0))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_new = s * tl.exp2(m - safe) + tl.sum(tl.exp2(x - safe), 0)
    return m_new, s_new


@triton.jit
def online_update_weighted(m, s, r, x, w):
    """online_update, also folding sum exp2(x - m) w into r at the same scale (r / s is then the
    exp2(x)-weighted mean of w)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp2(m - safe)
    e = tl.exp2(x - safe)
    return m_new, s * rescale + tl.sum(e, 0), r * rescale + tl.sum(tl.where(e > 0, e * w, 0.0), 0)


@triton.jit
def expm1_near(x, DEGREE: tl.constexpr):
    """kd_math.h's expm1_near: expm1(x) for |x| <= 1, Taylor to x^DEGREE / DEGREE!."""
    r = tl.full(x.shape, 1.0, x.dtype)
    for k in tl.static_range(DEGREE, 1, -1):
        r = 1.0 + x * (1.0 / k) * r
    return x * r


@triton.jit
def hard_label_grad(x, offs, label, lse_1):
    """d CE / d s of the hard-label term at temperature 1: softmax(s) - onehot(label), with
    lse_1 = log2 sum exp(s) (log2 units)."""
    return tl.exp2(x * LOG2E - lse_1) - tl.where(offs == label, 1.0, 0.0)


@triton.jit
def gradient_u(u_sum):
    """kd_math.h's gradient_u: a row's U, NaN where it is not finite (the divergence is +inf through a
    masked teacher id the student gives mass: the gradient row is NaN, docs/math.md)."""
    return tl.where(u_sum - u_sum == 0.0, u_sum, float("nan"))


@triton.jit
def log2_total(m, s):
    """log2 of the sum that (m, s) hold: m + log2(s), -inf for an empty one."""
    return tl.where(m == float("-inf"), m, m + tl.log2(s))
