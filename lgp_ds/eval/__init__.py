"""Evaluation of pre-trained encoders the way the paper measures them (label subsets, kNN,
few-shot logistic regression); see each module."""
