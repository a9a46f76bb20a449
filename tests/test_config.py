"""Recipes, overrides and the DeepSpeed config: every bad input names what is wrong."""
import json
import os

import pytest

from lgp_ds.config import RECIPES_DIR, build_config, load_config, parse_overrides
from lgp_ds.ds_config import load_run_config, precision, resolve_ds_config


RECIPES = sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_bundled_recipes_load(recipe):
    cfg = load_config(recipe, [] if recipe.startswith("digits_") else ["init=weights.pth"])
    assert len(cfg.stage_blrs) == cfg.num_stages
    assert (recipe.startswith("digits_") or cfg.samples_per_epoch == 1281167  # ImageNet-1k
            or cfg.subset == "10percent.txt")  # SimCLR's 10% of it: an epoch is the subset


def test_recipes_extend_others(tmp_path):
    mae_b, mae_l = load_config("vit_b_mae", []), load_config("vit_l_mae", [])
    assert (mae_l.arch, mae_l.grad_ckpt, mae_l.betas) == ("vit_large_patch16_224", True, [0.9, 0.95])
    assert mae_l.to_dict() | {"arch": 0, "grad_ckpt": 0, "output_dir": 0} == \
        mae_b.to_dict() | {"arch": 0, "grad_ckpt": 0, "output_dir": 0}
    (tmp_path / "a.yaml").write_text("extends: b.yaml\ntau: 0.3\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match="'extends' goes round in a circle"):
        load_config(str(tmp_path / "a.yaml"), [])


def test_vit_l_recipe_is_the_papers():
    cfg = load_config("vit_l_graft", ["init=mae_vit_l.pth"])
    assert (cfg.batch_size, cfg.anchor_weight, cfg.anchor_blocks) == (2080, 1e-5, 12)
    assert cfg.stage_blrs == [1.5e-5, 1.5e-5, 1.5e-4]


def test_overrides_are_typed():
    cfg = load_config(None, ["tau=0.1", "stage_blrs=[1e-4, 1e-4, 1e-3]", "data=a-{0..3}.tar",
                             "samples_per_epoch=100", "max_steps=5"])
    assert cfg.tau == 0.1 and cfg.stage_blrs == [1e-4, 1e-4, 1e-3] and cfg.data == ["a-{0..3}.tar"]
    assert parse_overrides(["data={a,b}-{0..9}.tar"]) == {"data": "{a,b}-{0..9}.tar"}  # not YAML
    assert parse_overrides(["data=['a-{0..9}.tar', 'b-*.tar']"]) == {
        "data": ["a-{0..9}.tar", "b-*.tar"]}
    # YAML reads {a.tar,b.tar} as a mapping; no key takes one, so it is the brace pattern it looks
    cfg = load_config(None, ["data={a.tar,b.tar}", "samples_per_epoch=10"])
    assert cfg.data == ["{a.tar,b.tar}"]


def test_list_override_with_unquoted_patterns_says_how_to_write_it():
    with pytest.raises(ValueError, match=r"data=\[a-\{0..9\}.tar, b.tar\]'?: not a valid YAML list"
                                         r".*quote each item"):
        parse_overrides(["data=[a-{0..9}.tar, b.tar]"])


@pytest.mark.parametrize("values,message", [
    ({"lr": 1.0}, "unknown config key 'lr'"),
    ({"stage_blr": [1.0]}, "did you mean 'stage_blrs'"),
    ({"tau": "warm"}, "tau='warm': Input should be a valid number"),
    ({"epochs": 1.5}, "epochs=1.5: Input should be a valid integer"),
    ({"fused_attn": 1}, "fused_attn=1: Input should be a valid boolean"),
    ({"max_steps": True}, "max_steps=True: expected int, not a boolean"),
    ({"betas": [0.9]}, r"betas=\[0.9\]: List should have at least 2 items"),
    ({"betas": [0.9, 1.0]}, r"betas\[1\]=1.0: Input should be less than 1"),
    ({"method": "byol"}, "method='byol': Input should be 'graft', 'moco', 'mae'"),
    ({"method": "mae", "anchor_weight": 1e-5}, "anchor_weight=1e-05 pulls towards MIM weights"),
    ({"method": "cl2mim", "frozen_stages": 1}, "init=None must name the weights"),
    ({"method": "mim2cl_frozen", "init": "x.pth"}, "frozen_stages=0 must be positive"),
    ({"method": "mae", "frozen_patch_embed": False, "grad_ckpt": "auto"},
     "grad_ckpt='auto' sizes checkpointing with the grafting step's memory model"),
    ({"grad_ckpt": "some"}, "grad_ckpt.*='some'.*Input should be 'auto'"),
    ({"frozen_stages": 3}, "frozen_stages=3 must be below num_stages=3"),
    ({"method": "mae"}, "frozen_patch_embed=True would keep MAE's patch projection at its random"),
    ({"decoder_num_heads": 5}, "decoder_embed_dim=512 is not divisible by decoder_num_heads=5"),
    ({"decoder_embed_dim": 66, "decoder_num_heads": 2}, "decoder_embed_dim=66 must be a multiple"),
    ({"embed_dim": 100, "num_heads": 3}, "embed_dim=100 is not divisible by num_heads=3"),
    ({"stage_blrs": [1e-4, 1e-3]}, "stage_blrs=.* has 2 values but num_stages=3"),
    ({"max_steps": 0}, "max_steps=0: Input should be greater than 0"),
    ({"max_corrupt_run": 0}, "max_corrupt_run=0: Input should be greater than 0"),
    ({"max_steps": -1}, "max_steps=-1: Input should be greater than 0"),
    ({"anchor_blocks": -2}, "anchor_blocks=-2: Input should be greater than or equal to 0"),
    ({"warmup_epochs": 50, "epochs": 10}, "warmup_epochs=50 exceeds epochs=10"),
    ({"data": {"a.tar": None, "b.tar": None}}, "got the YAML mapping .* quote brace patterns"),
    ({"anchor_norm": "l3"}, "anchor_norm='l3': Input should be 'l1' or 'l2'"),
    ({"resume": "/no/such/ckpt"}, "resume='/no/such/ckpt' must be 'auto' or an existing"),
])
def test_bad_config_is_refused_with_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        build_config(values)


def test_bad_override_and_missing_recipe():
    with pytest.raises(ValueError, match="not of the form key=value"):
        parse_overrides(["tau"])
    with pytest.raises(FileNotFoundError, match="bundled: .*digits_demo"):
        load_config("no_such_recipe", [])


def test_batch_size_has_one_source_of_truth():
    cfg = build_config({"batch_size": 256})
    ds = resolve_ds_config({"gradient_accumulation_steps": 2}, cfg, world_size=4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (256, 32)
    assert ds["gradient_clipping"] == 0.0
    cfg = build_config({})  # no batch_size in the recipe: taken from DeepSpeed
    resolve_ds_config({"train_micro_batch_size_per_gpu": 16}, cfg, world_size=2)
    assert cfg.batch_size == 32


@pytest.mark.parametrize("ds,world,message", [
    ({"train_batch_size": 512}, 4, "disagrees with the DeepSpeed config's train_batch_size=512"),
    ({"train_micro_batch_size_per_gpu": 8}, 4, "train_micro_batch_size_per_gpu=8"),
    ({}, 3, "not divisible by world size 3"),
    ({"gradient_accumulation_steps": 3}, 2, "gradient_accumulation_steps 3"),
    ({"optimizer": {"type": "Adam"}}, 2, "DeepSpeed config key 'optimizer'"),
    ({"scheduler": {"type": "WarmupLR"}}, 2, "DeepSpeed config key 'scheduler'"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, 2,
     r"zero_optimization.offload_optimizer.device='nvme': lgp_ds supports 'cpu' only"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, 2,
     r"zero_optimization.offload_param.device='nvme'"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, 2,
     "zero_optimization.offload_param with ZeRO stage 2: it needs stage 3"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, 2,
     "zero_optimization.offload_optimizer with ZeRO stage 0"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
     2, "zero_optimization.offload_optimizer.ratio=0.5: not supported"),
    ({"zero_optimization": {"stage": 2, "cpu_offload": True}}, 2,
     "zero_optimization.cpu_offload is deprecated"),
    ({"zero_optimization": {"stage": 3, "compute_grad_norm": False}}, 2,
     "zero_optimization.compute_grad_norm=false with ZeRO stage 3"),
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False,
                            "offload_optimizer": {"device": "cpu"}}}, 2,
     "zero_optimization.compute_grad_norm=false with offload_optimizer"),
    ({"bf16": {"enabled": True, "check_grad_overflow": False},
      "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}, 2,
     "bf16.check_grad_overflow=false with offload_optimizer: no one would check"),
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}, "gradient_clipping": 1.0},
     2, "gradient_clipping=1.0 with zero_optimization.compute_grad_norm=false"),
    ({"managed_gradient_accumulation": False}, 2, "managed_gradient_accumulation=false"),
    ({"zero_optimization": {"stage": "3"}}, 2, "zero_optimization.stage='3': give an integer"),
    ({"zero_optimization": {"stage": 4}}, 2, "zero_optimization.stage=4: give an integer"),
    ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, 2,
     "zero_optimization.round_robin_gradients=true: not supported"),
    ({"zero_optimization": {"stage": 3, "stage3_module_granularity_threshold": 20000}}, 2,
     "stage3_module_granularity_threshold=20000: lgp_ds chooses the modules"),
    ({"zero_optimization": {"stage": 3, "module_granularity_threshold": "20000"}}, 2,
     "stage3_module_granularity_threshold=20000: lgp_ds chooses the modules"),  # DeepSpeed's alias
    ({"zero_optimization": {"stage": 2, "reduce_bucket_sise": 5e8}}, 2,
     "zero_optimization.reduce_bucket_sise: Extra inputs are not permitted"),
    ({"zero_optimization": True}, 2, "zero_optimization=True: give a mapping"),
    # what DeepSpeed would ignore: a misspelt bf16 would train in fp32, exit 0
    ({"bf_16": {"enabled": True}}, 2, r"key\(s\) bf_16 \(did you mean bf16\?\): DeepSpeed "
                                      r"\S+ does not read them and would silently ignore them"),
    ({"gradient_accumulation_step": 2}, 2,
     r"gradient_accumulation_step \(did you mean gradient_accumulation_steps\?\)"),
    ({"data_types": {"grad_accum_dtyp": "fp32"}}, 2,
     r"data_types.grad_accum_dtyp \(did you mean data_types.grad_accum_dtype\?\)"),
    # what DeepSpeed would refuse late, or take wrongly
    ({"gradient_accumulation_steps": "2"}, 2,
     "gradient_accumulation_steps='2': give a positive integer"),
    ({"train_batch_size": 256.0}, 2, "train_batch_size=256.0: give a positive integer"),
    ({"train_micro_batch_size_per_gpu": 0}, 2, "train_micro_batch_size_per_gpu=0: give a"),
    ({"bf16": {"enable": True}}, 2, "key bf16.enable: Extra inputs are not permitted"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, 2,
     "bf16.enabled and fp16.enabled are both true"),
    ({"tensorboard": {"job_nam": "x"}}, 2,
     "DeepSpeedMonitorConfig key tensorboard.job_nam: Extra inputs are not permitted"),
])
def test_deepspeed_config_conflicts(ds, world, message):
    with pytest.raises(ValueError, match=message):
        resolve_ds_config(ds, build_config({"batch_size": 256}), world)


