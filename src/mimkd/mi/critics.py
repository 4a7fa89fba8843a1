"""Critics ``T_ω(a, b)`` that score (teacher, student) pairs for the MI bounds.

* :class:`ConcatConvCritic` — MIMKD's local and feature critics ("concat-and-convolve"): the teacher and
  student tensors are concatenated on channels and scored at every location by a stack of 1×1 convolutions.
  :meth:`ConcatConvCritic.pair_scores` scores the positive and the shuffled negative pairs of a batch while
  sharing the first layer's work between them (see its docstring).
* :class:`ProjectionHead` — Deep InfoMax's ``MIFCNet`` projector with a linear shortcut.
* :class:`ProjectDotCritic` — MIMKD's global critic ("project and dot"): one head per side and a (normalised,
  temperature-scaled) dot product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkd.errors import MethodError

__all__ = [
    "ConcatConvCritic",
    "ProjectDotCritic",
    "ProjectionHead",
    "sample_locations",
    "sampled_pair_scores",
]


def _check_positive_int(name: str, value: object, owner: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MethodError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_perm(perm: object, batch: int, owner: str) -> Tensor:
    if not isinstance(perm, Tensor) or perm.dtype != torch.long or perm.dim() not in (1, 2):
        raise MethodError(
            f"{owner}.pair_scores: perm must be a LongTensor of shape (B,) (one negative per positive, e.g. "
            f"mimkd.mi.derangement(B)) or (B, K) (K negatives per positive), got "
            f"{perm.dtype if isinstance(perm, Tensor) else type(perm).__name__} "
            f"{tuple(perm.shape) if isinstance(perm, Tensor) else ''}"
        )
    if perm.shape[0] != batch:
        raise MethodError(f"{owner}.pair_scores: perm has {perm.shape[0]} rows but the batch has {batch}")
    return perm


def _take(x: Tensor, perm: Tensor) -> Tensor:
    """``x[perm]`` along the batch dim for a 1-D or 2-D index (result shape ``perm.shape + x.shape[1:]``)."""
    return x.index_select(0, perm.reshape(-1)).view(*perm.shape, *x.shape[1:])


def _locations(x: Tensor) -> Tensor:
    """A map ``B×C×m×m`` as a ``(B·m·m)×C`` matrix (a view when ``x`` is channels_last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _as_maps(scores: Tensor, like: Tensor, batch: int | None = None) -> Tensor:
    """``(N·m·m)×1`` scores back to ``N×1×m×m`` for maps shaped like ``like`` (N: its batch by default)."""
    n = like.shape[0] if batch is None else batch
    return scores.view(n, like.shape[2], like.shape[3], 1).permute(0, 3, 1, 2)


class ConcatConvCritic(nn.Module):
    """Concat-and-convolve critic of MIMKD's local (Eq. 4) and feature (Eq. 5) terms.

    ``T([t ; s])``: ``conv1x1(C_t+C_s → hidden)``, ReLU, ``(num_hidden_layers - 1) ×`` [``conv1x1(hidden →
    hidden)``, ReLU], ``conv1x1(hidden → 1)``; bias on every conv, PyTorch default init, no normalisation.
    ``layers`` is a plain :class:`~torch.nn.ModuleList` of these convolutions, so the state_dict is that of
    the naive conv stack over the concatenation (``layers.0.weight`` has ``C_t + C_s`` input channels, teacher
    first).

    The teacher input is either a map ``B×C_t×m×m`` (feature term: same location) or a vector
    ``B×C_t`` (local term: the pooled teacher vector "replicated" over the student's ``m×m`` locations). The
    student input is always a map ``B×C_s×m×m``. Scores have shape ``B×1×m×m``.

    Speed: the first layer is linear in the concatenation, ``W·[t;s] + b = W_t·t + (W_s·s + b)``, so the
    module never builds the concatenated (or replicated) input. For a vector teacher ``W_t·t`` is a
    ``B×hidden`` vector computed once per image and broadcast over the locations.
    """

    def __init__(
        self, teacher_channels: int, student_channels: int, hidden: int = 512, num_hidden_layers: int = 2
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.teacher_channels = _check_positive_int("teacher_channels", teacher_channels, name)
        self.student_channels = _check_positive_int("student_channels", student_channels, name)
        self.hidden = _check_positive_int("hidden", hidden, name)
        self.num_hidden_layers = _check_positive_int("num_hidden_layers", num_hidden_layers, name)
        convs = [nn.Conv2d(teacher_channels + student_channels, hidden, kernel_size=1)]
        convs += [nn.Conv2d(hidden, hidden, kernel_size=1) for _ in range(num_hidden_layers - 1)]
        convs.append(nn.Conv2d(hidden, 1, kernel_size=1))
        self.layers = nn.ModuleList(convs)

    def extra_repr(self) -> str:
        return f"teacher_channels={self.teacher_channels}, student_channels={self.student_channels}"

    # -- first layer, split into its teacher and student parts --------------------------------------------
    def _check_inputs(self, t: Tensor, s: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(s, Tensor) or s.dim() != 4 or s.shape[1] != self.student_channels:
            raise MethodError(
                f"{name}: the student input must be a map of shape B×{self.student_channels}×m×m, got "
                f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}"
            )
        if not isinstance(t, Tensor) or t.dim() not in (2, 4) or t.shape[1] != self.teacher_channels:
            raise MethodError(
                f"{name}: the teacher input must be a map B×{self.teacher_channels}×m×m or a vector "
                f"B×{self.teacher_channels}, got "
                f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
            )
        if t.shape[0] != s.shape[0]:
            raise MethodError(f"{name}: teacher batch {t.shape[0]} != student batch {s.shape[0]}")
        if t.dim() == 4 and t.shape[2:] != s.shape[2:]:
            raise MethodError(
                f"{name}: teacher map {tuple(t.shape[2:])} and student map {tuple(s.shape[2:])} must have "
                "the same spatial size (pair maps of equal size)"
            )

    # The 1×1 convolutions run as matrix products over locations: a map B×C×m×m is viewed as a (B·m·m)×C
    # matrix (free for channels_last tensors, one copy otherwise), so every layer is one GEMM with its bias
    # fused, and no NCHW<->NHWC conversion happens around the convolutions.
    def _first_layer(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """``A = W_t·t`` and ``S = W_s·s + b`` as ``B×L×hidden`` (``L = m·m``, or 1 for a vector teacher)."""
        self._check_inputs(t, s)
        first = self.layers[0]
        weight = first.weight.flatten(1)
        w_t, w_s = weight[:, : self.teacher_channels], weight[:, self.teacher_channels :]
        batch = s.shape[0]
        student_part = F.linear(_locations(s), w_s, first.bias).view(batch, -1, self.hidden)
        teacher_in = t if t.dim() == 2 else _locations(t)
        teacher_part = F.linear(teacher_in, w_t).view(batch, -1, self.hidden)
        return teacher_part, student_part

    def _tail(self, pre: Tensor) -> Tensor:
        """Layers after the first one's pre-activation ``pre`` (``N×hidden``).

        ``pre`` is a view (flattened batch dims), so its ReLU is out of place: in place on a view costs
        autograd a copy of the whole tensor in the backward. The later ReLUs act on fresh GEMM outputs.
        """
        h = F.relu(pre)
        for conv in self.layers[1:-1]:
            h = F.relu_(F.linear(h, conv.weight.flatten(1), conv.bias))
        last = self.layers[-1]
        return F.linear(h, last.weight.flatten(1), last.bias)

    # -- public ---------------------------------------------------------------------------------------------
    def forward(self, t: Tensor, s: Tensor) -> Tensor:
        """Scores ``T([t_b ; s_b])`` of the aligned pairs, shape ``B×1×m×m``."""
        teacher_part, student_part = self._first_layer(t, s)
        scores = self._tail((teacher_part + student_part).flatten(0, 1))
        return _as_maps(scores, s)

    def pair_scores(self, t: Tensor, s: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
        """Scores of the positive pairs and of the region-consistent negatives, sharing the first layer.

        Positives: ``T([t_b ; s_b])``. Negatives: ``T([t_perm[b] ; s_b])`` at the same location (another
        image's teacher tensor). ``W_t·t`` and ``W_s·s + b`` are computed once and the negatives'
        pre-activation is ``(W_t·t)[perm] + (W_s·s + b)``; the remaining layers run on positives and negatives
        in one batched call.

        ``perm``: LongTensor ``(B,)`` (e.g. :func:`mimkd.mi.derangement`) → negatives ``B×1×m×m``; or ``(B,
        K)`` (e.g. :func:`mimkd.mi.negatives.all_pairs_negatives`) → negatives ``B×K×1×m×m``. Returns ``(pos,
        neg)``; positives have shape ``B×1×m×m``.
        """
        perm = _check_perm(perm, s.shape[0], type(self).__name__)
        teacher_part, student_part = self._first_layer(t, s)  # B×L×h (L = 1 for a vector teacher)
        perm = perm.to(teacher_part.device)
        batch = s.shape[0]
        if perm.dim() == 1:
            # [A ; A[perm]] in one gather (only 2B×1×h for a vector teacher), S broadcast onto both halves:
            # the 2B·L×h pre-activation is written once, like the output of the naive first convolution.
            both = torch.cat([torch.arange(batch, device=perm.device), perm])
            teacher_both = teacher_part.index_select(0, both).unflatten(0, (2, batch))
            scores = self._tail((teacher_both + student_part).flatten(0, 2)).view(2, batch, -1)
            return _as_maps(scores[0], s), _as_maps(scores[1], s)
        k = perm.shape[1]
        neg_pre = _take(teacher_part, perm) + student_part.unsqueeze(1)  # B×K×L×h
        pre = torch.cat([(teacher_part + student_part).flatten(0, 1), neg_pre.flatten(0, 2)])
        scores = self._tail(pre)
        locations = student_part.shape[1]
        pos = _as_maps(scores[: batch * locations], s)
        neg = _as_maps(scores[batch * locations :], s, batch * k).unflatten(0, (batch, k))
        return pos, neg


def sample_locations(
    batch: int, locations: int, m: int, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """``m`` distinct flat location indices per image, uniform, shape ``B×m`` (MIMKD's ``critic_locations``).

    One uniform random key per (image, location) and the ``m`` smallest kept: a uniform ``m``-subset of the
    ``locations`` positions of each image, drawn independently per image.
    """
    draw_on = generator.device if generator is not None else device
    keys = torch.rand(batch, locations, generator=generator, device=draw_on)
    return keys.topk(m, dim=1, largest=False, sorted=False).indices.to(device)


def _rows_at(x: Tensor, images: Tensor, locations: Tensor) -> Tensor:
    """The location vectors ``x[images[b], :, locations[b, j]]`` of a map ``B×C×h×w`` as ``(n·m)×C``."""
    flat = _locations(x)
    per_image = x.shape[2] * x.shape[3]
    return flat.index_select(0, (images.unsqueeze(1) * per_image + locations).reshape(-1))


def sampled_pair_scores(
    critic: ConcatConvCritic, t: Tensor, s: Tensor, perm: Tensor, locations: Tensor
) -> tuple[Tensor, Tensor]:
    """:meth:`ConcatConvCritic.pair_scores` at ``locations`` (``B×m`` flat indices) only; scores ``B×m``.

    MIMKD's opt-in fast path (``critic_locations``, docs/methods/mimkd.md): the positive of image ``b`` at
    location ``ℓ`` scores ``[t_b(ℓ) ; s_b(ℓ)]``, its negative ``[t_perm[b](ℓ) ; s_b(ℓ)]`` — the same
    location of another image's teacher map (region-consistent), or the other image's teacher vector.
    Positives and negatives go through the critic's layers as one ``2·B·m``-row batch. ``perm`` must be 1-D.
    """
    critic._check_inputs(t, s)
    perm = _check_perm(perm, s.shape[0], type(critic).__name__).to(s.device)
    if perm.dim() != 1:
        raise MethodError(
            "mimkd: critic_locations needs one negative per positive (method.negatives=derangement or roll), "
            "not all_pairs"
        )
    batch, m = locations.shape
    first = critic.layers[0]
    weight = first.weight.flatten(1)
    w_t, w_s = weight[:, : critic.teacher_channels], weight[:, critic.teacher_channels :]
    own = torch.arange(batch, device=s.device)
    student_part = F.linear(_rows_at(s, own, locations), w_s, first.bias).view(1, batch, m, critic.hidden)
    if t.dim() == 2:
        teacher_part = F.linear(t, w_t).index_select(0, torch.cat([own, perm]))
        teacher_both = teacher_part.view(2, batch, 1, critic.hidden)
    else:
        rows = _rows_at(t, torch.cat([own, perm]), torch.cat([locations, locations]))
        teacher_both = F.linear(rows, w_t).view(2, batch, m, critic.hidden)
    scores = critic._tail((teacher_both + student_part).flatten(0, 2)).view(2, batch, m)
    return scores[0], scores[1]


class ProjectionHead(nn.Module):
    """Deep InfoMax ``MIFCNet``-style projector with a linear shortcut.

    ``P(x) = W2·ReLU(BN1d(W1·x)) + b2 + W_sc·x + b_sc`` with ``W1: in_dim → hidden`` (no bias), ``W2: hidden →
    out_dim`` and the shortcut ``W_sc: in_dim → out_dim`` (with bias). ``hidden`` defaults to ``out_dim`` (a
    ``D → D`` second layer). When ``out_dim >= in_dim`` the shortcut weight is initialised as DIM does,
    ``uniform(-0.01, 0.01)`` with ones on the diagonal (so ``P`` starts near the identity embedding);
    otherwise (e.g. 2048 → 128) it keeps PyTorch's default init. Inputs ``B×in_dim`` (``B×in_dim×1×1`` is
    flattened).
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_dim = _check_positive_int("in_dim", in_dim, name)
        self.out_dim = _check_positive_int("out_dim", out_dim, name)
        hidden = out_dim if hidden is None else _check_positive_int("hidden", hidden, name)
        self.block = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_dim),
        )
        self.shortcut = nn.Linear(in_dim, out_dim)
        if out_dim >= in_dim:
            with torch.no_grad():
                self.shortcut.weight.uniform_(-0.01, 0.01)
                self.shortcut.weight.diagonal().fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2:
            x = x.flatten(1)
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise MethodError(f"{type(self).__name__}: expected input B×{self.in_dim}, got {tuple(x.shape)}")
        return self.block(x) + self.shortcut(x)


class ProjectDotCritic(nn.Module):
    """MIMKD's global critic "project and dot with linear shortcut".

    One :class:`ProjectionHead` per side (teacher ``d_t → dim``, student ``d_s → dim``).

    * ``normalize=True`` (infoNCE variant, the final model): embeddings are L2-normalised and
      ``T = <e_t, e_s>/τ`` ∈ ``[-1/τ, 1/τ]``; ``dim = 128`` and ``τ = 0.07`` fit the CRD memory bank.
    * ``normalize=False`` (JSD ablation variant): raw embeddings and a raw dot product, no temperature.
    """

    def __init__(
        self,
        teacher_dim: int,
        student_dim: int,
        dim: int = 128,
        temperature: float = 0.07,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        _check_positive_int("dim", dim, name)
        if not temperature > 0:
            raise MethodError(f"{name}: temperature must be > 0, got {temperature!r}")
        self.teacher_head = ProjectionHead(teacher_dim, dim)
        self.student_head = ProjectionHead(student_dim, dim)
        self.dim = dim
        self.temperature = float(temperature)
        self.normalize = bool(normalize)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, temperature={self.temperature}, normalize={self.normalize}"

    def embed_teacher(self, f_t: Tensor) -> Tensor:
        """Teacher embedding ``P_t(f_t)`` (unit-norm rows when ``normalize``)."""
        e = self.teacher_head(f_t)
        return F.normalize(e, dim=1) if self.normalize else e

    def embed_student(self, f_s: Tensor) -> Tensor:
        """Student embedding ``P_s(f_s)`` (unit-norm rows when ``normalize``)."""
        e = self.student_head(f_s)
        return F.normalize(e, dim=1) if self.normalize else e

    def score(self, a: Tensor, b: Tensor) -> Tensor:
        """``<a, b>/τ`` (normalised variant) or ``<a, b>`` (raw variant) over the last dim; broadcasts."""
        dot = (a * b).sum(dim=-1)
        return dot / self.temperature if self.normalize else dot

    def _check_batch(self, f_t: Tensor, f_s: Tensor) -> None:
        if f_t.shape[0] != f_s.shape[0]:
            raise MethodError(
                f"{type(self).__name__}: teacher batch {f_t.shape[0]} != student batch {f_s.shape[0]}"
            )

    def forward(self, f_t: Tensor, f_s: Tensor) -> Tensor:
        """Scores of the aligned pairs ``(f_t[b], f_s[b])``, shape ``(B,)``."""
        self._check_batch(f_t, f_s)
        return self.score(self.embed_teacher(f_t), self.embed_student(f_s))

    def pair_scores(self, f_t: Tensor, f_s: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
        """Positives ``T(f_t[b], f_s[b])`` and negatives ``T(f_t[perm[b]], f_s[b])``, one embedding pass.

        ``perm`` ``(B,)`` → negatives ``(B,)``; ``perm`` ``(B, K)`` → negatives ``(B, K)``. For the JSD
        ablation of the global term (one shuffled negative, no bank).
        """
        self._check_batch(f_t, f_s)
        perm = _check_perm(perm, f_s.shape[0], type(self).__name__)
        a = self.embed_teacher(f_t)
        b = self.embed_student(f_s)
        perm = perm.to(a.device)
        neg_b = b if perm.dim() == 1 else b.unsqueeze(1)
        return self.score(a, b), self.score(_take(a, perm), neg_b)
