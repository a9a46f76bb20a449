"""Few-shot evaluation on frozen features: multinomial logistic regression with an L2 penalty.

The paper's 1% protocol (after SimCLR): features of the labelled subset, no augmentation; the
penalty is chosen on a held-out, class-stratified part of the subset, then the classifier is fit
on the whole subset with it and scored top-1 on the validation set.
"""
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

# Inverse L2 strengths (scikit-learn's C) tried by default: weak to strong regularisation.
PENALTIES = (100.0, 10.0, 1.0, 0.1, 0.01)


def _fit(x, y, c: float, seed: int):
    """Standardise, then fit the multinomial (softmax) model; the scaler rides with it."""
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(scaler.transform(x), y)
    return lambda z: model.predict(scaler.transform(z))


def check_subset(labels, holdout: float = 0.2) -> None:
    """ValueError unless the labelled subset (labels [N]) can hold out a class-stratified
    ``holdout`` share for the penalty sweep: every class at least twice, and at least one image
    of every class on both sides (scikit-learn's stratified split)."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    if not len(classes):
        raise ValueError("the labelled subset is empty")
    n_test = int(np.ceil(holdout * len(labels)))
    if counts.min() < 2 or min(n_test, len(labels) - n_test) < len(classes):
        raise ValueError(
            f"{len(labels)} labelled images of {len(classes)} classes (class "
            f"{classes[counts.argmin()]} has {counts.min()}) are too few for the penalty sweep, "
            f"which holds out {holdout:.0%} of them with every class on both sides: it needs "
            f"at least {int(np.ceil(len(classes) / holdout))} images and 2 of every class")


def logistic_regression(train_x, train_y, test_x, test_y, penalties=PENALTIES,
                        holdout: float = 0.2, seed: int = 0) -> dict:
    """Top-1 (%) of L2 logistic regression on features [N, D] / labels [N] (numpy or torch).

    Returns {"top1", "C" (the chosen inverse penalty), "holdout_top1" {C: accuracy}}.
    """
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    check_subset(train_y, holdout)
    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=holdout,
                                                  stratify=train_y, random_state=seed)
    scores = {c: 100.0 * float((_fit(fit_x, fit_y, c, seed)(val_x) == val_y).mean())
              for c in penalties}
    best = max(penalties, key=lambda c: (scores[c], -c))  # ties: the stronger penalty
    top1 = 100.0 * float((_fit(train_x, train_y, best, seed)(test_x) == test_y).mean())
    return {"top1": top1, "C": best, "holdout_top1": scores}
