"""Models built partitioned under ZeRO-3 (deepspeed.zero.Init) on 2 real ranks: each rank holds
half of every tensor, and gathered they are the models built whole in one process, bit for bit."""
import pytest
import torch
from deepspeed.utils import z3_leaf_module

import jobs
from lgp_ds.engine.construct import build_model, gather_blocks_whole
from lgp_ds.methods import build_method
from method_jobs import METHODS
from multirank import run_ranks

NAMES = ["graft", "mae", "mtl", "graft_vicreg"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    init = tmp_path_factory.mktemp("init") / "mae_encoder.pth"
    cfg = jobs.tiny_config()
    encoder = build_model(build_method(cfg), cfg).base_encoder  # any encoder of the tiny shape
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)  # weights no construction gives
    torch.save({"model": encoder.state_dict()}, init)
    return run_ranks(jobs_entry, NAMES, str(init)), encoder.state_dict()


def jobs_entry(names, init):
    import construct_jobs
    return construct_jobs.built_job(names, init)


@pytest.mark.parametrize("name", NAMES)
def test_partitioned_model_is_the_whole_model_split(built, name):
    ranks, _ = built
    cfg = jobs.tiny_config(**{k: v for k, v in METHODS[name].items() if k != "init"})
    whole = dict(build_model(build_method(cfg), cfg).named_parameters())
    for got in (r[name] for r in ranks):
        # built in fp32 (the trainer keeps its exact values as the masters, then casts)
        assert got["dtypes"] == {torch.float32}
        # each rank holds its half (padded to divide evenly), never the whole
        assert got["held"] <= got["numel"] / 2 + 2 * len(whole)
        assert got["weights"].keys() == whole.keys()
        for n, p in whole.items():
            if name == "graft" and n.startswith("base_encoder.") and not n.startswith(
                    "base_encoder.head."):
                continue  # replaced by the init= weights, checked below
            assert torch.equal(got["weights"][n], p.detach()), n


def test_init_weights_load_into_partitions(built):
    ranks, state = built
    for r in ranks:
        for k, v in state.items():
            if not k.startswith("head."):
                assert torch.equal(r["graft"]["weights"][f"base_encoder.{k}"], v), k


def _leaves(model) -> list[str]:
    gather_blocks_whole(model)
    return [n for n, m in model.named_modules() if z3_leaf_module(m)]


def test_blocks_are_gathered_whole_where_their_input_needs_a_gradient():
    """ZeRO 3's gather per block (a DeepSpeed leaf module) holds for every block whose input
    needs a gradient, and for frozen ones; not for a trainable block fed only by frozen ones,
    whose gradients would come after DeepSpeed reduced them (a shape error in backward)."""
    blocks = [f"base_encoder.blocks.{i}" for i in range(3)]
    model = build_model(build_method(jobs.tiny_config()), jobs.tiny_config())
    assert _leaves(model) == blocks  # everything trains: the embeddings feed block 0
    model = build_model(build_method(jobs.tiny_config()), jobs.tiny_config())
    model.base_encoder.patch_embed.requires_grad_(False)  # MoCo v3's frozen patch projection:
    assert _leaves(model) == blocks  # the cls token still feeds block 0
    for frozen in (1, 2):  # the embeddings and the lowest blocks frozen (mim2cl_frozen, cl2mim)
        model = build_model(build_method(jobs.tiny_config()), jobs.tiny_config())
        encoder = model.base_encoder
        for m in (encoder.patch_embed, encoder.cls_token, encoder.pos_embed,
                  *encoder.blocks[:frozen]):
            m.requires_grad_(False)
        assert _leaves(model) == blocks[:frozen] + blocks[frozen + 1:]
    model = build_model(build_method(jobs.tiny_config()), jobs.tiny_config())
    model.base_encoder.blocks[1].attn.requires_grad_(False)  # a block of both kinds: never;
    assert _leaves(model) == [blocks[0], blocks[2]]  # its output still needs a gradient
    cfg = jobs.tiny_config(**{**METHODS["mae"], "decoder_depth": 2})
    model = build_model(build_method(cfg), cfg)  # MAE: the decoder's blocks too
    assert _leaves(model) == ["blocks.0", "blocks.1", "blocks.2", "decoder_blocks.0",
                              "decoder_blocks.1"]
