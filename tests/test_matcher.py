"""The matcher on hand-written post-grad graphs: shapes Inductor produces on other devices (CUDA
drops the bf16 round trip before an FP8 quant), which the CPU end-to-end tests cannot show."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from rangedispatch.fusion.matcher import find_matches

aten, prims, funcol = torch.ops.aten, torch.ops.prims, torch.ops._c10d_functional
BF16, F32, FP8 = torch.bfloat16, torch.float32, torch.float8_e4m3fn


def _graph(fn, *shapes_dtypes):
    args = [torch.randn(s, dtype=d) for s, d in shapes_dtypes]
    return make_fx(fn, tracing_mode="fake")(*args).graph


def _norm_head(x, residual):
    ar = funcol.wait_tensor(funcol.all_reduce(x, "sum", "0"))
    h = aten.add.Tensor(residual, ar)  # residual on the left, as some models write it
    h32 = prims.convert_element_type(h, F32)
    n = aten.mul.Tensor(h32, aten.rsqrt(aten.add.Tensor(aten.mean.dim(aten.pow.Tensor_Scalar(h32, 2), [-1], True), 1e-5)))
    return h, n


def _quant(y32, scale):
    return prims.convert_element_type(aten.clamp_max(aten.clamp_min(aten.div.Tensor(y32, scale), -448.0), 448.0), FP8)


def test_fp8_quant_straight_after_fp32_weighted_norm_standard_and_gemma():
    def standard(x, residual, w, scale):
        h, n = _norm_head(x, residual)
        return _quant(aten.mul.Tensor(w, n), scale), h  # weight on the left

    def gemma(x, residual, w, scale):
        h, n = _norm_head(x, residual)
        return _quant(aten.mul.Tensor(n, aten.add.Tensor(prims.convert_element_type(w, F32), 1.0)), scale), h

    for fn, mode in ((standard, "standard"), (gemma, "gemma")):
        g = _graph(fn, ((8, 64), BF16), ((8, 64), BF16), ((64,), BF16), ((1,), F32))
        (m,), skipped = find_matches(g)
        assert not skipped and m.weight_mode == mode and m.scale is not None and m.residual is not None
        assert abs(m.eps - 1e-5) < 1e-12


def test_fp32_weighted_norm_without_quant_is_refused():
    def fn(x, residual, w):
        h, n = _norm_head(x, residual)
        return aten.mul.Tensor(n, w), h  # fp32 output: the fused op would return bf16

    matches, skipped = find_matches(_graph(fn, ((8, 64), BF16), ((8, 64), BF16), ((64,), BF16)))
    assert not matches and "not cast back" in skipped[0]


def test_mismatched_weight_dtype_is_refused():
    def fn(x, residual, w):
        h, n = _norm_head(x, residual)
        return prims.convert_element_type(aten.mul.Tensor(n, w), BF16), h

    matches, skipped = find_matches(_graph(fn, ((8, 64), BF16), ((8, 64), BF16), ((64,), F32)))
    assert not matches and "differs from activation dtype" in skipped[0]


def test_reduction_over_another_dim_is_refused():
    def fn(x, w):
        ar = funcol.wait_tensor(funcol.all_reduce(x, "sum", "0"))
        n = aten.mul.Tensor(ar, aten.rsqrt(aten.add.Tensor(aten.mean.dim(aten.pow.Tensor_Scalar(ar, 2), [0], True), 1e-5)))
        return aten.mul.Tensor(n, w)

    matches, skipped = find_matches(_graph(fn, ((8, 64), F32), ((64,), F32)))
    assert not matches and "last dim" in skipped[0]


def _llama_tail(n, w):
    return aten.mul.Tensor(prims.convert_element_type(n, BF16), w)


def _norm(h):
    h32 = prims.convert_element_type(h, F32)
    return aten.mul.Tensor(h32, aten.rsqrt(aten.add.Tensor(aten.mean.dim(aten.pow.Tensor_Scalar(h32, 2), [-1], True), 1e-5)))


def _refusal(fn, *shapes):
    matches, skipped = find_matches(_graph(fn, *shapes))
    assert not matches and len(skipped) == 1
    return skipped[0]


ACT, WEIGHT = ((8, 64), BF16), ((64,), BF16)


def test_look_alikes_that_change_the_meaning_are_refused():
    def ar(x, op="sum"):
        return funcol.wait_tensor(funcol.all_reduce(x, op, "0"))

    def alpha(x, r, w):
        h = aten.add.Tensor(ar(x), r, alpha=3)
        return _llama_tail(_norm(h), w), h

    def doubled(x, w):
        a = ar(x)
        h = aten.add.Tensor(a, a)
        return _llama_tail(_norm(h), w), h

    def broadcast(x, r, w):
        h = aten.add.Tensor(ar(x), r)
        return _llama_tail(_norm(h), w), h

    def max_reduce(x, w):
        return _llama_tail(_norm(ar(x, "max")), w)

    def mean_dtype(x, w):
        h32 = prims.convert_element_type(ar(x), F32)
        ms = aten.mean.dim(aten.pow.Tensor_Scalar(h32, 2), [-1], True, dtype=torch.float64)
        return _llama_tail(aten.mul.Tensor(h32, aten.rsqrt(aten.add.Tensor(ms, 1e-5))), w)

    def eps_alpha(x, w):
        h32 = prims.convert_element_type(ar(x), F32)
        ms = aten.mean.dim(aten.pow.Tensor_Scalar(h32, 2), [-1], True)
        return _llama_tail(aten.mul.Tensor(h32, aten.rsqrt(aten.add.Tensor(ms, 1e-5, alpha=2))), w)

    def gemma_alpha(x, w):
        n = _norm(ar(x))
        return prims.convert_element_type(aten.mul.Tensor(n, aten.add.Tensor(prims.convert_element_type(w, F32), 1.0, alpha=2)), BF16)

    def keepdim_off(x, w):
        h32 = prims.convert_element_type(ar(x), F32)
        ms = aten.mean.dim(aten.pow.Tensor_Scalar(h32, 2), [-1], False)
        return aten.mul.Tensor(h32, aten.rsqrt(aten.add.Tensor(ms, 1e-5)).unsqueeze(-1))

    assert "alpha=3" in _refusal(alpha, ACT, ACT, WEIGHT)
    assert "added to itself" in _refusal(doubled, ACT, WEIGHT)
    assert "broadcast" in _refusal(broadcast, ACT, ((1, 64), BF16), WEIGHT)
    assert "reduce op 'max'" in _refusal(max_reduce, ACT, WEIGHT)
    assert "computed in torch.float64" in _refusal(mean_dtype, ACT, WEIGHT)
    assert "alpha=2" in _refusal(eps_alpha, ACT, WEIGHT)
    assert "alpha=2" in _refusal(gemma_alpha, ACT, WEIGHT)
    assert "keepdim" in _refusal(keepdim_off, ACT, WEIGHT)


def test_the_llama_form_still_matches():
    def llama(x, r, w):
        h = aten.add.Tensor(funcol.wait_tensor(funcol.all_reduce(x, "sum", "0")), r)
        return _llama_tail(_norm(h), w), h

    (m,), skipped = find_matches(_graph(llama, ACT, ACT, WEIGHT))
    assert not skipped and m.weight_mode == "llama" and m.residual is not None
