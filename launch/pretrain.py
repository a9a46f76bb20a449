"""Pre-train with any method of the paper (``method=`` in the recipe or on the command line).

    deepspeed [--num_gpus N | --hostfile H] launch/pretrain.py --deepspeed_config ds_configs/X.json \
        --config vit_b_mae [--output_dir DIR] [key=value ...]

Methods: graft, moco, mae, mtl, mim2cl_frozen, cl2mim, graft_vicreg (see lgp_ds/methods/).
"""
from lgp_ds.launch import main

if __name__ == "__main__":
    main(description=__doc__)
