"""Layer-wise reconstruction and the Wanda criterion (issue 16): the NumPy maths against direct
solves and hand-computed masks."""

import numpy as np
import pytest

from workers.nn.reconstruct import (
    LayerInputs,
    accumulate_gram,
    corrected_target,
    damped,
    im2col,
    least_squares,
    obs_update,
    output_errors,
    reconstruct,
    row_masks,
    wanda_scores,
)


def layer(seed: int, out: int = 6, width: int = 10, rows: int = 200) -> tuple[np.ndarray, ...]:
    """W [out, in], X [rows, in] with correlated inputs of unequal scale, H = XᵀX."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, width)) @ rng.standard_normal((width, width))
    x *= rng.uniform(0.1, 3.0, width)
    w = rng.standard_normal((out, width))
    return w, x, x.T @ x


def direct_lstsq(w: np.ndarray, x: np.ndarray, keep: np.ndarray, damp: float) -> np.ndarray:
    """Each row by numpy.linalg.lstsq on [X_S; sqrt(λ) I_S] against [X w; sqrt(λ) w]: the
    dampened least-squares problem written out, not through H."""
    new = np.zeros_like(w)
    for r in range(len(w)):
        kept = np.flatnonzero(keep[r])
        a = np.vstack([x[:, kept], np.sqrt(damp) * np.eye(w.shape[1])[:, kept]])
        b = np.concatenate([x @ w[r], np.sqrt(damp) * w[r]])
        new[r, kept] = np.linalg.lstsq(a, b, rcond=None)[0]
    return new


def test_least_squares_matches_a_direct_lstsq_solve():
    w, x, h = layer(0)
    keep = np.random.default_rng(1).random(w.shape) > 0.5
    keep[2] = keep[0]  # rows with equal counts share a batched solve
    damp = 0.01 * np.diag(h).mean()
    solved = least_squares(w, h, keep, tolerance=1e-13)
    np.testing.assert_allclose(solved, direct_lstsq(w, x, keep, damp), atol=1e-8)


def test_obs_update_matches_lstsq_when_pruned_weights_come_first():
    # SparseGPT freezes each column once it has passed it; when every row's pruned weights come
    # before its kept ones, nothing kept is frozen early and OBS is the exact optimum.
    w, x, h = layer(2)
    prefix = np.array([0, 3, 5, 2, 7, 4])
    keep = np.arange(w.shape[1])[None, :] >= prefix[:, None]
    damp = 0.01 * np.diag(h).mean()
    expected = direct_lstsq(w, x, keep, damp)
    np.testing.assert_allclose(obs_update(w, h, keep, block=3), expected, atol=1e-8)
    np.testing.assert_allclose(obs_update(w, h, keep, block=128), expected, atol=1e-8)


def test_obs_update_zeroes_the_pruned_weights_and_lowers_the_error():
    w, _, h = layer(3, out=8, width=40)
    keep = row_masks(wanda_scores(w, h), 0.5)
    new = obs_update(w, h, keep, block=16)
    assert not new[~keep].any()
    masked = np.where(keep, w, 0.0)
    same = LayerInputs.unchanged(h)
    assert output_errors(w, new, same).sum() < output_errors(w, masked, same).sum()


def test_wanda_mask_against_a_hand_computed_one():
    # Input norms 1, 3, 0.5, 2 (H's diagonal 1, 9, 0.25, 4): score |w| · norm.
    h = np.diag([1.0, 9.0, 0.25, 4.0])
    w = np.array([[4.0, 1.0, 8.0, 1.0], [-1.0, 0.5, 2.0, -3.0]])
    # row 0 scores 4, 3, 4, 2 -> drop 2 and 3 (positions 3, 1); row 1: 1, 1.5, 1, 6 -> drop the
    # two 1s (positions 0 and 2; the tie goes by position)
    expected = np.array([[True, False, True, False], [False, True, False, True]])
    np.testing.assert_array_equal(row_masks(wanda_scores(w, h), 0.5), expected)
    # by magnitude alone row 0 would drop positions 1 and 3 as well, row 1 positions 0 and 1:
    # the activation norms change the choice
    assert not np.array_equal(row_masks(np.abs(w), 0.5), expected)


def shifted_inputs(seed: int, x: np.ndarray) -> LayerInputs:
    """X and X̃ = X plus noise, as a layer's inputs drift once the layers before it are pruned."""
    noisy = x + 0.3 * np.random.default_rng(seed).standard_normal(x.shape) * x.std(axis=0)
    return LayerInputs(noisy.T @ noisy, noisy.T @ x, x.T @ x)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sparsity", [0.3, 0.6, 0.9])
