"""clip_gradients against each mode's formula, on cases worked out by hand."""

import numpy as np
import pytest

from workers.nn.clipping import clip_gradients


def f32(*values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_value_clamps_each_element_and_leaves_ties_alone():
    grads = [f32(-3.0, -1.0, 0.5, 1.0, 2.0)]
    clipped, total = clip_gradients(grads, "value", 1.0)
    assert clipped[0].tolist() == [-1.0, -1.0, 0.5, 1.0, 1.0]
    assert total == pytest.approx(np.sqrt(9 + 1 + 0.25 + 1 + 4))
    at_threshold = [f32(-1.0, 1.0)]
    clipped, _ = clip_gradients(at_threshold, "value", 1.0)
    assert clipped[0] is at_threshold[0]  # untouched: the very same array


def test_norm_scales_each_tensor_on_its_own():
    big, small = f32(3.0, 4.0), f32(0.3, 0.4)  # norms 5 and 0.5
    clipped, total = clip_gradients([big, small], "norm", 1.0)
    np.testing.assert_allclose(clipped[0], [0.6, 0.8], rtol=1e-6)
    assert clipped[1] is small
    assert total == pytest.approx(np.sqrt(25 + 0.25))
    tie = f32(0.6, 0.8)  # norm exactly 1
    assert clip_gradients([tie], "norm", 1.0)[0][0] is tie


def test_global_norm_is_pytorch_clip_grad_norm_with_its_epsilon():
    grads = [f32(3.0, 0.0), f32(0.0, 4.0)]  # per-tensor norms 3 and 4, total 5
    clipped, total = clip_gradients(grads, "global_norm", 1.0)
    assert total == pytest.approx(5.0)
    coef = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(clipped[0], [3.0 * coef, 0.0], rtol=1e-7)
    np.testing.assert_allclose(clipped[1], [0.0, 4.0 * coef], rtol=1e-7)
    # at the threshold the 1e-6 still engages: coef = 5 / (5 + 1e-6) < 1
    clipped, _ = clip_gradients(grads, "global_norm", 5.0)
    assert clipped[0] is not grads[0]
    np.testing.assert_allclose(clipped[1][1], 4.0 * 5.0 / (5.0 + 1e-6), rtol=1e-7)
    # a hair above the norm plus epsilon: unchanged
    clipped, _ = clip_gradients(grads, "global_norm", 5.0 + 2e-6)
    assert clipped[0] is grads[0] and clipped[1] is grads[1]


def test_one_huge_tensor_among_small_ones():
    huge = np.full(4, 1e6, dtype=np.float32)  # norm 2e6
    small = [f32(1e-3, -1e-3), f32(0.5)]
    grads = [*small, huge]
    total = np.sqrt(2e-6 + 0.25 + 4e12)
    by_global, reported = clip_gradients(grads, "global_norm", 1.0)
    assert reported == pytest.approx(total)
    # global_norm shrinks everyone by the huge tensor's norm...
    np.testing.assert_allclose(by_global[1], [0.5 / total], rtol=1e-5)
    # ...per-tensor norm clipping leaves the small ones alone
    by_norm, _ = clip_gradients(grads, "norm", 1.0)
    assert by_norm[0] is small[0] and by_norm[1] is small[1]
    np.testing.assert_allclose(np.linalg.norm(by_norm[2]), 1.0, rtol=1e-6)
    by_value, _ = clip_gradients(grads, "value", 1.0)
    assert by_value[2].tolist() == [1.0] * 4 and by_value[0] is small[0]


@pytest.mark.parametrize("mode", ["value", "norm", "global_norm"])
def test_zero_gradients_stay_zero_and_unchanged(mode):
    grads = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
    clipped, total = clip_gradients(grads, mode, 0.5)
    assert total == 0.0
    assert all(c is g for c, g in zip(clipped, grads, strict=True))


def test_adaptive_clips_each_output_unit_against_its_weights():
    # [in=2, out=3]: unit j is column j
    weights = np.array([[3.0, 0.0, 1.0], [4.0, 0.0, 0.0]], dtype=np.float32)  # unit norms 5, 0, 1
    grads = np.array([[0.3, 1.0, 0.06], [0.4, 0.0, 0.08]], dtype=np.float32)  # norms .5, 1, .1
    clipped, total = clip_gradients([grads], "adaptive", 0.05, params=[weights])
    (g,) = clipped
    # unit 0: max = 0.05 * 5 = 0.25 < 0.5 -> scaled by 0.5
    np.testing.assert_allclose(g[:, 0], [0.15, 0.2], rtol=1e-6)
    # unit 1: zero weights -> max = 0.05 * 1e-3 -> scaled to norm 5e-5
    np.testing.assert_allclose(np.linalg.norm(g[:, 1]), 5e-5, rtol=1e-5)
    # unit 2: max = 0.05 * 1 = 0.05 < 0.1 -> scaled to norm 0.05
    np.testing.assert_allclose(g[:, 2], [0.03, 0.04], rtol=1e-6)
    assert total == pytest.approx(np.sqrt(0.25 + 1.0 + 0.01))


def test_adaptive_treats_a_vector_as_one_unit_and_keeps_small_gradients():
    bias = f32(3.0, 4.0)  # norm 5
    small = f32(0.03, 0.04)  # norm 0.05 < 0.1 * 5
    clipped, _ = clip_gradients([small], "adaptive", 0.1, params=[bias])
    assert clipped[0] is small
    big = f32(3.0, 4.0)  # norm 5 > 0.5
    clipped, _ = clip_gradients([big], "adaptive", 0.1, params=[bias])
    np.testing.assert_allclose(clipped[0], [0.3, 0.4], rtol=1e-6)


def test_adaptive_needs_params_and_none_passes_through():
    with pytest.raises(ValueError, match="params"):
        clip_gradients([f32(1.0)], "adaptive", 1.0)
    grads = [f32(100.0)]
    clipped, total = clip_gradients(grads, "none", 1.0)
    assert clipped[0] is grads[0] and total == 100.0


@pytest.mark.parametrize("mode", ["value", "norm", "global_norm", "adaptive"])
def test_out_lends_memory_without_changing_a_bit_or_the_identity_rule(mode):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((4, 3)).astype(np.float32), f32(0.01, -0.02, 0.03)]
    params = [rng.standard_normal((4, 3)).astype(np.float32), f32(1.0, 1.0, 1.0)]
    expected, expected_total = clip_gradients(grads, mode, 0.5, params)
    # views of the gradients' own memory, as the training loop lends them
    owned = [g.copy() for g in grads]
    clipped, total = clip_gradients(owned, mode, 0.5, params, out=[g.view() for g in owned])
    assert total == expected_total
    for c, e, g, o in zip(clipped, expected, grads, owned, strict=True):
        assert c.tobytes() == e.tobytes()
        assert (c is o) == (e is g)  # left alone: the very same array; clipped: another
    assert any(c is not o for c, o in zip(clipped, owned, strict=True))
