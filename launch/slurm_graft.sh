#!/bin/bash
# Layer Grafted Pre-training on a SLURM cluster: one deepspeed launcher per node, started by srun,
# without ssh (--no_ssh --node_rank). Submit from the repository root, on storage every node sees:
#
#   sbatch --nodes=4 launch/slurm_graft.sh --config vit_l_graft --output_dir /shared/runs/vit_l \
#       data='/shared/shards/train-{000000..001023}.tar' init=/shared/mae_pretrain_vit_large.pth
#
# The arguments are launch/graft.py's, after resume=auto: a requeued or resubmitted job continues
# from the newest complete checkpoint in output_dir. Five minutes before the time limit SLURM
# sends this script SIGTERM; it passes SIGTERM on to the training ranks (only them), which write a
# checkpoint and exit, and requeues the job. Environment (defaults in brackets): DS_CONFIG
# [ds_configs/zero2_bf16.json], GPUS_PER_NODE [the GPUs SLURM gave the node, else 8],
# MASTER_PORT [29500], LGP_DS_SCRIPT [launch/graft.py; launch/pretrain.py for MAE], and whatever
# NCCL_* settings the cluster needs (exported here, srun hands them to every node).
#SBATCH --job-name=lgp_ds
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_bf16.json}
LGP_DS_SCRIPT=${LGP_DS_SCRIPT:-launch/graft.py}
# deepspeed's hostfile: the job's nodes in SLURM's order, so that node SLURM_NODEID is its line
HOSTFILE=$PWD/hostfile.$SLURM_JOB_ID
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$GPUS_PER_NODE/" > "$HOSTFILE"
export MASTER_ADDR MASTER_PORT GPUS_PER_NODE DS_CONFIG LGP_DS_SCRIPT HOSTFILE
echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs, master $MASTER_ADDR:$MASTER_PORT"

# Where each node notes its launcher's pid, for the SIGTERM hand-over below (node-local /tmp).
export PID_FILE_PREFIX=/tmp/lgp_ds.$SLURM_JOB_ID
requeue=0
hand_sigterm_to_ranks() {
    echo "SIGTERM: the ranks checkpoint and exit; the job is then requeued"
    requeue=1
    # the ranks are the children of deepspeed's per-node launch.py, itself the runner's child
    srun --overlap --ntasks-per-node=1 bash -c \
        'pkill -TERM -P "$(pgrep -P "$(cat "$PID_FILE_PREFIX.$SLURM_NODEID.pid")")"'
}
trap hand_sigterm_to_ranks TERM

# One task a node: the deepspeed launcher, which starts a rank a GPU. The hand-over above signals
# the ranks alone, which then have the whole grace to checkpoint; a SIGTERM to the whole job step
# (scancel) reaches deepspeed's launch.py too, which passes it on to the ranks and kills them 30 s
# later.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    echo $$ > "$PID_FILE_PREFIX.$SLURM_NODEID.pid"
    exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$SLURM_NODEID" \
        --num_nodes "$SLURM_NNODES" --num_gpus "$GPUS_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        "$LGP_DS_SCRIPT" --deepspeed_config "$DS_CONFIG" resume=auto "$@"' lgp_ds "$@" &
launcher=$!
# A trapped signal interrupts wait: wait again until the launchers have ended.
wait "$launcher"
status=$?
while kill -0 "$launcher" 2>/dev/null; do
    wait "$launcher"
    status=$?
done
rm -f "$HOSTFILE"
if [ "$requeue" = 1 ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