def test_reconstruction_never_raises_the_layer_error(seed, sparsity):
    w, x, h = layer(seed, out=12, width=24, rows=30)  # rows ~ width: a poorly conditioned H
    rng = np.random.default_rng(seed + 100)
    for inputs in (LayerInputs.unchanged(h), shifted_inputs(seed, x)):
        for keep in (row_masks(wanda_scores(w, h), sparsity), rng.random(w.shape) > sparsity):
            done = reconstruct(w, inputs, keep)
            assert done.lost_after <= done.lost_before
            masked = np.where(keep, w, 0.0)
            after, before = output_errors(w, done.weight, inputs), output_errors(w, masked, inputs)
            assert (after <= before + 1e-9 * done.base).all()
            assert not done.weight[~keep].any()


def test_the_corrected_target_makes_up_for_drifted_inputs():
    # With X̃ != X, the best dense weights on X̃ are not W: W* is, by a direct lstsq of X̃ W*ᵀ
    # against X Wᵀ (plus the damping rows), and reconstructing toward it loses less than
    # reconstructing toward W as SparseGPT's ‖W X̃ - Ŵ X̃‖ would.
    w, x, _ = layer(7, out=5, width=8)
    inputs = shifted_inputs(7, x)
    noisy = x + 0.3 * np.random.default_rng(7).standard_normal(x.shape) * x.std(axis=0)
    damp = 0.01 * np.diag(inputs.gram).mean()
    a = np.vstack([noisy, np.sqrt(damp) * np.eye(8)])
    b = np.vstack([x @ w.T, np.sqrt(damp) * w.T])
    expected = np.linalg.lstsq(a, b, rcond=None)[0].T
    np.testing.assert_allclose(corrected_target(w, inputs, 0.01), expected, atol=1e-8)
    keep = row_masks(wanda_scores(w, inputs.gram), 0.5)
    toward_w = least_squares(w, inputs.gram, keep)
    done = reconstruct(w, inputs, keep)
    assert done.lost_after < output_errors(w, toward_w, inputs).sum()


def test_reconstruction_is_deterministic():
    w, x, h = layer(4, out=16, width=32)
    keep = row_masks(wanda_scores(w, h), 0.5)
    inputs = shifted_inputs(4, x)
    first = reconstruct(w, inputs, keep)
    second = reconstruct(w.copy(), shifted_inputs(4, x.copy()), keep.copy())
    np.testing.assert_array_equal(first.weight, second.weight)
    assert first.lost_after == second.lost_after


def test_gram_accumulates_in_chunks_to_the_full_product(monkeypatch):
    x = np.random.default_rng(5).standard_normal((1000, 7)).astype(np.float32)
    monkeypatch.setattr("workers.nn.reconstruct.ROWS_PER_CHUNK", 64)
    gram = np.zeros((7, 7))
    accumulate_gram(gram, x[:500])
    accumulate_gram(gram, x[500:])
    np.testing.assert_allclose(gram, x.astype(np.float64).T @ x, rtol=1e-12)


def test_im2col_rows_times_the_weight_are_the_convolution():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 7, 6))
    w = rng.standard_normal((4, 3, 3, 2))
    cols = im2col(x, (3, 2), strides=(2, 1), pads=(1, 0, 1, 1), dilations=(1, 2))
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 1)))
    oh, ow = (9 - 3) // 2 + 1, (7 - 3) // 1 + 1
    direct = np.zeros((2, 4, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = padded[:, :, 2 * i : 2 * i + 3, j : j + 3 : 2]  # dilation 2 on the width
            direct[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w)
    got = (cols @ w.reshape(4, -1).T).reshape(2, oh, ow, 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, direct, atol=1e-12)


def test_damping_is_one_percent_of_the_mean_diagonal():
    h = np.diag([1.0, 3.0])
    np.testing.assert_allclose(damped(h), np.diag([1.02, 3.02]))
