"""Losses on 2 ranks vs the concatenated batch: MoCo v3 (all-gathered keys), VICReg (all-gathered
batch with gradient)."""
import pytest
import torch

import jobs
import reference
import vicreg_jobs
from lgp_ds import dist
from lgp_ds.objectives import vicreg_loss
from multirank import run_ranks_each


def _contrastive_inputs():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(8, 16, generator=g) for _ in range(4))  # q1, q2, k1, k2


def _vicreg_inputs():
    g = torch.Generator().manual_seed(0)
    z1, z2 = _views(g, 16, 12)
    x1, x2 = _views(g, 16, 6)
    w = torch.randn(6, 12, generator=g) * torch.linspace(0.3, 2.0, 12)
    gather_x = [torch.randn(3, 2, 5, generator=g) for _ in range(2)]
    gather_grad = [torch.randn(6, 2, 5, generator=g) for _ in range(2)]
    return dict(z1=z1, z2=z2, x1=x1, x2=x2, w=w, gather_x=gather_x, gather_grad=gather_grad)


@pytest.fixture(scope="module")
def two_ranks():
    """Per-rank results of the contrastive and the VICReg jobs, one start of the ranks."""
    return run_ranks_each([(jobs.contrastive_job, (*_contrastive_inputs(), 0.2)),
                           (vicreg_jobs.vicreg_job, tuple(_vicreg_inputs().values()))])


def test_loss_with_gathered_keys_equals_single_process(two_ranks):
    q1, q2, k1, k2 = _contrastive_inputs()
    per_rank = two_ranks[0]
    want = (reference.ctr(q1, k2, 0.2) + reference.ctr(q2, k1, 0.2)).item()
    # each rank's loss is a mean over its own queries against all keys: their mean is the full one
    assert abs(sum(per_rank) / 2 - want) < 1e-5
    assert abs(per_rank[0] - per_rank[1]) > 1e-4  # the ranks really saw different queries


# ---- VICReg --------------------------------------------------------------------------------
# References in float64 from the fp32 inputs, written from the paper's formulas (the official
# main_vicreg.py) without lgp_ds. The code under test runs in fp32, ~6e-8 relative rounding per
# operation over sums of at most B*D = 16*12 terms: its loss, terms and W gradient were measured
# within 1.4e-7 relative of float64, on 1 and 2 ranks alike. 1e-6 relative leaves room for other
# summation orders (BLAS, thread counts), while any formula slip (a biased variance, local
# centring, the diagonal in the covariance, an unsummed gathered gradient) moves them by >1e-2.

def _vicreg_reference(z1, z2, sim=25.0, std=25.0, cov=1.0):
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    terms = {"invariance": ((z1 - z2) ** 2).mean(), "variance": 0.0, "covariance": 0.0}
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        s = torch.sqrt(z.var(dim=0, unbiased=True) + 1e-4)
        # the hinge must not sit at its kink, where rounding could switch a feature on or off
        assert (1 - s).abs().min() > 1e-3
        terms["variance"] = terms["variance"] + torch.relu(1 - s).mean() / 2
        c = z.T @ z / (n - 1)
        terms["covariance"] = terms["covariance"] + (c[~torch.eye(d, dtype=torch.bool)] ** 2).sum() / d
    loss = sim * terms["invariance"] + std * terms["variance"] + cov * terms["covariance"]
    return loss, terms


