"""Simulated experts: the released code's per-pixel discrepancy model and the panel.

An *expert model* turns a batch of true label maps into one expert's labels. A
:class:`ExpertPanel` holds E of them and produces the ``expert_labels`` tensor
(B, E, *S) that the DeferredSeg loss expects, seeded and reproducible, on the
target's device, with no per-pixel Python loops.

Randomness. A panel either *resamples* its experts every call (``resample=True``,
the default: one ``torch.Generator`` per device, seeded with ``seed``, advancing
call by call) or keeps them *fixed per image* (``resample=False``): each image's
labels come from a generator seeded with a hash of ``(seed, image id)``, so the
same image gets the same expert labels in every epoch, in any batch, in any
order, in any worker. CPU and CUDA generators are different streams: the same
seed gives reproducible, but device-specific, samples.
"""

from __future__ import annotations

import hashlib
import numbers
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ._morph import dilate

__all__ = [
    "ExpertModel",
    "DiscrepancyExpert",
    "ExpertPanel",
    "PROFILES",
    "simulated_experts",
    "derive_seed",
]

#: The released code's expert profiles: (fg_acc, bg_acc, edge_boost) per expert.
PROFILES: Dict[str, Tuple[Tuple[float, float, float], ...]] = {
    "same-accuracy": ((0.92, 0.98, 0.05), (0.91, 0.99, 0.05), (0.93, 0.97, 0.05)),
    "complementary": (
        (0.97, 0.90, 0.08),
        (0.88, 0.99, 0.08),
        (0.88, 0.90, 0.20),
        (0.97, 0.99, 0.08),
        (0.97, 0.90, 0.20),
    ),
}


def derive_seed(seed: int, key) -> int:
    """A stable 63-bit seed from ``(seed, key)`` (the same in every process and run).

    Args:
        seed: the base seed.
        key: a hashable key (an image id: an int, a string, a 0-d tensor); numpy and
            Python integers of the same value give the same seed.

    Returns:
        A seed in [0, 2**63).
    """
    if isinstance(key, torch.Tensor):
        key = key.item()
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        key = int(key)  # numpy and python integers name the same image
    data = f"{int(seed)}\x1f{type(key).__name__}\x1f{key}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _random_other_label(
    y: torch.Tensor, num_labels: int, generator: torch.Generator
) -> torch.Tensor:
    """A label drawn uniformly from the num_labels - 1 labels other than y (1 - y when binary)."""
    step = torch.randint(1, num_labels, y.shape, generator=generator, device=y.device)
    return (y + step) % num_labels


