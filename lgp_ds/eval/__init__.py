"""Evaluation of pre-trained encoders the way the paper measures them: frozen features of any
checkpoint (features), kNN (knn; online during pre-training: monitor), few-label logistic
regression (fewshot), the multi-head linear probe (linear), all of them over encoders
(protocols) and the results table (report). Fine-tuning is a method: lgp_ds.methods.finetune."""
