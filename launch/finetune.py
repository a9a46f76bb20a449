"""Fine-tune a pre-trained ViT on labels (method=finetune): end to end as MAE does, on a 10%
label subset from the first projector layer (SimCLR v2 style), or with the lower blocks frozen.

    deepspeed [--num_gpus N | --hostfile H] launch/finetune.py --deepspeed_config ds_configs/X.json \
        --config vit_b_finetune init=runs/vit_b_graft data=... val_data=... [key=value ...]

Recipes: digits_finetune (the default), digits_finetune_semi10, vit_b_finetune,
vit_b_finetune_semi10. The same entry as launch/pretrain.py; top-1 on the held-out set goes to
metrics.jsonl as val_top1.
"""
import sys

from lgp_ds.launch import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", "digits_finetune", *argv]
    main(argv, description=__doc__)
