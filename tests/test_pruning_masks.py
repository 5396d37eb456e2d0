from collections.abc import Sequence

import numpy as np
import pytest
from helpers import reference_masks

from workers.nn.masks import CHUNK, magnitude_masks


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
    masks = list(magnitude_masks(tensors, sparsity=0.7, scope="global"))
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


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.999, 1.0])
def test_masks_equal_the_plain_partition_across_chunks_ties_and_dtypes(scope, sparsity):
    rng = np.random.default_rng(7)
    # more elements than one CHUNK, so the passes cross chunk boundaries; rounding to a few
    # levels makes many ties, straddling tensors; zeros and -0.0 share a bucket
    big = np.round(rng.standard_normal(CHUNK + 12344) * 4).astype(np.float32) / 4
    weights = [
        big.reshape(-1, 15),
        np.round(rng.standard_normal((33, 7)), 1),  # float64
        np.round(rng.standard_normal(300), 2).astype(np.float16),
        np.array([-0.0, 0.0, 1e-30, -1e-30, 3e38], dtype=np.float32),
        # float64 magnitudes that float32 cannot tell apart (the buckets' precision), and
        # beyond float32's range
        np.array([1.0, 1.0 + 1e-12, -(1.0 - 1e-12), 1.0 + 2e-12, 1e300, -1e300, 0.5]),
    ]
    got = list(magnitude_masks(weights, sparsity=sparsity, scope=scope))
    for keep, expected in zip(got, reference_masks(weights, sparsity, scope), strict=True):
        assert keep.shape == expected.shape
        assert np.array_equal(keep, expected)


def test_masks_read_a_lazy_sequence_one_tensor_at_a_time():
    rng = np.random.default_rng(3)
    stored = [rng.standard_normal((40, 30)).astype(np.float32) for _ in range(3)]
    loaded: list[int] = []

    class Lazy(Sequence):
        def __len__(self) -> int:
            return len(stored)

        def __getitem__(self, index):
            if isinstance(index, slice):
                raise TypeError
            if not -len(stored) <= index < len(stored):
                raise IndexError(index)
            loaded.append(index)
            return stored[index].copy()

    masks = list(magnitude_masks(Lazy(), sparsity=0.6, scope="global"))
    expected = reference_masks(stored, 0.6, "global")
    assert all(np.array_equal(a, b) for a, b in zip(masks, expected, strict=True))
    assert len(loaded) == 3 * len(stored)  # histogram, bucket and mask passes; nothing more


def test_a_scalar_weight_tied_at_the_cut_is_pruned_like_any_other():
    # 0-d weights (a scalar constant picked by include): before masks were made in chunks the
    # tie was pruned in a copy of a 0-d mask, and one weight too few was pruned
    weights = [
        np.array(0.5, np.float32),
        np.array(-1.0, np.float32),
        np.array([[0.1, 0.2], [0.3, 0.4]], np.float32),
        np.array(0.05, np.float32),
    ]
    masks = list(magnitude_masks(weights, sparsity=0.9, scope="global"))
    assert [mask.shape for mask in masks] == [weight.shape for weight in weights]
    assert sum(int((~mask).sum()) for mask in masks) == 6  # round(0.9 * 7)
    assert masks[1] and not masks[0]
