"""Tucker-2 (channel modes) and matrix low-rank projections of layer weights.

A conv weight W (Cout x Cin x kh x kw) is approximated as
    W ~= core x_1 U_out x_2 U_in^T,   U_out: Cout x r_out,  U_in^T: r_in x Cin,  core: r_out x r_in x kh x kw
(the spatial modes are left full, as in CSTAR/Tucker-2). Factors start from the truncated HOSVD
(leading left singular vectors of the mode-1/mode-2 unfoldings) and are refined with a few HOOI
sweeps. The projection onto the set {rank_1 <= r_out, rank_2 <= r_in} is what the ADMM Z-step uses.

Factor conventions follow `cstar.lowrank`: `u_out` is Cout x r_out, `u_in` is r_in x Cin, so
`LowRankConv2d.from_factors(conv, u_out, core, u_in)` rebuilds exactly the projected weight.
1x1 convolutions are Tucker-2 with a 1x1 core (the allocator counts the r_out x r_in core's cost).
Linear layers use the rank-r truncated SVD W ~= U V (balanced: both factors carry sqrt(S)).
"""

from __future__ import annotations

import torch

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-`mode` unfolding: the `mode` axis becomes rows, all other axes (in order) the columns."""
    return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading `rank` singular triplets (U: m x r, S: r, Vh: r x n), computed in float64 for stability."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    rank = max(1, min(rank, s.shape[0]))
    return u[:, :rank].to(matrix.dtype), s[:rank].to(matrix.dtype), vh[:rank].to(matrix.dtype)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values of a matrix (float64, descending)."""
    return torch.linalg.svdvals(matrix.detach().double())


def leading_left_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal basis of the leading `rank`-dimensional column space (eigh of M M^T: cheap when m << n)."""
    gram = matrix.double() @ matrix.double().T
    _, vectors = torch.linalg.eigh(gram)
    return vectors[:, -rank:].flip(-1).to(matrix.dtype)


def tucker2_core(weight: torch.Tensor, u_out: torch.Tensor, u_in_t: torch.Tensor) -> torch.Tensor:
    """core = W x_1 U_out^T x_2 U_in^T (u_in_t is r_in x Cin)."""
    return torch.einsum("oihw,or,si->rshw", weight, u_out, u_in_t)


def tucker2_reconstruct(u_out: torch.Tensor, core: torch.Tensor, u_in_t: torch.Tensor) -> torch.Tensor:
    """The full weight core x_1 U_out x_2 U_in^T."""
    return torch.einsum("or,rshw,si->oihw", u_out, core, u_in_t)


def hosvd2(weight: torch.Tensor, ranks: tuple[int, int]) -> Factors:
    """Truncated HOSVD on the two channel modes: (u_out, core, u_in) with u_in r_in x Cin."""
    r_out, r_in = _clip_ranks(weight, ranks)
    u_out = leading_left_vectors(unfold(weight, 0), r_out)
    u_in_t = leading_left_vectors(unfold(weight, 1), r_in).T
    return u_out, tucker2_core(weight, u_out, u_in_t), u_in_t


def hooi2(weight: torch.Tensor, ranks: tuple[int, int], sweeps: int = 2, init: Factors | None = None) -> Factors:
    """HOOI sweeps from the HOSVD (or `init`): alternately refit U_out and U_in to the partially projected W."""
    r_out, r_in = _clip_ranks(weight, ranks)
    u_out, _, u_in_t = init if init is not None else hosvd2(weight, (r_out, r_in))
    for _ in range(sweeps):
        u_out = leading_left_vectors(unfold(torch.einsum("oihw,si->oshw", weight, u_in_t), 0), r_out)
        u_in_t = leading_left_vectors(unfold(torch.einsum("oihw,or->rihw", weight, u_out), 1), r_in).T
    return u_out, tucker2_core(weight, u_out, u_in_t), u_in_t


def tucker2_project(
    weight: torch.Tensor, ranks: tuple[int, int], sweeps: int = 2
) -> tuple[torch.Tensor, Factors]:
    """Project a 4-D weight onto multilinear ranks (r_out, r_in): (projected weight, (u_out, core, u_in)).

    HOOI never increases the error of the HOSVD it starts from; we keep whichever of the two is
    better anyway, so the guarantee holds even with eigen-solver round-off.
    """
    with torch.no_grad():
        w = weight.detach()
        start = hosvd2(w, ranks)
        best = start
        best_err = float((tucker2_reconstruct(*start) - w).pow(2).sum())
        if sweeps > 0:
            refined = hooi2(w, ranks, sweeps, init=start)
            err = float((tucker2_reconstruct(*refined) - w).pow(2).sum())
            if err <= best_err:
                best = refined
        return tucker2_reconstruct(*best).to(weight.dtype), best


def matrix_project(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Best rank-`rank` approximation of a matrix (Eckart-Young): (projected, (u: m x r, v: r x n))."""
    with torch.no_grad():
        u, s, vh = truncated_svd(weight.detach(), rank)
        root = s.sqrt()
        u_f, v_f = u * root, root[:, None] * vh
        return (u_f @ v_f).to(weight.dtype), (u_f, v_f)


def project(weight: torch.Tensor, ranks: tuple[int, ...], sweeps: int = 2) -> torch.Tensor:
    """Projected weight for a conv (ranks (r_out, r_in)) or linear (ranks (r,)) layer."""
    if weight.ndim == 4:
        return tucker2_project(weight, (int(ranks[0]), int(ranks[1])), sweeps)[0]
    return matrix_project(weight, int(ranks[0]))[0]


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F."""
    return float((weight - approx).norm() / weight.norm().clamp_min(1e-12))


def _clip_ranks(weight: torch.Tensor, ranks: tuple[int, int]) -> tuple[int, int]:
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    return max(1, min(int(ranks[0]), out_channels)), max(1, min(int(ranks[1]), in_channels))
