"""Mean attention distance (the paper's Figure 7, after ViT's Figure 7): how far, in pixels of
the input image, each head of each block looks.

For query patch i of a head, the distance is sum_j a_ij * ||p_i - p_j||: p = (row, column) of a
patch on the patch grid times the patch size, the distance between patch centres in pixels; a
the head's softmax attention of query i over the patch keys. The class token (and any other
prefix token) has no position: it is neither a query nor a key, and each query's attention over
the patches is renormalised to sum to 1, so the value is a weighted mean distance. Reported per
head and block, averaged over the query patches and the images.

The blocks are timm ``Block``s whose attention may run fused (SDPA returns no weights): a hook
takes each attention module's input and recomputes its softmax weights in fp32.
"""
import torch
from timm.layers import Attention

from lgp_ds import dist


def patch_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """[L, L] float64 distances in pixels between the centres of the L = h*w patches of the
    ``grid`` (h, w), in row-major patch order."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch_size
    return torch.cdist(pos, pos)


def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size: int,
                            num_prefix_tokens: int = 1) -> torch.Tensor:
    """attn [N, H, T, T] (softmax weights, T = num_prefix_tokens + h*w) -> [H] float64: each
    head's mean attention distance in pixels over the N images and the h*w query patches (see
    the module docstring: prefix tokens dropped, patch weights renormalised)."""
    a = attn[:, :, num_prefix_tokens:, num_prefix_tokens:].double()
    length = grid[0] * grid[1]
    if a.shape[-2:] != (length, length):
        raise ValueError(f"attention over {attn.shape[-1]} tokens does not hold "
                         f"{num_prefix_tokens} prefix token(s) and a {grid} patch grid")
    a = a / a.sum(dim=-1, keepdim=True)
    return (a * patch_distances(grid, patch_size).to(a.device)).sum(dim=-1).mean(dim=(0, 2))


def attention_weights(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """The softmax weights [N, H, T, T] fp32 that timm's ``Attention`` computes for its input
    x [N, T, D] (the block's normalised tokens): q, k from ``qkv``, ``q_norm``/``k_norm``,
    ``scale``."""
    n, t, _ = x.shape
    qkv = attn.qkv(x).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]).float(), attn.k_norm(qkv[1]).float()
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def block_distances(vit, images: torch.Tensor) -> torch.Tensor:
    """[depth, H] float64: the mean attention distance of each head of each block of the timm
    ViT ``vit`` over ``images`` [N, 3, H, W]."""
    pe = vit.patch_embed
    grid, patch = tuple(pe.grid_size), pe.patch_size[0]
    out = []

    def hook(module, args):
        out.append(mean_attention_distance(attention_weights(module, args[0]), grid, patch,
                                           vit.num_prefix_tokens))

    handles = []
    for i, blk in enumerate(vit.blocks):
        if type(blk.attn) is not Attention:
            raise ValueError(f"block {i} has a {type(blk.attn).__name__} attention: the "
                             f"distance is computed for timm's plain Attention only")
        handles.append(blk.attn.register_forward_pre_hook(hook))
    try:
        vit(images.to(pe.proj.weight.device, pe.proj.weight.dtype))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(out)


def attention_distances(vit, batches) -> torch.Tensor:
    """Collective: [depth, H] float64, the mean attention distance per block and head over every
    image of every rank's ``batches`` ((positions [n], (images [n,3,H,W],), labels) as
    :func:`lgp_ds.analysis.images.rank_batches` yields)."""
    total, count = 0.0, 0
    for positions, (images,), _ in batches:
        total = total + block_distances(vit, images) * len(positions)
        count += len(positions)
    count = torch.tensor([count], dtype=torch.float64, device=total.device)
    return (dist.all_reduce_sum(total) / dist.all_reduce_sum(count)).cpu()


def uniform_distance(grid: tuple[int, int], patch_size: int) -> float:
    """The mean distance (pixels) of a head that attends to every patch alike: the reference
    between local (below) and global (above) attention on this grid."""
    return float(patch_distances(grid, patch_size).mean())


def plot(ax, distances: dict[str, list[list[float]]], patch_size: int, uniform: float) -> None:
    """Figure 7: x = block, y = distance, one dot per head, one colour per checkpoint; a dashed
    line at the distance of uniform attention."""
    ax.axhline(uniform, color="grey", lw=0.8, ls="--", label="uniform attention")
    names = list(distances)
    for c, name in enumerate(names):
        for block, heads in enumerate(distances[name]):
            x = block + 1 + (c - (len(names) - 1) / 2) * 0.8 / len(names)
            ax.scatter([x] * len(heads), heads, s=14, color=f"C{c}",
                       label=name if block == 0 else None)
    ax.set_xlabel("block")
    ax.set_ylabel(f"mean attention distance (pixels, patch {patch_size})")
    ax.set_xticks(range(1, len(next(iter(distances.values()))) + 1))
    ax.legend(fontsize=8)