def _views(g, n, d):
    """Two views [n, d]: feature scales 0.3..3 (the variance hinge on for some, off for others);
    the two halves of the batch have different means (local centring would be wrong)."""
    z1 = torch.randn(n, d, generator=g) * torch.linspace(0.3, 3.0, d) + 0.5
    z1[: n // 2] += torch.randn(d, generator=g)
    z2 = z1 + 0.5 * torch.randn(n, d, generator=g)
    return z1, z2


@pytest.fixture(scope="module")
def vicreg_two_ranks(two_ranks):
    return {**_vicreg_inputs(), "out": two_ranks[1]}


def test_vicreg_terms_equal_the_reference_on_one_process():
    g = torch.Generator().manual_seed(1)
    z1, z2 = _views(g, 16, 12)
    loss, terms = vicreg_loss(z1, z2, sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5)
    want_loss, want = _vicreg_reference(z1, z2, 2.0, 3.0, 0.5)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert set(terms) == {"invariance", "variance", "covariance"}
    for k, v in terms.items():
        assert v.dtype == torch.float32 and not v.requires_grad
        assert abs(v.item() - want[k].item()) <= 1e-6 * abs(want[k].item()), k
    assert want["variance"] > 5e-3  # the variance hinge is on for some features
    assert abs(loss.item() - want_loss.item()) <= 1e-6 * want_loss.item()


def test_vicreg_runs_in_fp32_on_bf16_inputs():
    g = torch.Generator().manual_seed(2)
    z1, z2 = (z.bfloat16().requires_grad_(True) for z in _views(g, 8, 4))
    loss, terms = vicreg_loss(z1, z2)
    want, _ = vicreg_loss(z1.detach().float(), z2.detach().float())
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())
    assert loss.item() == want.item()
    loss.backward()
    assert z1.grad.dtype == torch.bfloat16


def test_vicreg_refuses_bad_shapes():
    with pytest.raises(ValueError, match="one shape"):
        vicreg_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(torch.randn(1, 3), torch.randn(1, 3))


def test_vicreg_on_two_ranks_equals_the_concatenated_batch(vicreg_two_ranks):
    r = vicreg_two_ranks
    out = r["out"]
    want_loss, want = _vicreg_reference(r["z1"], r["z2"])
    # the mean of the ranks' losses (what the engine's gradient mean optimises) is the global loss
    assert all(o["loss_dtype"] == torch.float32 for o in out)
    assert abs(sum(o["loss"] for o in out) / 2 - want_loss.item()) <= 1e-6 * want_loss.item()
    for k in want:
        got = sum(o["terms"][k].item() for o in out) / 2
        assert abs(got - want[k].item()) <= 1e-6 * abs(want[k].item()), k
    # invariance is per rank (different samples); variance and covariance are global: equal
    assert abs(out[0]["terms"]["invariance"] - out[1]["terms"]["invariance"]) > 1e-3
    for k in ("variance", "covariance"):
        assert torch.allclose(out[0]["terms"][k], out[1]["terms"][k], rtol=1e-6, atol=0)
    # the test tells global from per-rank statistics: on its half alone a rank's differ
    for rank, o in enumerate(out):
        _, alone = _vicreg_reference(r["z1"][rank * 8:rank * 8 + 8], r["z2"][rank * 8:rank * 8 + 8])
        for k in ("variance", "covariance"):
            assert abs(o["terms"][k].item() - alone[k].item()) > 1e-2 * want[k].item(), k


def test_vicreg_gradient_averaged_over_two_ranks_equals_one_process(vicreg_two_ranks):
    r = vicreg_two_ranks
    w = r["w"].double().requires_grad_(True)
    loss, _ = _vicreg_reference(r["x1"].double() @ w, r["x2"].double() @ w)
    loss.backward()
    want = w.grad
    # measured 1.4e-7 relative to the largest entry (as fp32 on one process); without the sum
    # over ranks in all_gather_with_grad's backward the global terms' share is halved
    for o in r["out"]:  # both ranks hold the same averaged gradient
        err = (o["w_grad"].double() - want).abs().max().item()
        assert err <= 1e-6 * want.abs().max().item(), err


def test_all_gather_with_grad_on_two_ranks(vicreg_two_ranks):
    r = vicreg_two_ranks
    xs, grads = r["gather_x"], r["gather_grad"]
    for rank, o in enumerate(r["out"]):
        assert torch.equal(o["gathered"], torch.cat(xs))  # forward: the concatenation
        # backward: the output gradients summed over ranks, this rank's rows
        assert torch.allclose(o["gather_grad"], (grads[0] + grads[1])[rank * 3:(rank + 1) * 3],
                              rtol=1e-6, atol=1e-6)


def test_all_gather_with_grad_is_the_identity_on_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    y = dist.all_gather_with_grad(x)
    assert y is x
