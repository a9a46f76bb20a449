"""Distance-to-MIM penalty on the lower network, computed on the fp32 master weights.

penalty = weight * sum over anchored tensors p of ||p - p_mim||, with the l2 norm (the paper) or
the l1 norm (the released code). The anchored tensors are the patch embedding, cls token,
position embedding and the first ``num_blocks`` blocks.

Each rank keeps the MIM values of its own master slices only (under ZeRO 3 and ZeRO 1/2 no rank
holds the whole copy). After backward, :meth:`MIMAnchor.add_gradient` adds the penalty's exact
gradient to the sharded gradients before the optimizer step, and returns the penalty value:
per-tensor partial sums are all-reduced, so value and gradient equal a single-process
computation on the full tensors.

It computes where the masters live: with ``offload_optimizer`` on the host, beside the fp32
gradients the CPU optimizer reads, so that only the per-tensor sums cross to the device (for
the all-reduce) and back. DeepSpeed's gradient clipping norm is taken before, without the
anchor's gradient, under offload (on the device it includes it).
"""
import torch
from deepspeed.accelerator import get_accelerator

from lgp_ds import dist
from lgp_ds.models.vit import vit_layer_id

from .master import MasterSlice

def is_anchored(name: str, num_blocks: int, prefix: str = "base_encoder.") -> bool:
    """Embeddings and blocks 0 .. num_blocks-1 of the ViT under ``prefix``."""
    return name.startswith(prefix) and vit_layer_id(name[len(prefix):], depth=num_blocks) <= num_blocks


class MIMAnchor:
    def __init__(self, mim_state: dict[str, torch.Tensor], slices: list[MasterSlice],
                 weight: float, norm: str, num_blocks: int, sharded: bool,
                 prefix: str = "base_encoder."):
        if norm not in ("l1", "l2"):
            raise ValueError(f"anchor_norm must be 'l1' or 'l2', got {norm!r}")
        self.weight, self.norm = weight, norm
        self.sharded = sharded  # ZeRO 1-3: partial sums must be all-reduced (by every rank)
        self.names = sorted({s.name for s in slices if is_anchored(s.name, num_blocks, prefix)})
        self.device = torch.device(get_accelerator().current_device_name())
        # where the masters are: the device, or the host under offload_optimizer
        self.masters_on = slices[0].weight.device if slices else self.device
        self.reference = {}  # name -> fp32 [numel] MIM values of this rank's slice
        for s in slices:
            if s.name in self.names:
                full = mim_state[s.name[len(prefix):]].reshape(-1).float()
                self.reference[s.name] = full[s.start:s.start + s.numel].clone().to(s.weight.device)
        # Every rank must agree on the tensor order for the all-reduce of partial norms.
        self.names = sorted(set().union(*[set(n) for n in dist.all_gather_object(self.names)]))

    @torch.no_grad()
    def add_gradient(self, slices: list[MasterSlice], grad_scale: float = 1.0) -> torch.Tensor:
        """Add d(penalty)/d(master) * grad_scale to this rank's gradients; return the penalty, a
        0-d float64 tensor on the device (read it only when logging: reading it waits for the
        device, and this runs every step).

        ``grad_scale`` is the loss scale of fp16 training (gradients are still scaled then).
        """
        if self.masters_on != self.device:
            # DeepSpeed may still be copying this step's gradients to the (pinned) host buffers
            # that the anchor adds to: one wait, as DeepSpeed's step would do next anyway
            get_accelerator().synchronize()
        mine = {s.name: s for s in slices if s.name in self.reference}
        index = {n: i for i, n in enumerate(self.names)}
        diffs = {n: s.weight - self.reference[n] for n, s in mine.items()}
        partial = torch.zeros(len(self.names), dtype=torch.float64, device=self.masters_on)
        for n, d in diffs.items():
            partial[index[n]] = (d.abs().sum() if self.norm == "l1" else d.square().sum()).double()
        partial = partial.to(self.device)  # the all-reduce runs on the device
        if self.sharded:
            dist.all_reduce_sum(partial)
        norms = partial if self.norm == "l1" else partial.sqrt()
        local_norms = norms.to(self.masters_on)
        for n, d in diffs.items():
            if self.norm == "l1":
                g = torch.sign(d)
            else:  # d / ||d||, and 0 where the tensor still equals its MIM value
                norm = local_norms[index[n]].float()
                g = torch.where(norm > 0, d / norm.clamp_min(1e-30), torch.zeros_like(d))
            mine[n].add_to_grad(g * (self.weight * grad_scale))
        return self.weight * norms.sum()
