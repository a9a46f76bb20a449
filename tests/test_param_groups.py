"""Stage-wise LR param groups on a real model, checked against the rule written out here."""
import pytest

import jobs
import reference
from lgp_ds.engine.param_groups import build_param_groups
from lgp_ds.models.moco import build_graft_model


@pytest.fixture
def model():
    return build_graft_model(jobs.tiny_config(depth=6), cross_rank_bn=False)


def test_every_trainable_parameter_in_exactly_one_group(model):
    lrs = [1.0, 2.0, 3.0]
    groups = build_param_groups(model, 6, lrs, 0.1)
    members = [id(p) for g in groups for p in g["params"]]
    assert len(members) == len(set(members))
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert set(members) == set(trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "base_encoder.pos_embed" in frozen and "base_encoder.patch_embed.proj.weight" in frozen
    for g in groups:
        s = int(g["name"][len("stage")]) - 1
        assert g["lr"] == lrs[s]
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_wd") else 0.1)
        for p in g["params"]:
            name = trainable[id(p)]
            assert reference.stage_of(name, 6, 3) == s, name
            assert reference.no_weight_decay(name, p) == g["name"].endswith("_no_wd"), name
    decayed = {trainable[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "base_encoder.cls_token" in decayed  # the official rule: only 1-D params are exempt
    names = {g["name"] for g in groups}
    assert names == {f"stage{s}{x}" for s in (1, 2, 3) for x in ("", "_no_wd")}


def test_stage_split_errors(model):
    with pytest.raises(ValueError, match="num_stages=4 does not divide the model depth 6"):
        build_param_groups(model, 6, [1.0] * 4, 0.1)
