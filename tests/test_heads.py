"""Cross-rank BatchNorm and the VICReg expander on 2 ranks against BatchNorm1d over the
concatenated batch; head layouts."""
import pytest
import torch

import jobs
import vicreg_jobs
from lgp_ds.models.heads import CrossRankBatchNorm1d, build_expander, build_mlp
from multirank import run_ranks_each

MEANS_OVER_STD = [0.0, 300.0]


def _batchnorm(x, grad_out, weight, bias, dtype):
    """torch's BatchNorm1d over the whole batch in ``dtype``: output, input and affine gradients."""
    bn = torch.nn.BatchNorm1d(x.shape[1]).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    xr = x.to(dtype).requires_grad_(True)
    y = bn(xr)
    y.backward(grad_out.to(dtype))
    return {"y": y.detach().double(), "dx": xr.grad.double(),
            "daffine": torch.cat([bn.weight.grad, bn.bias.grad]).double()}


def _error(got: dict, want: dict) -> dict:
    return {k: (got[k].double() - want[k]).abs().max().item() for k in want}


def _batchnorm_inputs(mean_over_std):
    """x [512, 256] (std 1 per channel, mean ``mean_over_std``), grad_out, weight, bias."""
    g = torch.Generator().manual_seed(0)
    n, c = 512, 256
    x = torch.randn(n, c, generator=g) + mean_over_std
    grad_out = torch.randn(n, c, generator=g)
    return x, grad_out, torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)


def _expander_inputs():
    """x [16, 6] whose ranks' halves differ (local BN would be wrong), grad_out, dims, and the
    official layout's initial state dict (the cross-rank expander loads it: same keys)."""
    g = torch.Generator().manual_seed(0)
    dims = (6, 10, 8)
    x = torch.randn(16, 6, generator=g) * 2 + 1
    x[:8] += 3 * torch.randn(6, generator=g)
    grad_out = torch.randn(16, 8, generator=g)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in _official_expander(dims).state_dict().items()}
    return x, grad_out, dims, state


@pytest.fixture(scope="module")
def two_ranks():
    """Per-rank results of the batchnorm cases (by mean/std) and of the expander, one start."""
    calls = [(jobs.batchnorm_job, _batchnorm_inputs(m)) for m in MEANS_OVER_STD]
    *batchnorm, expander = run_ranks_each(calls + [(vicreg_jobs.expander_job, _expander_inputs())])
    return dict(zip(MEANS_OVER_STD, batchnorm)), expander


@pytest.mark.parametrize("mean_over_std", MEANS_OVER_STD)
def test_cross_rank_batchnorm_equals_batchnorm_over_the_global_batch(two_ranks, mean_over_std):
    x, grad_out, weight, bias = _batchnorm_inputs(mean_over_std)
    c = x.shape[1]
    out = two_ranks[0][mean_over_std]
    got = {"y": torch.cat([r["y"] for r in out]), "dx": torch.cat([r["dx"] for r in out]),
           "daffine": out[0]["daffine"]}

    # The exact answer is BatchNorm in float64 on the same fp32 input. "fp32 precision" is what
    # torch's own fp32 BatchNorm1d achieves against it (at mean/std 300: 1.4e-4 on the output);
    # the one-pass variance E[x^2] - E[x]^2 was 400x further off (6e-2).
    exact = _batchnorm(x, grad_out, weight, bias, torch.float64)
    fp32 = _error(_batchnorm(x, grad_out, weight, bias, torch.float32), exact)
    for key, err in _error(got, exact).items():
        assert err <= 2 * fp32[key] + 1e-6, (key, err, fp32[key])

    ref = torch.nn.BatchNorm1d(c).double()
    ref(x.double())
    for r in out:  # both ranks keep the running statistics of the global batch
        assert torch.allclose(r["running_mean"].double(), ref.running_mean, rtol=1e-6, atol=1e-6)
        assert torch.allclose(r["running_var"].double(), ref.running_var, rtol=1e-4, atol=1e-6)


# ---- VICReg expander ------------------------------------------------------------------------

