"""Distance-to-MIM anchor on 2 ranks vs autograd on the full tensors in one process."""
import re

import pytest
import torch

import jobs
import reference
from multirank import run_ranks

# (zero stage, norm, bf16, option); under bf16 the l1 gradient (+-weight) is exact in the bf16
# buffer; with ZeRO-Offload the masters and the gradients the CPU optimizer reads are on the host
CASES = [(stage, norm, False, "") for stage in (1, 2, 3) for norm in ("l1", "l2")] + [
    (2, "l1", True, ""), (2, "l2", False, "offload"), (3, "l2", False, "offload")]
WEIGHT, BLOCKS = 0.5, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("anchor")
    cfg = jobs.tiny_config()
    g = torch.Generator().manual_seed(7)
    mim = {k.removeprefix("base_encoder."): v + 0.01 * torch.randn(v.shape, generator=g)
           for k, v in reference.initial_weights(cfg).items()
           if k.startswith("base_encoder.") and not k.startswith("base_encoder.head.")}
    torch.save({"model": mim}, tmp / "mim.pth")
    return run_ranks(jobs.anchor_job, CASES, str(tmp / "mim.pth"), str(tmp)), mim


def _anchored(name: str) -> bool:
    m = re.match(r"base_encoder\.blocks\.(\d+)\.", name)
    return (m is not None and int(m.group(1)) < BLOCKS) or \
        re.match(r"base_encoder\.(cls_token|pos_embed|patch_embed\.)", name) is not None


@pytest.mark.parametrize("case", CASES, ids=[f"zero{s}-{norm}" + ("-bf16" if bf16 else "")
                                             + (f"-{option}" if option else "")
                                             for s, norm, bf16, option in CASES])
def test_value_and_gradient_equal_full_tensor_computation(runs, case):
    out, mim = runs
    norm = case[1]
    got = out[0][case]
    weights = {k: v.clone().requires_grad_(True) for k, v in got["weights"].items()}
    penalty = sum(torch.linalg.vector_norm(p - mim[k.removeprefix("base_encoder.")],
                                           ord=1 if norm == "l1" else 2)
                  for k, p in weights.items() if _anchored(k)) * WEIGHT
    penalty.backward()
    # fp32 sums over a few thousand elements in another order: ~1e-6 relative
    assert abs(got["value"] - penalty.item()) <= 1e-5 * penalty.item()
    assert penalty.item() > 0
    for k, p in weights.items():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(got["grads"][k].float(), want, rtol=1e-5, atol=1e-7), k
        assert torch.equal(out[1][case]["grads"][k], got["grads"][k]), k


def test_zero3_keeps_only_a_shard_of_the_mim_copy(runs):
    out, mim = runs
    anchored = sum(v.numel() for k, v in mim.items()
                   if _anchored("base_encoder." + k) and k not in ("pos_embed",)
                   and not k.startswith("patch_embed."))  # frozen: not anchored
    held = [rank[(3, "l2", False, "")]["reference_numel"] for rank in out]
    assert sum(held) >= anchored and max(held) < 0.6 * anchored
