"""Array comparisons for tests that fail on NaN or inf instead of matching them.

``np.testing.assert_allclose`` counts NaN as equal to NaN, and ``not allclose`` holds for any
NaN, so a model whose maps all turned NaN would pass both kinds of check silently.
"""
import numpy as np


def _finite(name, values):
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values)
    assert not bad.any(), f"{name} holds {int(bad.sum())} non-finite values"
    return values


def assert_close(actual, expected, rtol=1e-7, atol=0.0):
    """Both arrays finite and equal within ``rtol``/``atol`` (as ``np.testing.assert_allclose``)."""
    np.testing.assert_allclose(_finite("actual", actual), _finite("expected", expected),
                               rtol=rtol, atol=atol)


def assert_apart(a, b, atol, rtol=0.0):
    """Both arrays finite, and somewhere further apart than ``atol``/``rtol`` (``not allclose``)."""
    assert not np.allclose(_finite("a", a), _finite("b", b), rtol=rtol, atol=atol), \
        "the arrays are equal within the tolerance"