class ExpertModel:
    """One simulated expert: ``sample(target, num_labels, generator)`` -> its labels.

    ``target`` is (B, *S) int64 with values in [0, num_labels) (0 is background),
    1 to 3 spatial dims; the result has the same shape and dtype. Subclasses draw
    every random number from ``generator`` (on the target's device).

    Attributes:
        name: the expert's name (in reports and review tasks).
    """

    name: str = "expert"

    def sample(
        self, target: torch.Tensor, num_labels: int, generator: torch.Generator
    ) -> torch.Tensor:
        """This expert's labels of ``target``.

        Args:
            target: (B, *S) int64 true labels in [0, num_labels).
            num_labels: K', the number of label values.
            generator: the source of every random draw, on the target's device.

        Returns:
            (B, *S) int64 labels.

        Raises:
            NotImplementedError: in this base class; subclasses implement it.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _check_prob(name: str, value: float) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return v


class DiscrepancyExpert(ExpertModel):
    """The released code's per-pixel expert: keeps the true label with a region's accuracy.

    A pixel keeps its true label with probability

    - ``fg_acc`` on the foreground (label != 0),
    - ``min(bg_acc + edge_boost, 1)`` on background pixels within ``edge_radius``
      of the foreground (a box of side 2 * edge_radius + 1, found by max-pool dilation),
    - ``bg_acc`` on the rest of the background,

    independently per pixel; otherwise it gets another label, uniformly among the
    others (the flipped label when binary).

    Args:
        fg_acc: accuracy on the foreground, in [0, 1].
        bg_acc: accuracy on the background, in [0, 1].
        edge_boost: added to ``bg_acc`` near the foreground (>= 0).
        edge_radius: the radius of that band in pixels (an integer >= 0).
        name: the expert's name (default: its parameters).

    Raises:
        ValueError: an accuracy outside [0, 1], a negative ``edge_boost``, or an
            ``edge_radius`` that is not an integer >= 0.
    """

    def __init__(
        self,
        fg_acc: float,
        bg_acc: float,
        edge_boost: float = 0.0,
        edge_radius: int = 3,
        name: Optional[str] = None,
    ):
        self.fg_acc = _check_prob("fg_acc", fg_acc)
        self.bg_acc = _check_prob("bg_acc", bg_acc)
        self.edge_boost = float(edge_boost)
        if self.edge_boost < 0:
            raise ValueError(f"edge_boost must be >= 0, got {edge_boost!r}")
        if int(edge_radius) != edge_radius or edge_radius < 0:
            raise ValueError(f"edge_radius must be an integer >= 0, got {edge_radius!r}")
        self.edge_radius = int(edge_radius)
        self.name = name or f"discrepancy(fg={fg_acc:g},bg={bg_acc:g},edge={edge_boost:g})"

    @property
    def edge_acc(self) -> float:
        """The accuracy in the band near the foreground, ``min(bg_acc + edge_boost, 1)``."""
        return min(self.bg_acc + self.edge_boost, 1.0)

    def region_accuracy(self, target: torch.Tensor) -> torch.Tensor:
        """The per-pixel probability of keeping the true label.

        Args:
            target: (B, *S) integer labels (0: background).

        Returns:
            (B, *S) float32 accuracies.
        """
        fg = target != 0
        near = dilate(fg, self.edge_radius) & ~fg
        acc = torch.full(target.shape, self.bg_acc, dtype=torch.float32, device=target.device)
        acc = torch.where(near, torch.tensor(self.edge_acc, device=target.device), acc)
        return torch.where(fg, torch.tensor(self.fg_acc, device=target.device), acc)

    def sample(self, target, num_labels, generator):
        acc = self.region_accuracy(target)
        keep = torch.rand(target.shape, generator=generator, device=target.device) < acc
        return torch.where(keep, target, _random_other_label(target, num_labels, generator))


class ExpertPanel:
    """E expert models producing ``expert_labels`` (B, E, *S) int64 from a target.

    Args:
        experts: the expert models (``ExpertModel`` instances, e.g.
            :class:`DiscrepancyExpert` or the structured experts).
        num_labels: K' = max(K, 2), the number of label values.
        seed: the seed of every random draw.
        resample: True: new labels at every call (a generator per device that
            advances); False: fixed per image, keyed by the ``ids`` passed to
            ``__call__`` (see the module docstring).
        ignore_index: target pixels with this value get this value from every expert.
        names: optional expert names (default: each model's ``name``).

    Raises:
        ValueError: no experts; ``num_labels`` not an integer >= 2; ``names`` not one
            per expert.
        TypeError: an expert that is not an :class:`ExpertModel`.
    """

    def __init__(
        self,
        experts: Sequence[ExpertModel],
        num_labels: int = 2,
        seed: int = 0,
        resample: bool = True,
        ignore_index: int = -100,
        names: Optional[Sequence[str]] = None,
    ):
        experts = list(experts)
        if not experts:
            raise ValueError("an ExpertPanel needs at least one expert")
        for i, e in enumerate(experts):
            if not isinstance(e, ExpertModel):
                raise TypeError(f"experts[{i}] must be an ExpertModel, got {type(e).__name__}")
        if int(num_labels) != num_labels or num_labels < 2:
            raise ValueError(
                f"num_labels must be an integer >= 2 (max(num_classes, 2)), got {num_labels!r}"
            )
        self.experts: List[ExpertModel] = experts
        self.num_labels = int(num_labels)
        self.seed = int(seed)
        self.resample = bool(resample)
        self.ignore_index = int(ignore_index)
        if names is not None and len(names) != len(experts):
            raise ValueError(f"names has {len(names)} entries for {len(experts)} experts")
        self.names = list(names) if names is not None else [e.name for e in experts]
        self._stream_seed = self.seed
        self._streams: Dict[str, torch.Generator] = {}

    @property
    def num_experts(self) -> int:
        """E, the number of experts."""
        return len(self.experts)

    def reseed(self, seed: int) -> None:
        """Use ``seed`` for everything: the resampling streams restart and fixed-per-image
        labels change.

        Args:
            seed: the new seed.
        """
        self.seed = int(seed)
        self.reseed_stream(seed)

    def reseed_stream(self, seed: int) -> None:
        """Restart only the resampling streams from ``seed``; fixed-per-image labels stay as
        they are.

        This is what a data loader's per-worker seeding calls (see ``deferredseg.data``).

        Args:
            seed: the streams' new seed.
        """
        self._stream_seed = int(seed)
        self._streams.clear()

    def _stream(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._streams.get(key)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(derive_seed(self._stream_seed, "stream"))
            self._streams[key] = g
        return g

    def _check_target(self, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
        if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"target must be an integer tensor (B, *S), got dtype {target.dtype}")
        if not 2 <= target.dim() <= 4:
            raise ValueError(
                f"target must be (B, *S) with 1 to 3 spatial dims, got shape {tuple(target.shape)}"
            )
        return target.long()

    def __call__(self, target: torch.Tensor, ids: Optional[Iterable] = None) -> torch.Tensor:
        """Expert labels (B, E, *S) int64 for ``target`` (B, *S).

        Args:
            target: (B, *S) integer labels, 1 to 3 spatial dims, in [0, num_labels) or
                ``ignore_index``.
            ids: one hashable per image (an int, a string, a 0-d tensor): required
                when the panel is fixed per image, ignored when it resamples.

        Returns:
            (B, E, *S) int64 expert labels (``ignore_index`` where the target has it).

        Raises:
            TypeError: ``target`` is not an integer tensor.
            ValueError: ``target`` without 1 to 3 spatial dims, or with a value out of
                range; ``ids`` missing, or not one per image, for a fixed panel.
        """
        y = self._check_target(target)
        valid = y != self.ignore_index
        clean = torch.where(valid, y, torch.zeros_like(y))
        if valid.any():
            lo, hi = int(clean.min()), int(clean.max())
            if lo < 0 or hi >= self.num_labels:
                raise ValueError(
                    f"target values must lie in [0, {self.num_labels}) or equal ignore_index="
                    f"{self.ignore_index}, got values in [{lo}, {hi}]"
                )
        if self.resample:
            g = self._stream(y.device)
            out = torch.stack([e.sample(clean, self.num_labels, g) for e in self.experts], dim=1)
        else:
            if ids is None:
                raise ValueError(
                    "a panel fixed per image (resample=False) needs ids: one per image of the batch"
                )
            ids = list(ids)
            if len(ids) != y.shape[0]:
                raise ValueError(f"ids has {len(ids)} entries for a batch of {y.shape[0]} images")
            rows = []
            for b, key in enumerate(ids):
                g = torch.Generator(device=y.device)
                g.manual_seed(derive_seed(self.seed, key))
                one = clean[b : b + 1]
                rows.append(
                    torch.stack([e.sample(one, self.num_labels, g) for e in self.experts], dim=1)
                )
            out = torch.cat(rows, dim=0)
        return torch.where(valid.unsqueeze(1), out, torch.full_like(out, self.ignore_index))

    def __getstate__(self):
        state = dict(self.__dict__)
        state[
            "_streams"
        ] = {}  # generators are recreated from the seed (data-loader workers reseed them)
        return state

    def __repr__(self) -> str:
        return (
            f"ExpertPanel(experts={self.experts!r}, num_labels={self.num_labels}, "
            f"seed={self.seed}, "
            f"resample={self.resample})"
        )


def simulated_experts(
    profile="same-accuracy",
    num_labels: int = 2,
    edge_radius: int = 3,
    seed: int = 0,
    resample: bool = True,
    ignore_index: int = -100,
) -> ExpertPanel:
    """A panel of :class:`DiscrepancyExpert` from a named profile or a list of triples.

    ``profile`` is ``"same-accuracy"`` (3 experts), ``"complementary"`` (5
    experts), see :data:`PROFILES`, or a sequence of ``(fg_acc, bg_acc,
    edge_boost)``. ``edge_radius`` is the dilation radius of the edge band (our
    default, 3 pixels, is a parameter: the profiles do not fix it).

    Args:
        profile: a name of :data:`PROFILES`, or a sequence of triples.
        num_labels, seed, resample, ignore_index: as for :class:`ExpertPanel`.
        edge_radius: the edge band's radius in pixels.

    Returns:
        The :class:`ExpertPanel`.

    Raises:
        ValueError: an unknown profile name; an entry that is not a triple; an
            accuracy, ``edge_boost`` or ``edge_radius`` out of range; what
            :class:`ExpertPanel` raises.
    """
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(
                f"profile must be one of {sorted(PROFILES)} or a sequence of "
                f"(fg_acc, bg_acc, edge_boost), got {profile!r}"
            )
        triples = PROFILES[profile]
        prefix = profile
    else:
        triples = tuple(tuple(t) for t in profile)
        prefix = "custom"
        for t in triples:
            if len(t) != 3:
                raise ValueError(
                    f"each profile entry must be (fg_acc, bg_acc, edge_boost), got {t!r}"
                )
    experts = [
        DiscrepancyExpert(fg, bg, eb, edge_radius, name=f"{prefix}-{i}")
        for i, (fg, bg, eb) in enumerate(triples)
    ]
    return ExpertPanel(
        experts, num_labels=num_labels, seed=seed, resample=resample, ignore_index=ignore_index
    )
