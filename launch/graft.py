"""Step ii of Layer Grafted Pre-training: MoCo v3 from MIM weights with stage-wise LRs.

    deepspeed [--num_gpus N | --hostfile H] launch/graft.py --deepspeed_config ds_configs/X.json \
        [--config RECIPE.yaml | bundled name] [--output_dir DIR] [key=value ...]

Without --config the bundled ``digits_demo`` recipe trains a tiny ViT on the embedded data.
The same entry as launch/pretrain.py: a recipe of another method runs that method.
"""
from lgp_ds.launch import main

if __name__ == "__main__":
    main(description=__doc__)
