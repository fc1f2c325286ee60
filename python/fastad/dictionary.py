"""Mini-batch dictionary learning for many small independent dictionaries at once (MLF-SC).

MLF-SC learns one dictionary per feature group (G = 896 of them, K = 5 atoms of d = 64 features,
3 non-zeros) and scores a patch by its OMP reconstruction error. Fitting G scikit-learn models in a
Python loop spends its time in per-call overhead on tiny matrices; here every step runs for all
groups together as batched tensor operations, with :func:`fastad.ops.omp` as the sparse coder.

The algorithm is Mairal et al. (2010), "Online learning for matrix factorization and sparse
coding", as scikit-learn's ``MiniBatchDictionaryLearning`` runs it, per group:

1. code the mini-batch X (B, d) over the current dictionary D (K, d): C (B, K) from OMP;
2. fold it into the sufficient statistics with scikit-learn's forgetting factor beta(step, B):
   ``A = beta A + C^T C / B`` (K, K) and ``Bs = beta Bs + C^T X / B`` (K, d);
3. one pass of block coordinate descent over the atoms, in order, each using the atoms already
   updated: ``u_k = d_k + (Bs_k - A_k D) / A_kk``, then ``d_k = u_k / ||u_k||``.

Two deliberate differences from scikit-learn, both because the coder is OMP with a fixed number
of atoms (MLF-SC's coder) rather than scikit-learn's lasso with penalty ``alpha``:

- atoms are renormalised to unit norm (scikit-learn projects onto the unit ball, which a lasso
  needs to stop atoms growing); OMP's coefficients absorb any scale, and
  :func:`fastad.ops.omp` wants unit-norm atoms;
- an atom that the statistics say is unused (``A_kk <= 1e-6``, scikit-learn's threshold) is re-drawn
  from the batch's worst-reconstructed signals, one distinct signal per unused atom, rather than
  from a random signal: it then covers what the dictionary explains worst (as K-SVD does), and the
  choice needs no randomness.

Initialisation (first :meth:`DictionaryLearner.partial_fit`): K distinct signals of the first
mini-batch drawn with the learner's seeded generator, normalised (scikit-learn starts from the
SVD of the whole training set instead; a data draw needs only the first batch, so ``fit`` is
exactly a sequence of ``partial_fit`` calls, and it reaches the same quality: see the tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import distributed, ops
from ._progress import progress_bar
from .checks import check_device, check_int

UNUSED_ATOM = 1e-6  # A_kk at or below this: the atom is (nearly) never used; scikit-learn's and SPAMS' value
TINY_NORM = 1e-10  # a drawn signal or updated atom shorter than this has no direction to keep


def forgetting_factor(step: int, batch: int) -> float:
    """scikit-learn's weight beta of the old statistics at mini-batch ``step`` (0-based) of
    ``batch`` signals: the past counts as ``theta`` signals, ``theta = (step + 1) B`` for the first
    ``B - 1`` steps, then ``B^2 + step + 1 - B``, and ``beta = (theta + 1 - B) / (theta + 1)``."""
    theta = (step + 1) * batch if step < batch - 1 else batch * batch + step + 1 - batch
    return (theta + 1 - batch) / (theta + 1)


class DictionaryLearner:
    """Mini-batch dictionary learning for G independent groups at once (Mairal et al., 2010, "Online
    learning for matrix factorization and sparse coding": sufficient statistics A = sum a a^T,
    B = sum x a^T, updated per mini-batch with forgetting as scikit-learn does, then one pass of
    block coordinate descent over the atoms; atoms renormalised to unit norm; unused atoms re-drawn
    from the batch's worst-reconstructed signals). The module docstring gives the details.

    Args:
        groups: G, the number of independent dictionaries.
        n_atoms: K, atoms per dictionary.
        dim: d, features per signal.
        n_nonzero: s, atoms per signal in the OMP coding, 1 <= s <= min(K, d).
        batch_size: signals per mini-batch in :meth:`fit` (capped at N as scikit-learn does).
        seed: seeds the initial draw of atoms and the shuffles of :meth:`fit`.
        device: where the dictionaries, the statistics and the OMP coding live.

    Attributes (after the first :meth:`partial_fit` or :meth:`fit`):
        dictionary_: (G, K, d) float32 atoms as rows, unit norm.
        n_steps_: mini-batches seen.
    """

    def __init__(
        self,
        groups: int,
        n_atoms: int,
        dim: int,
        n_nonzero: int,
        *,
        batch_size: int = 256,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.groups = check_int(groups, "groups", meaning="the number of dictionaries G")
        self.n_atoms = check_int(n_atoms, "n_atoms", meaning="atoms per dictionary K")
        self.dim = check_int(dim, "dim", meaning="features per signal d")
        self.n_nonzero = check_int(n_nonzero, "n_nonzero", meaning="atoms per signal s")
        if n_nonzero > min(n_atoms, dim):
            raise ValueError(
                f"n_nonzero must be at most min(n_atoms, dim) = {min(n_atoms, dim)} "
                f"(n_atoms = {n_atoms}, dim = {dim}), got {n_nonzero}"
            )
        self.batch_size = check_int(batch_size, "batch_size", meaning="signals per mini-batch")
        self.seed = check_int(seed, "seed", minimum=0)
        self.device = check_device(device)
        self._reset()

    def _reset(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)  # CPU: same draws on every device
        self.n_steps_ = 0
        self._A: Tensor | None = None  # (G, K, K) sum of code outer products, with forgetting
        self._B: Tensor | None = None  # (G, K, d) sum of code-signal products, with forgetting

    # ------------------------------------------------------------------ checks
    def _check_signals(self, x: object, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (G, M, d), got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {x.dtype} (cast it with .float())")
        if x.dim() != 3 or x.shape[0] != self.groups or x.shape[2] != self.dim:
            raise ValueError(f"{name} must have shape (G, M, d) = ({self.groups}, M, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] < 1:
            raise ValueError(f"{name} must hold at least one signal per group (M >= 1), got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but this learner was made for {self.device}")
        low, high = torch.aminmax(x)  # one pass; NaN and infinities all reach the extremes
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise ValueError(f"{name} must hold finite values, got NaN or infinite values")
        return x

    def _check_fitted(self) -> Tensor:
        if not hasattr(self, "dictionary_"):
            raise RuntimeError("this DictionaryLearner is not fitted yet: call fit(...) or partial_fit(...) first")
        return self.dictionary_

    # ------------------------------------------------------------------ learning
    def partial_fit(self, x: Tensor) -> DictionaryLearner:
        """One mini-batch step for every group: code, update the statistics, update the atoms.

        Args:
            x: (G, B, d) float32 on the learner's device, B >= 1: one mini-batch per group. The
                first call also initialises the atoms from it.

        Returns:
            ``self``.
        """
        return self._step(self._check_signals(x))

    def _step(self, x: Tensor) -> DictionaryLearner:
        """partial_fit on a checked batch."""
        if not hasattr(self, "dictionary_"):
            self.dictionary_ = self._initial_atoms(x)
            g, k, d = self.dictionary_.shape
            self._A = x.new_zeros((g, k, k))
            self._B = x.new_zeros((g, k, d))
        codes = self._dense_codes(x, self.dictionary_)  # (G, B, K)
        batch = x.shape[1]
        beta = forgetting_factor(self.n_steps_, batch)
        self._A.mul_(beta).baddbmm_(codes.mT, codes, alpha=1.0 / batch)
        self._B.mul_(beta).baddbmm_(codes.mT, x, alpha=1.0 / batch)
        # Squared errors (G, B) before the update. OMP's coefficients are the least-squares fit on
        # their support, so the residual is orthogonal to the reconstruction and its squared norm is
        # ||x||^2 - c^T (D D^T) c: no (G, B, d) reconstruction needed (only the ranking matters).
        gram = self.dictionary_ @ self.dictionary_.mT
        errors = torch.linalg.vector_norm(x, dim=-1).square() - ((codes @ gram) * codes).sum(-1)
        self._update_atoms(x, errors)
        self.n_steps_ += 1
        return self

    def fit(self, x: Tensor, *, epochs: int = 1, shuffle: bool = True) -> DictionaryLearner:
        """Learns the dictionaries from scratch: ``epochs`` passes over the signals in mini-batches
        of ``min(batch_size, N)`` (the last of a pass may be smaller), each pass in a new seeded
        order (one order for all groups) unless ``shuffle`` is False; the same as calling
        :meth:`partial_fit` on those batches in turn on a fresh learner.

        Args:
            x: (G, N, d) float32 on the learner's device, N >= 1.
            epochs: passes over the data, >= 1.
            shuffle: visit the signals in a new random order each pass (else in their order).

        Returns:
            ``self``.
        """
        x = self._check_signals(x)
        check_int(epochs, "epochs", meaning="passes over the data")
        if hasattr(self, "dictionary_"):
            del self.dictionary_
        self._reset()
        n = x.shape[1]
        batch = min(self.batch_size, n)
        # Shuffles have their own generator, so that the atom draws do not depend on them.
        order_generator = torch.Generator().manual_seed(self.seed + 1)
        for _ in range(epochs):
            order = torch.randperm(n, generator=order_generator).to(x.device) if shuffle else None
            for start in range(0, n, batch):
                # A gathered copy per batch rather than one shuffled copy of all the data.
                rows = x.index_select(1, order[start : start + batch]) if shuffle else x[:, start : start + batch]
                self._step(rows)
        return self

    def _initial_atoms(self, x: Tensor) -> Tensor:
        """(G, K, d): K distinct signals of each group's batch in a seeded order, normalised; where
        the batch has fewer than K signals, or a drawn signal is (nearly) zero, a random direction."""
        g, b, d = x.shape
        k = self.n_atoms
        order = torch.rand(g, b, generator=self._generator).argsort(dim=1)[:, :k].to(x.device)
        atoms = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, d))
        if b < k:
            atoms = torch.cat([atoms, x.new_zeros((g, k - b, d))], dim=1)
        return self._normalised_or_random(atoms)

    def _normalised_or_random(self, atoms: Tensor) -> Tensor:
        """Rows of ``atoms`` (G, n, d) scaled to unit norm; rows too short to have a direction are
        replaced by seeded random unit vectors (drawn for every row, so the draws do not depend on
        the data)."""
        random = torch.randn(atoms.shape, generator=self._generator).to(atoms.device)
        random = random / random.norm(dim=-1, keepdim=True)
        norms = atoms.norm(dim=-1, keepdim=True)
        return torch.where(norms > TINY_NORM, atoms / norms.clamp_min(TINY_NORM), random)

    def _update_atoms(self, x: Tensor, errors: Tensor) -> None:
        """One block-coordinate-descent pass over the atoms of every group (in place), re-drawing
        unused atoms from the signals of largest reconstruction ``errors`` (G, B)."""
        D, A, B = self.dictionary_, self._A, self._B
        g, k, d = D.shape
        diag = A.diagonal(dim1=1, dim2=2)  # (G, K); the pass does not change A
        unused = diag <= UNUSED_ATOM
        # The j-th unused atom of a group (in atom order) takes the group's j-th worst signal.
        worst = errors.argsort(dim=1, descending=True)  # (G, B)
        rank = unused.long().cumsum(1) - 1
        picks = torch.gather(worst, 1, rank.clamp(0, worst.shape[1] - 1))
        replacements = torch.gather(x, 1, picks.unsqueeze(-1).expand(-1, -1, d))
        # More unused atoms than signals: the extra ones get random directions.
        replacements = replacements * (rank < worst.shape[1]).unsqueeze(-1)
        replacements = self._normalised_or_random(replacements)
        for j in range(k):  # K is tiny; every step is batched over the groups
            step = (B[:, j] - (A[:, j].unsqueeze(1) @ D).squeeze(1)) / diag[:, j : j + 1].clamp_min(UNUSED_ATOM)
            updated = D[:, j] + step
            norm = updated.norm(dim=-1, keepdim=True)
            # An update that cancels the atom (only when it is nearly unused) keeps the old one.
            updated = torch.where(norm > TINY_NORM, updated / norm.clamp_min(TINY_NORM), D[:, j])
            D[:, j] = torch.where(unused[:, j : j + 1], replacements[:, j], updated)

    def _dense_codes(self, x: Tensor, dictionary: Tensor) -> Tensor:
        """(G, M, K) OMP codes of ``x`` as dense rows (zero for atoms not used)."""
        indices, coefs = ops.omp(x, dictionary, self.n_nonzero)
        g, m, _ = x.shape
        codes = x.new_zeros((g, m, self.n_atoms + 1))  # the extra column collects unused slots (-1)
        slots = torch.where(indices >= 0, indices, self.n_atoms)
        codes.scatter_add_(2, slots, coefs)
        return codes[..., : self.n_atoms]

    # ------------------------------------------------------------------ using
    def transform(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """OMP codes of ``x`` (G, M, d) float32 over the learned dictionaries:
        :func:`fastad.ops.omp`'s ``(indices, coefs)``, both (G, M, s), indices -1 in unused slots,
        on the learner's device."""
        dictionary = self._check_fitted()
        return ops.omp(self._check_signals(x), dictionary, self.n_nonzero)

    def reconstruction_error(self, x: Tensor) -> Tensor:
        """(G, M) float32 squared Euclidean error ``||x - x_hat||^2`` of each signal's OMP
        reconstruction ``x_hat`` over its group's dictionary (MLF-SC's anomaly score)."""
        dictionary = self._check_fitted()
        indices, coefs = self.transform(x)
        return ops.omp_error(x, indices, coefs, dictionary)


class SampledLassoDictionaries:
    """Dictionaries as MLF-SC's authors learned them: scikit-learn's ``MiniBatchDictionaryLearning``
    (LARS lasso codes with penalty ``alpha``, ``steps`` mini-batches of ``batch_size`` signals,
    starting from the top singular vectors of all the training signals scaled by their singular
    values), one model per group, fed from a stream instead of one array of every signal.

    Their code (LeapMind/MLF-SC, scikit-learn 0.21.3, ``n_iter=50`` and the default batch of 3)
    builds the initial dictionary from an SVD of all training patches of a channel, shuffles
    them, and runs 50 mini-batches of 3, so it looks at 150 random patches after the SVD. Here
    the stream is reduced to exactly what that needs, in bounded memory and whatever the order
    or chunking of the stream:

    - the Gram matrix ``X^T X`` (G, d, d) of all signals, in float64; its top K eigenpairs give
      the SVD's ``S V^T`` exactly (scikit-learn's randomised SVD approximates it);
    - a uniform sample of ``steps * batch_size`` signal positions: each position carries a key
      the caller draws from a seeded generator (:meth:`add`), and the smallest keys are kept,
      in key order, which is the sample's random order. One sample of positions serves all the
      groups (the authors shuffled each channel on its own; both are uniform samples).

    :meth:`finish` then runs scikit-learn's own ``partial_fit`` over the sample, one call per
    mini-batch, per group. Today's scikit-learn steps its statistics as 0.21.3 did, but updates
    atoms by Mairal's block coordinate descent and projects them onto the unit ball, where 0.21.3
    normalised them to unit length; the atoms are normalised to unit length at the end, since
    OMP's selection (and :func:`fastad.ops.omp`) assumes unit atoms; scikit-learn's coder would
    rank a shorter atom's correlations lower (atoms nearly always end at norm 1).

    Memory: G (d^2 + steps * batch_size * d) float64 values; time: about 35 ms per group on the
    CPU (scikit-learn's per-call overhead on tiny matrices), so 30 s for MLF-SC's 896 channels.
    """

    def __init__(
        self,
        groups: int,
        n_atoms: int,
        dim: int,
        *,
        alpha: float = 1.0,
        steps: int = 50,
        batch_size: int = 3,
        seed: int = 0,
    ) -> None:
        self.groups = check_int(groups, "groups", meaning="the number of dictionaries G")
        self.n_atoms = check_int(n_atoms, "n_atoms", meaning="atoms per dictionary K")
        self.dim = check_int(dim, "dim", meaning="features per signal d")
        if n_atoms > dim:
            raise ValueError(f"n_atoms ({n_atoms}) must be at most dim ({dim}): the initial atoms are singular vectors")
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"alpha must be a positive number (the lasso penalty), got {alpha!r}")
        self.alpha = float(alpha)
        self.steps = check_int(steps, "steps", meaning="mini-batches of dictionary learning")
        self.batch_size = check_int(batch_size, "batch_size", meaning="signals per mini-batch")
        self.seed = check_int(seed, "seed", minimum=0)
        self.gram = torch.zeros(groups, dim, dim, dtype=torch.float64)
        self.n_signals = 0
        self._keys = torch.empty(0, dtype=torch.float64)
        self._sample = torch.empty(groups, 0, dim, dtype=torch.float64)

    @property
    def capacity(self) -> int:
        return self.steps * self.batch_size

    def add(self, x: Tensor, keys: Tensor) -> None:
        """Folds M signals per group into the statistics: ``x`` (G, M, d) float, ``keys`` (M,)
        the positions' sampling keys (uniform in [0, 1), drawn by the caller from a seeded
        generator in an order that does not depend on chunking)."""
        if x.dim() != 3 or x.shape[0] != self.groups or x.shape[2] != self.dim:
            raise ValueError(f"x must have shape (G, M, d) = ({self.groups}, M, {self.dim}), got {tuple(x.shape)}")
        if keys.shape != (x.shape[1],):
            raise ValueError(f"keys must have shape (M,) = ({x.shape[1]},), got {tuple(keys.shape)}")
        x64 = x.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(x64).all()):
            raise ValueError("x must hold finite values, got NaN or infinite values")
        self.gram += x64.mT @ x64
        self.n_signals += x.shape[1]
        keys = torch.cat([self._keys, keys.detach().to("cpu", torch.float64)])
        order = keys.argsort()[: self.capacity]
        self._keys = keys[order]
        self._sample = torch.cat([self._sample, x64], dim=1)[:, order]

    def initial_atoms(self) -> Tensor:
        """(G, K, d) float64: the top K right singular vectors of each group's signals scaled by
        their singular values (scikit-learn's start), from the Gram matrix."""
        values, vectors = torch.linalg.eigh(self.gram)  # ascending
        top = values.flip(-1)[:, : self.n_atoms].clamp_min(0).sqrt()
        atoms = vectors.flip(-1)[..., : self.n_atoms].mT  # (G, K, d)
        # An eigenvector's sign is arbitrary (rounding of the Gram matrix can flip it); fix it as
        # scikit-learn's svd_flip does, largest entry positive, so that the result does not
        # depend on how the signals were chunked.
        largest = atoms.gather(-1, atoms.abs().argmax(-1, keepdim=True))
        return top.unsqueeze(-1) * atoms * torch.where(largest < 0, -1.0, 1.0).to(atoms.dtype)

    def all_reduce_(self, group=None) -> SampledLassoDictionaries:
        """Merges the learners of every process of ``group`` (torch.distributed), in place on each:
        the Gram matrices and signal counts summed (float64, equal to one process's up to
        rounding), and the sample made the smallest keys of all the processes' samples, which is
        one process's sample when each drew the keys one process would have drawn for its signals."""
        import torch.distributed as dist

        if not distributed.is_distributed(group):
            return self
        dist.all_reduce(self.gram, group=group)
        self.n_signals = distributed.all_reduce_sum(int(self.n_signals), group)
        keys = distributed.all_gather_rows(self._keys, group)
        sample = distributed.all_gather_rows(self._sample.transpose(0, 1).contiguous(), group).transpose(0, 1)
        order = keys.argsort()[: self.capacity]
        self._keys, self._sample = keys[order], sample[:, order].contiguous()
        return self

    def finish(self, progress: bool | None = None, groups: range | None = None) -> Tensor:
        """(G, K, d) float32 unit-norm dictionaries, scikit-learn's ``partial_fit`` run over the
        sample in key order, ``steps`` mini-batches cycling through it as scikit-learn's batches
        cycle through its data. ``groups``: only those dictionaries (len(groups), K, d), for
        dividing the work among processes."""
        if self.n_signals == 0:
            raise ValueError("no signals were added to learn dictionaries from")
        from sklearn.decomposition import MiniBatchDictionaryLearning

        groups = range(self.groups) if groups is None else groups
        init = self.initial_atoms().numpy()
        sample = self._sample.numpy()
        n = sample.shape[1]
        batch = min(self.batch_size, n)
        # scikit-learn's batches: consecutive slices of ``batch`` (the last may be shorter), cycled.
        slices = [slice(start, min(start + batch, n)) for start in range(0, n, batch)]
        order = [slices[step % len(slices)] for step in range(self.steps)]
        atoms = torch.empty(len(groups), self.n_atoms, self.dim, dtype=torch.float64)
        bar = progress_bar(len(groups), "dictionaries", "channel", progress)
        try:
            for i, g in enumerate(groups):
                learner = MiniBatchDictionaryLearning(
                    n_components=self.n_atoms,
                    alpha=self.alpha,
                    fit_algorithm="lars",
                    batch_size=batch,
                    dict_init=init[g].copy(),
                    shuffle=False,
                    random_state=self.seed,
                )
                for rows in order:
                    learner.partial_fit(sample[g, rows])
                atoms[i] = torch.from_numpy(learner.components_)
                bar.update(1)
        finally:
            bar.close()
        norms = atoms.norm(dim=-1, keepdim=True)
        # An atom the lasso never used can end at zero; any unit direction then codes as well.
        fallback = torch.eye(self.n_atoms, self.dim, dtype=torch.float64).expand_as(atoms)
        return torch.where(norms > TINY_NORM, atoms / norms.clamp_min(TINY_NORM), fallback).float().contiguous()


__all__ = ["DictionaryLearner", "SampledLassoDictionaries", "forgetting_factor"]
