"""Specifications of the aggregation kernels and the one-copy Array packing."""

import numpy as np
import pytest
from flwr.app import Array

from fl_app.records import array_view, to_array
from fl_app.strategies.aggregation import all_finite, axpy, update_and_squared_norm, weighted_sum


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_axpy_adds_in_place(dtype) -> None:
    acc = np.arange(6, dtype=dtype).reshape(2, 3)
    buffer = acc
    axpy(acc, 0.5, np.full((2, 3), 4.0, dtype=np.float64))
    assert acc is buffer and acc.dtype == dtype
    np.testing.assert_array_equal(acc, np.arange(6).reshape(2, 3) + 2.0)


def test_weighted_sum_matches_numpy_and_keeps_the_template_dtype() -> None:
    rng = np.random.default_rng(0)
    template = {"w": np.zeros((4, 5), np.float32), "b": np.zeros(5, np.float32)}
    replies = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in template.items()}
               for _ in range(7)]
    weights = rng.uniform(0.1, 2.0, size=7)
    out = weighted_sum(template, replies, list(weights))
    for key, ref in template.items():
        expected = sum(w * r[key].astype(np.float64) for w, r in zip(weights, replies, strict=True))
        assert out[key].dtype == ref.dtype
        np.testing.assert_allclose(out[key], expected, rtol=1e-5, atol=1e-6)
    assert all(np.all(v == 0) for v in weighted_sum(template, [], []).values())


def squared_norm(arrays, offset=None):
    scratch = {k: np.empty_like(v) for k, v in arrays.items()}
    return update_and_squared_norm(arrays, offset, scratch)[1]


def test_update_is_reply_minus_offset_and_its_norm_is_accurate_for_float32() -> None:
    rng = np.random.default_rng(1)
    size = 3_000_000  # one float32 running sum over it is off by ~1e-5 relative
    reply = {"a": rng.normal(size=size).astype(np.float32), "b": np.ones(3, np.float32)}
    offset = {"a": rng.normal(size=size).astype(np.float32), "b": np.zeros(3, np.float32)}
    scratch = {k: np.empty_like(v) for k, v in reply.items()}
    update, squared = update_and_squared_norm(reply, offset, scratch)
    np.testing.assert_array_equal(update["a"], reply["a"] - offset["a"])
    exact = sum(np.sum((reply[k].astype(np.float64) - offset[k]) ** 2) for k in reply)
    assert squared == pytest.approx(exact, rel=1e-6)
    same, plain = update_and_squared_norm(reply, None, {})
    assert same["a"] is reply["a"]  # no offset: the reply is the update, not copied
    assert plain == pytest.approx(sum(np.sum(v.astype(np.float64) ** 2)
                                      for v in reply.values()), rel=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_found_by_norm_and_by_check(bad) -> None:
    array = np.zeros(100_000, np.float32)
    array[77_777] = bad
    assert not np.isfinite(squared_norm({"a": array}))
    assert not all_finite(array)
    huge = np.full(10, 3e38, np.float32)  # finite, though its sum of squares overflows
    assert all_finite(huge)


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 5)), np.array(3.5),
    np.arange(5, dtype=np.int64), np.zeros((70, 70), np.float16), np.array([True, False]),
    np.arange(6, dtype=">i4"),
])
def test_to_array_holds_the_bytes_flowers_own_packing_would(array) -> None:
    ours, flowers = to_array(array), Array(array)
    assert (ours.data, ours.dtype, ours.shape, ours.stype) == (
        flowers.data, flowers.dtype, flowers.shape, flowers.stype)
    np.testing.assert_array_equal(array_view(ours), array)


def test_to_array_packs_a_non_contiguous_array_in_c_order() -> None:
    array = np.arange(6.0).reshape(2, 3).T
    np.testing.assert_array_equal(to_array(array).numpy(), array)
