"""MIA-efficacy (SalUn / l1-sparse): how much of the forget set a membership attack calls non-member.

Feature: the model's softmax confidence of the true label. An SVC (RBF, C = 3) learns retain
(member) vs test (non-member) on balanced samples; MIA = 100 x share of the forget set predicted
non-member. Retrain has MIA near 100 on a forgotten class (it never saw it).
"""

from __future__ import annotations

import numpy as np

SVC_C = 3.0  # SalUn's setting
MAX_PER_SIDE = 5000  # cap on SVC training rows per side: SVC cost grows quadratically


def true_label_confidence(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    return probs[np.arange(len(y)), y]


def mia_efficacy(p_retain: np.ndarray, y_retain: np.ndarray, p_test: np.ndarray, y_test: np.ndarray,
                 p_forget: np.ndarray, y_forget: np.ndarray, seed: int = 0) -> float:
    """Percent of forget samples the attack predicts as non-members."""
    if len(y_forget) == 0 or len(y_test) == 0 or len(y_retain) == 0:
        return float("nan")
    return mia_from_confidences(true_label_confidence(p_retain, y_retain), true_label_confidence(p_test, y_test),
                                true_label_confidence(p_forget, y_forget), seed=seed)


def mia_from_confidences(c_retain: np.ndarray, c_test: np.ndarray, c_forget: np.ndarray, seed: int = 0) -> float:
    """The same attack from the true-label confidences alone (what workers gather for it)."""
    from sklearn.svm import SVC

    if len(c_forget) == 0 or len(c_test) == 0 or len(c_retain) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    n = min(len(c_retain), len(c_test), MAX_PER_SIDE)
    r_idx = rng.choice(len(c_retain), n, replace=False)
    t_idx = rng.choice(len(c_test), n, replace=False)
    feats = np.concatenate([c_retain[r_idx], c_test[t_idx]])[:, None]
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    clf = SVC(C=SVC_C, gamma="auto", kernel="rbf")
    clf.fit(feats, labels)
    pred = clf.predict(np.asarray(c_forget)[:, None])
    return float(100.0 * np.mean(pred == 0))