@pytest.mark.parametrize("cross_rank_bn", [True, False])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_expander_layers_as_official_vicreg(num_layers, cross_rank_bn):
    expander = build_expander(6, 10, 8, num_layers=num_layers, cross_rank_bn=cross_rank_bn)
    bn = CrossRankBatchNorm1d if cross_rank_bn else torch.nn.BatchNorm1d
    want = [torch.nn.Linear, bn, torch.nn.ReLU] * (num_layers - 1) + [torch.nn.Linear]
    assert [type(m) for m in expander] == want
    linears = [m for m in expander if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == \
        list(zip([6] + [10] * (num_layers - 1), [10] * (num_layers - 1) + [8]))
    assert [m.bias is not None for m in linears] == [True] * (num_layers - 1) + [False]
    assert all(m.affine for m in expander if isinstance(m, torch.nn.BatchNorm1d))
    assert expander(torch.randn(5, 6)).shape == (5, 8)


def test_expander_refuses_zero_layers():
    with pytest.raises(ValueError, match="num_layers"):
        build_expander(6, 10, 8, num_layers=0)


def test_mlp_state_dict_keys_unchanged():
    """build_mlp shares its hidden layers with build_expander; checkpoints rely on these keys."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    want = (["0.weight"] + [f"1.{k}" for k in bn] + ["3.weight"] + [f"4.{k}" for k in bn]
            + ["6.weight"] + [f"7.{k}" for k in bn[2:]])
    mlp = build_mlp(3, 6, 10, 8)
    assert list(mlp.state_dict()) == want
    assert all(m.bias is None for m in mlp if isinstance(m, torch.nn.Linear))


def _official_expander(dims):
    """facebookresearch/vicreg's Projector with plain BatchNorm1d, written out."""
    i, h, o = dims
    return torch.nn.Sequential(
        torch.nn.Linear(i, h), torch.nn.BatchNorm1d(h), torch.nn.ReLU(True),
        torch.nn.Linear(h, h), torch.nn.BatchNorm1d(h), torch.nn.ReLU(True),
        torch.nn.Linear(h, o, bias=False))


def _run_reference(dims, state, x, grad_out, dtype):
    """The official expander with ``state`` in ``dtype`` over the whole batch: output, parameter
    gradients of sum(output * grad_out), and the smallest |ReLU input|."""
    model = _official_expander(dims)
    model.load_state_dict(state)
    model = model.to(dtype)
    pre_relu = []
    hooks = [m.register_forward_pre_hook(lambda m, i: pre_relu.append(i[0].detach().clone()))
             for m in model if isinstance(m, torch.nn.ReLU)]
    y = model(x.to(dtype))
    y.backward(grad_out.to(dtype))
    for hk in hooks:
        hk.remove()
    return ({"y": y.detach().double(),
             **{n: p.grad.double() for n, p in model.named_parameters()}},
            min(u.abs().min().item() for u in pre_relu))


def test_cross_rank_expander_equals_batchnorm_over_the_global_batch(two_ranks):
    x, grad_out, dims, state = _expander_inputs()
    out = two_ranks[1]
    got = {"y": torch.cat([r["y"] for r in out]), **out[0]["grads"]}

    # Exact answer: float64; "fp32 precision" is what the plain fp32 model achieves against it.
    exact, margin = _run_reference(dims, state, x, grad_out, torch.float64)
    assert margin > 1e-4  # no ReLU input near 0, where rounding would flip a unit's gradient
    fp32, _ = _run_reference(dims, state, x, grad_out, torch.float32)
    assert set(got) == set(exact)
    for k in exact:
        floor = (fp32[k] - exact[k]).abs().max().item()
        err = (got[k].double() - exact[k]).abs().max().item()
        # + 1e-6: the hidden biases' gradients are exactly 0 (BN removes them), rounding ~1e-7
        assert err <= 2 * floor + 1e-6, (k, err, floor)


# ---- two views in one pass ------------------------------------------------------------------

def test_views_in_one_pass_equal_a_pass_per_view():
    """GraftModel runs both views through the encoder and heads in one pass, BatchNorm per view
    (apply_to_views): the queries, every gradient and the running statistics are those of one pass
    per view, as the official MoCo v3 code makes them (fp32, in which the layer computes its
    statistics: only the order of summation differs; five BatchNorms in a row amplify its
    rounding to about 2e-6 of each tensor's largest entry)."""
    import copy

    from lgp_ds.models.moco import build_graft_model
    torch.manual_seed(0)
    model = build_graft_model(jobs.tiny_config()).train()
    apart = copy.deepcopy(model)
    x1, x2 = (torch.randn(6, 3, 16, 16) + i for i in range(2))
    q1, q2 = model(x1, x2)
    r1, r2 = (apart.predictor(apart.base_encoder(x)) for x in (x1, x2))
    g = torch.randn(2, *q1.shape)
    (q1 * g[0] + q2 * g[1]).sum().backward()
    (r1 * g[0] + r2 * g[1]).sum().backward()
    close = lambda a, b: (a - b).abs().max() <= 1e-5 * b.abs().max()  # noqa: E731
    assert close(q1, r1) and close(q2, r2)
    grads = [torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad])
             for m in (model, apart)]  # as one vector: some are 0 but for rounding (norm.bias)
    assert close(*grads)
    # two BN calls' worth of running statistics (one vector: a BN's input that a BN made has
    # running means of 0 but for rounding)
    stats = [torch.cat([b.flatten().float() for n, b in m.named_buffers() if "running" in n])
             for m in (model, apart)]
    assert close(*stats)
    counts = [[int(b) for n, b in m.named_buffers() if n.endswith("num_batches_tracked")]
              for m in (model, apart)]
    assert counts[0] == counts[1] == [2] * len(counts[0])
    assert all(not hasattr(m, "views") or m.views == 1 for m in model.modules()
               if isinstance(m, CrossRankBatchNorm1d))  # the block left them as they were


def test_views_in_one_pass_refuse_what_would_mix_them():
    """Plain BatchNorm (its statistics would cover both views) and views of two shapes (the
    stacked batch would be split wrongly) are refused; a pass per view takes either."""
    from lgp_ds.models.moco import build_graft_model
    model = build_graft_model(jobs.tiny_config(), cross_rank_bn=False)
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(ValueError, match=r"2 views in one pass: base_encoder.head.1 is a "
                                         r"BatchNorm1d, which would normalise them together"):
        model(x, x)
    model.one_pass = False  # the official style: a pass per view
    assert [q.shape for q in model(x, x[:2])] == [(4, 16), (2, 16)]
    with pytest.raises(ValueError, match=r"views in one pass must have one shape, got "
                                         r"\[\[4, 3, 16, 16\], \[2, 3, 16, 16\]\]"):
        build_graft_model(jobs.tiny_config())(x, x[:2])