def test_zero_values_read_as_deepspeed_reads_them():
    zero = {"stage": 2, "round_robin_gradients": "false"}  # DeepSpeed's pydantic: False
    ds = resolve_ds_config({"zero_optimization": zero}, build_config({"batch_size": 256}), 2)
    assert ds["zero_optimization"] == zero


@pytest.mark.parametrize("section,expected", [({"enabled": "false"}, "fp32"),
                                              ({"enabled": "true"}, "bf16")])
def test_precision_read_as_deepspeed_reads_it(section, expected):
    assert precision({"bf16": section}) == expected
    assert precision({"bfloat16": section}) == expected  # DeepSpeed's older name


@pytest.mark.parametrize("name", sorted(os.listdir(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs"))))
def test_every_shipped_deepspeed_config_is_read_whole_by_deepspeed(name):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    load_run_config(None, ["batch_size=16"], os.path.join(root, "ds_configs", name))


@pytest.mark.parametrize("zero", [{"stage": 1, "offload_optimizer": {"device": "cpu"}},
                                  {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                                  {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                   "offload_param": {"device": "cpu"}}])
def test_zero_offload_to_the_host_is_accepted(zero):
    ds = resolve_ds_config({"zero_optimization": zero}, build_config({"batch_size": 256}), 2)
    assert ds["zero_optimization"] == zero
    with pytest.raises(ValueError, match="optimizer=fused_adam with DeepSpeed config key "
                                         "zero_optimization.offload_optimizer"):
        resolve_ds_config({"zero_optimization": zero},
                          build_config({"batch_size": 256, "optimizer": "fused_adam"}), 2)


def test_bf16_zero1_with_fp32_accumulation_drops_compute_grad_norm(tmp_path):
    """fp32 gradient accumulation (the anchor's, or the user's) puts bf16 ZeRO 1 on DeepSpeed's
    BF16_Optimizer, which always computes (and checks) the norm and refuses the key the shipped
    file sets."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "ds_configs", "zero1_bf16.json")
    _, plain = load_run_config(None, ["batch_size=16"], path)
    _, anchored = load_run_config(None, ["batch_size=16", "anchor_weight=1e-5", "init=x.pth"],
                                  path)
    with open(path) as f:
        accumulating = {**json.load(f), "data_types": {"grad_accum_dtype": "fp32"}}
    (tmp_path / "fp32accum.json").write_text(json.dumps(accumulating))
    _, fp32accum = load_run_config(None, ["batch_size=16"], str(tmp_path / "fp32accum.json"))
    assert plain["zero_optimization"]["compute_grad_norm"] is False
    assert "compute_grad_norm" not in anchored["zero_optimization"]
    assert anchored["data_types"]["grad_accum_dtype"] == "fp32"
    assert "compute_grad_norm" not in fp32accum["zero_optimization"]
    # so clipping, which needs the norm, is refused with the file as it is and not there
    (tmp_path / "clipped.json").write_text(json.dumps({**json.load(open(path)),
                                                       "gradient_clipping": 1.0}))
    with pytest.raises(ValueError, match="clipping needs the norm"):
        load_run_config(None, ["batch_size=16"], str(tmp_path / "clipped.json"))
    _, clipped = load_run_config(None, ["batch_size=16", "anchor_weight=1e-5", "init=x.pth"],
                                 str(tmp_path / "clipped.json"))
    assert clipped["gradient_clipping"] == 1.0


def test_the_shipped_offload_config_resolves():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _, ds = load_run_config(None, ["batch_size=16"], os.path.join(
        root, "ds_configs", "zero3_bf16_offload.json"))
    zero = ds["zero_optimization"]
    assert zero["offload_param"] == zero["offload_optimizer"] == {"device": "cpu"}


@pytest.mark.parametrize("env,micro", [({}, 16), ({"WORLD_SIZE": "2"}, 8),
                                       ({"OMPI_COMM_WORLD_SIZE": "4"}, 4),
                                       ({"SLURM_STEP_NUM_TASKS": "2"}, 8),
                                       ({"SLURM_STEP_NUM_TASKS": "1"}, 16)])
def test_the_batch_splits_over_the_world_the_launcher_describes(monkeypatch, env, micro):
    """deepspeed's launcher sets WORLD_SIZE; its MPI and slurm launchers start every rank
    themselves and set only their own variables (DeepSpeed finds the ranks through mpi4py
    later), yet the batch must split over all of them from the start."""
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE",
                 "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _, ds = load_run_config(None, ["batch_size=16"], os.path.join(root, "ds_configs",
                                                                  "cpu_demo.json"))
    assert ds["train_micro_batch_size_per_gpu"] == micro
