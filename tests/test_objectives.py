"""MoCo v3 contrastive loss with all-gathered keys on 2 ranks vs the concatenated batch."""
import torch

import jobs
import reference
from multirank import run_ranks


def test_loss_with_gathered_keys_equals_single_process():
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(8, 16, generator=g) for _ in range(4))
    per_rank = run_ranks(jobs.contrastive_job, q1, q2, k1, k2, 0.2)
    want = (reference.ctr(q1, k2, 0.2) + reference.ctr(q2, k1, 0.2)).item()
    # each rank's loss is a mean over its own queries against all keys: their mean is the full one
    assert abs(sum(per_rank) / 2 - want) < 1e-5
    assert abs(per_rank[0] - per_rank[1]) > 1e-4  # the ranks really saw different queries
