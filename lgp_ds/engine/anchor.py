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
        self._rows_of, self._rows_cache = None, None  # see _rows

    @torch.no_grad()
    def add_gradient(self, slices: list[MasterSlice], grad_scale: float = 1.0) -> torch.Tensor:
        """Add d(penalty)/d(master) * grad_scale to this rank's gradients; return the penalty, a
        0-d float64 tensor on the device (read it only when logging: reading it waits for the
        device, and this runs every step).

        ``grad_scale`` is the loss scale of fp16 training (gradients are still scaled then).
        Multi-tensor (foreach) operations over all of this rank's anchored slices, not a dozen
        Python-level operations per tensor: ViT-L anchors about 150 tensors, and this runs
        between the backward pass and the step, where the device waits for it.
        """
        if self.masters_on != self.device:
            # DeepSpeed may still be copying this step's gradients to the (pinned) host buffers
            # that the anchor adds to: one wait, as DeepSpeed's step would do next anyway
            get_accelerator().synchronize()
        mine = [s for s in slices if s.name in self.reference]
        rows = self._rows(tuple(s.name for s in mine))  # their places in self.names [len(mine)]
        partial = torch.zeros(len(self.names), dtype=torch.float64, device=self.masters_on)
        if mine:
            diffs = torch._foreach_sub([s.weight for s in mine],
                                       [self.reference[s.name] for s in mine])
            sums = torch.stack(torch._foreach_norm(diffs, 1 if self.norm == "l1" else 2)).double()
            partial.index_copy_(0, rows, sums if self.norm == "l1" else sums.square())
        partial = partial.to(self.device)  # the all-reduce runs on the device
        if self.sharded:
            dist.all_reduce_sum(partial)
        norms = partial if self.norm == "l1" else partial.sqrt()
        if mine:
            scale = self.weight * grad_scale
            if self.norm == "l1":
                torch._foreach_sign_(diffs)
                torch._foreach_mul_(diffs, scale)
            else:  # d / ||d|| per tensor, and 0 where a tensor still equals its MIM value
                local_norms = norms.to(self.masters_on).float()[rows]
                inverse = torch.where(local_norms > 0, 1 / local_norms.clamp_min(1e-30),
                                      torch.zeros_like(local_norms))
                # a factor per tensor: one kernel each, launched from C++ (foreach kernels need
                # equal shapes); then the scale, after the division, so that nothing overflows
                torch._foreach_mul_(diffs, list(inverse.unbind(0)))
                torch._foreach_mul_(diffs, scale)
            grads = [s.gradient() for s in mine]
            views = [(g, d) for g, d in zip(grads, diffs) if g is not None]
            if views:
                torch._foreach_add_([g for g, _ in views],
                                    [d.to(g.dtype) for g, d in views])
            for s, g, d in zip(mine, grads, diffs):
                if g is None:  # ZeRO 3 on the device
                    s.add_to_grad(d)
        return self.weight * norms.sum()

    def _rows(self, names: tuple[str, ...]) -> torch.Tensor:
        """The positions of ``names`` in ``self.names`` as an index tensor where the masters are,
        made once per set of slices (a tensor built from a list is a blocking copy)."""
        if self._rows_of != names:
            index = {n: i for i, n in enumerate(self.names)}
            self._rows_cache = torch.tensor([index[n] for n in names], dtype=torch.long,
                                            device=self.masters_on)
            self._rows_of = names
        return self._rows_cache
