"""The paper's analyses of a pre-trained ViT, on any checkpoint :func:`lgp_ds.convert.read` reads.

    grad_conflict       Figure 1: cosine between the MIM and CL gradients of each block
    attention_distance  Figure 7: mean attention distance of each head of each block
    vic                 Figure 6: variance, invariance, covariance of each block's output
    tsne                Figure 3: t-SNE of frozen features, coloured by class

Each module keeps its computation (tensors in, numbers out) apart from reading data and
writing files; :mod:`.output` writes the JSON and PNG on rank 0. ``tools/analyze.py`` is the
command.
"""
