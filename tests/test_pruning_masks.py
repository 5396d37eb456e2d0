import numpy as np
import pytest

from workers.pruning import magnitude_masks


@pytest.fixture
def tensors() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal((64, 48)), rng.standard_normal((48, 10)), rng.standard_normal(7)]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_layer_scope_prunes_the_exact_share_of_each_tensor(tensors, sparsity):
    for weight, keep in zip(tensors, magnitude_masks(tensors, sparsity=sparsity), strict=True):
        assert abs(int((~keep).sum()) - sparsity * weight.size) <= 1
        # the pruned ones are the smallest magnitudes
        if (~keep).any() and keep.any():
            assert np.abs(weight[~keep]).max() <= np.abs(weight[keep]).min()


def test_global_scope_uses_one_threshold_across_tensors(tensors):
    masks = magnitude_masks(tensors, sparsity=0.7, scope="global")
    total = sum(w.size for w in tensors)
    assert abs(sum(int((~m).sum()) for m in masks) - 0.7 * total) <= 1
    largest_pruned = max(np.abs(w[~m]).max() for w, m in zip(tensors, masks, strict=True))
    smallest_kept = min(np.abs(w[m]).min() for w, m in zip(tensors, masks, strict=True))
    assert largest_pruned <= smallest_kept
    shares = [1 - m.mean() for m in masks]
    assert max(shares) - min(shares) > 0.0  # tensors are not all cut alike


def test_ties_still_give_the_exact_count():
    weight = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    (keep,) = magnitude_masks([weight], sparsity=0.25)
    assert int((~keep).sum()) == 2
    (keep,) = magnitude_masks([weight], sparsity=0.75)
    assert int((~keep).sum()) == 6 and not keep[:4].any()


def test_threshold_prunes_exactly_magnitudes_at_or_below_it():
    weight = np.array([-0.3, -0.1, 0.0, 0.1, 0.2, 0.30001])
    (keep,) = magnitude_masks([weight], threshold=0.1)
    assert keep.tolist() == [True, False, False, False, True, True]


def test_exactly_one_of_sparsity_and_threshold():
    with pytest.raises(ValueError, match="exactly one"):
        magnitude_masks([np.ones(3)], sparsity=0.5, threshold=0.1)
