"""Small helpers shared by the baseline methods: exact top-k masks, pinning, seeds, state.

Not a method (the leading underscore keeps ``_discover`` from importing it as one). Each
baseline stays one readable file; only the fiddly, easy-to-get-wrong pieces live here:

* ``count_for`` / ``top_fraction``: "the top ``ratio`` of a tensor" as an exact number of
  entries (``round(ratio * numel)``, halves up), chosen with ``torch.topk`` so that tests can
  recompute the same set;
* ``restore_``: put pinned entries back to their anchor *bit for bit* (``torch.where``, not
  arithmetic, so ``-0.0`` and bf16 values survive exactly);
* ``tensor_generator``: a ``torch.Generator`` per (method, seed, tensor name, salt), so random
  choices are reproducible, independent of the global RNG and of which other tensors exist.
  It lives on the tensor's device (drawing a 7B model's masks on the CPU takes minutes), so
  the same seed gives the same choice on the same kind of device; a resumed run never
  redraws, it loads the masks from the state;
* ``pack`` / ``load_group`` / flags: the ``extra_state`` layout ``"<group>/<param name>"``,
  the run directory's method-state key convention (``spider.rundir.state_key``).
"""

from __future__ import annotations

import hashlib
import math

import torch

from spider.methods.base import MethodBase, check_state_tensors, snapshot
from spider.rundir import split_state_key, state_key

FINALIZED_KEY = "finalized"


# --------------------------------------------------------------------- options
def number_option(
    value: object,
    option: str,
    method: str,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> float | int:
    """Return ``value`` as a number inside the interval, or raise a ValueError naming ``option``."""
    kind = "an integer" if integer else "a number"
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(
            f"option '{option}' of method '{method}' must be {kind}; got {value!r}"
        ) from None
    if integer:
        if not number.is_integer():
            raise ValueError(
                f"option '{option}' of method '{method}' must be {kind}; got {value!r}"
            )
        number = int(number)
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if math.isnan(number) or too_low or too_high or math.isinf(number):
        left = "(" if low_open else "["
        right = ")" if high_open or math.isinf(high) else "]"
        interval = f"{left}{low:g}, {'inf' if math.isinf(high) else f'{high:g}'}{right}"
        raise ValueError(
            f"option '{option}' of method '{method}' must be in {interval}; got {value!r}"
        )
    return number


# --------------------------------------------------------------------- masks
def count_for(ratio: float, numel: int) -> int:
    """Number of entries that make up ``ratio`` of ``numel``: ``round(ratio * numel)``, halves up."""
    return min(numel, max(0, math.floor(ratio * numel + 0.5)))


def top_fraction(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask, True on exactly ``count_for(ratio, numel)`` entries of highest ``score``."""
    flat = score.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=score.device)
    k = count_for(ratio, flat.numel())
    if k:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view(score.shape)


def tensor_generator(
    purpose: str, seed: int, name: str, salt: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """Generator on ``device`` seeded from (purpose, seed, tensor name, salt).

    ``purpose`` (the method name) keeps methods that share a seed on independent streams.
    """
    key = f"{purpose}/{seed}/{salt}/{name}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") % 2**63)


def random_fraction(shape: torch.Size, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Bool mask (on the generator's device) with exactly ``count_for(ratio, numel)`` entries
    True, chosen uniformly at random."""
    return top_fraction(torch.rand(shape, generator=generator, device=generator.device), ratio)


@torch.no_grad()
def restore_(p: torch.Tensor, anchor: torch.Tensor, pinned: torch.Tensor) -> None:
    """``p[pinned] = anchor[pinned]`` exactly (anchor in ``p``'s dtype), in place."""
    p.copy_(torch.where(pinned, anchor, p))


# --------------------------------------------------------------------- state
def pack(group: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"<group>/<name>": tensor}``: the key layout of every baseline's ``extra_state``."""
    return {state_key(group, name): t for name, t in tensors.items()}


def take_group(tensors: dict[str, torch.Tensor], group: str) -> dict[str, torch.Tensor]:
    """Remove and return the ``"<group>/..."`` entries of ``tensors``, keyed by param name."""
    keys = [key for key in tensors if split_state_key(key)[0] == group
            and split_state_key(key)[1] is not None]
    return {split_state_key(key)[1]: tensors.pop(key) for key in keys}


@torch.no_grad()
def load_group(targets: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``given`` into the existing ``targets`` (their device and dtype), all keys required."""
    check_state_tensors(targets, given, what)
    missing = sorted(set(targets) - set(given))
    if missing:
        raise ValueError(f"{what} tensor '{missing[0]}' is missing from the method state")
    for name, target in targets.items():
        target.copy_(given[name])


def flag(value: bool) -> torch.Tensor:
    """A 0-d uint8 tensor (safetensors has no Python bools in its tensor map)."""
    return torch.tensor(int(value), dtype=torch.uint8)


def take_flag(tensors: dict[str, torch.Tensor], key: str = FINALIZED_KEY) -> bool:
    """Remove ``key`` from ``tensors`` and return it as a bool; a missing flag is an error."""
    if key not in tensors:
        raise ValueError(f"state tensor '{key}' is missing from the method state")
    value = tensors.pop(key)
    if value.numel() != 1:
        raise ValueError(
            f"state tensor '{key}' must hold one value, has shape {tuple(value.shape)}"
        )
    return bool(value.item())


def reject_leftovers(tensors: dict[str, torch.Tensor], method: str) -> None:
    if tensors:
        raise ValueError(f"unknown tensor '{sorted(tensors)[0]}' in the state of method '{method}'")


class SparsePatchMethod(MethodBase):
    """Shared by the post-hoc methods that keep a sparse patch of the delta (DARE, Tailor).

    They train like full fine-tuning; ``finalize`` chooses, per tensor, which delta entries
    to keep (``self.kept``) and reverts the rest to theta0. Before ``finalize`` the masks are
    all ones, after it they are the kept sets. Subclasses implement ``finalize`` and list any
    further state tensors in ``state_groups``.
    """

    def __init__(self, model, options=None):
        super().__init__(model, options)
        self.theta0 = snapshot(self.params)
        self.kept: dict[str, torch.Tensor] = {}
        self.finalized = False

    def state_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        """Groups of state tensors besides theta0 and the kept masks (e.g. the Fisher sums)."""
        return {}

    def masks(self) -> dict[str, torch.Tensor]:
        if not self.finalized:
            return super().masks()
        return {name: keep.float() for name, keep in self.kept.items()}

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {FINALIZED_KEY: flag(self.finalized), **pack("theta0", self.theta0)}
        for group, tensors in self.state_groups().items():
            state.update(pack(group, tensors))
        state.update(pack("kept", self.kept))
        return state

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        finalized = take_flag(tensors)
        load_group(self.theta0, take_group(tensors, "theta0"), "theta0")
        for group, targets in self.state_groups().items():
            load_group(targets, take_group(tensors, group), group)
        kept = take_group(tensors, "kept")
        if finalized:
            self.kept = {n: torch.zeros_like(t, dtype=torch.bool) for n, t in self.theta0.items()}
            load_group(self.kept, kept, "kept")
        elif kept:
            raise ValueError("state has 'kept' masks but is not finalized")
        reject_leftovers(tensors, self.name)
        self.finalized = finalized
