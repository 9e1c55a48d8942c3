"""The per-layer measures of `analyze.py`, on feature matrices: linear CKA and linear probes.

NumPy only, and scikit-learn for the probes (imported when a probe is fit): no JAX, no models,
no files. `linear_cka(x, y)` is usable on its own (docs/analyze.md).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

PROBES = ('logistic', 'ridge')
_SMALL_PROBE = 100_000     # probe parameters (features x classes) fit on one BLAS thread


# Defined here, not in analyze.py (which imports it from here): a probe raises it too.
class AnalysisError(ValueError):
    """Bad input: a missing or unfinished run, or two runs that cannot be compared."""


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two feature matrices with the same rows (examples), in float64.

    Kornblith et al. 2019, feature-space form: with X and Y centred per column,
    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). Invariant to orthogonal transforms and
    isotropic scaling of either side; x and y may have different widths. NaN where a side has
    no variance (every example the same vector), where CKA is undefined.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f'linear_cka needs [n, d] matrices with the same n; got {x.shape} '
                         f'and {y.shape}')
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if denominator == 0:
        return math.nan
    return float(np.linalg.norm(y.T @ x) ** 2 / denominator)


def probe_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
               test_y: np.ndarray, *, kind: str = 'logistic',
               max_iter: int = 200) -> tuple[float, bool]:
    """Top-1 (%) on (test_x, test_y) of a linear classifier fit on standardised train features.

    `kind`: 'logistic' (multinomial logistic regression, L2, C = 1, L-BFGS) or 'ridge' (least
    squares on +-1 class targets, alpha = 1; closed form, much faster on wide layers).
    Returns (top-1, converged); a logistic fit that stops at `max_iter` is not converged.
    """
    # Imported here: scikit-learn takes seconds to import and only the probes need it.
    import threadpoolctl
    from sklearn import exceptions, linear_model, preprocessing

    if kind not in PROBES:
        raise ValueError(f'Unknown probe {kind!r}; allowed: {PROBES}')
    if len(np.unique(train_y)) < 2:
        raise AnalysisError('The probe training images hold fewer than 2 classes; raise '
                            '--probe_train_images')
    scaler = preprocessing.StandardScaler().fit(np.asarray(train_x, np.float64))
    train_x = scaler.transform(np.asarray(train_x, np.float64))
    test_x = scaler.transform(np.asarray(test_x, np.float64))
    converged = True
    if kind == 'logistic':
        # On small problems L-BFGS's per-iteration BLAS calls are tiny and threads only add
        # synchronisation: one thread fit a 256-d, 10-class probe 4x faster on 2 cores.
        small = train_x.shape[1] * len(np.unique(train_y)) < _SMALL_PROBE
        with warnings.catch_warnings(), threadpoolctl.threadpool_limits(1 if small else None):
            warnings.simplefilter('ignore', exceptions.ConvergenceWarning)
            classifier = linear_model.LogisticRegression(max_iter=max_iter).fit(train_x, train_y)
        converged = bool(np.all(classifier.n_iter_ < max_iter))
    else:
        classifier = linear_model.RidgeClassifier(alpha=1.0).fit(train_x, train_y)
    return 100.0 * float(np.mean(classifier.predict(test_x) == test_y)), converged
