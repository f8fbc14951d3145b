"""Model-Dowser: freeze the weights whose removal would move the output most; train the rest.

Why: Model-Dowser (Hwang, Son, Kim, ICML 2026; paper summary in
``/work/shared/papers/model-dowser-summary.md``) scores every weight of every linear layer
once, before fine-tuning, by how far the pre-trained model's output would move if that
weight were removed, on prompts the model writes itself (no pre-training data). Only the
lowest-scoring fraction ``ratio`` of each matrix trains; the rest never leaves theta0.

Score, as the authors' released code computes it (``llava_importance_self_gen_prompt.py``),
for a linear layer ``z = W h + b`` with weight ``W`` (d_out x d_in)::

    S_ij = mean over (probe, batch) pairs t of  psi_t,i * |W_ij| * a_t,j     (weights: batch size)
    psi_t,i = mean over batch and positions of |d(xi_t . f) / d z_i|,  f = last-position logits,
              xi_t a Rademacher vector (R = ``probes`` per batch), xi . f divided by the batch size
    a_t,j   = mean over batch and positions of |h_j|

Boundary rules of the code: a projector's (vision-to-LLM) input factor ``a`` is 1, and
``lm_head``'s sensitivity ``psi`` is 1 (its outputs are the logits themselves). Because the
score is ``|W| * (sum_t w_t psi_t a_t^T) / sum_t w_t``, only the factor vectors are kept (a
few hundred vectors per matrix); the matrix is formed one tensor at a time.

Probe prompts: ``samples`` sequences of ``text_len`` tokens, each ``<bos>`` + 1-5 random
non-special tokens continued by the model itself (sampling: temperature 0.9, top-p 0.9,
repetition penalty 1.05; generated in batches of 4; EOS is suppressed so every prompt has
``text_len`` tokens, where the released code lets a short one run on after EOS). Text only
by default, as the published commands (``--image-off``); ``images=noise`` puts the image
tokens of one N(0, 1) noise image (in normalised pixel space) in front, LLaVA-style models.
A model that cannot generate (no ``generate``, e.g. a plain ``nn.Module``) has no prompts:
its scores fall back to ``|W|`` (psi = a = 1) with a warning; pass your own inputs to
:func:`importance_scores` instead.

Mask, per matrix: exactly ``round(ratio * numel)`` entries of lowest score train, chosen in
float32 by a stable sort (ties: the lower flat index trains). Which tensors get a mask
(following the released code, which masks only >= 2-D linear weights): every *trainable*
``nn.Linear`` weight the probes reach. Other trainable tensors -- norms, biases, embeddings,
convolutions, and linear layers the probes never reach (the projector with text-only probes)
-- train densely, as in the released code (mask 1).

Applied to gradients: a post-accumulate-gradient hook on each masked weight zeroes the frozen
entries of its ``.grad`` in place at the end of backward (so clipping sees only trainable
entries, as in the released code; one in-place pass, no new tensor), and
frozen entries are excluded from weight decay (a step hook of every optimizer moves the decay
of the groups holding masked weights onto their trainable entries only), so frozen entries
stay bit-equal to theta0 under AdamW, Adam and SGD with or without decay. On CPUs, frozen
entries' Adam second moments are kept positive (``_seed_second_moments``: sqrt of zeros is
slow there); their first moments stay 0, so this moves no weight.

Memory beyond full fine-tuning: one bool per masked weight (1 byte/parameter), on the
weight's device; no theta0 copy, no score matrix. The factor vectors stay in the disk cache
(read back when a checkpoint is written; in memory only where no cache file could be written
or after a resume, ``128 x (d_in + d_out) x 4`` bytes a matrix). Scoring runs once, before
training, and is cached on disk (``$SPIDERSCOPE_CACHE/dowser``, default ``~/.cache/spiderscope/dowser``) under
a hash of the model's weights, the device type and the probe options, so several runs of the
same base model reuse it. A checkpoint keeps the mask and the factors (``analysis_state``);
the analysis rebuilds the score from them and theta0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import warnings
import weakref
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from spider.methods._baseline_utils import count_for, number_option
from spider.methods.base import STAT_COLUMNS, MethodBase, choice, register

CACHE_VERSION = 1
GENERATION = {"temperature": 0.9, "top_p": 0.9, "repetition_penalty": 1.05}
PREFIX = (1, 5)  # random prefix length after <bos>, inclusive
GENERATE_BATCH = 4


@dataclasses.dataclass
class DowserOptions:
    ratio: float = dataclasses.field(default=0.1, metadata={
        "help": "fraction of each linear weight that trains: its entries of lowest score"})
    probes: int = dataclasses.field(default=8, metadata={
        "help": "Rademacher probes per batch of synthetic prompts (R)"})
    samples: int = dataclasses.field(default=64, metadata={
        "help": "self-generated synthetic prompts scored (N)"})
    text_len: int = dataclasses.field(default=64, metadata={
        "help": "tokens per synthetic prompt"})
    images: str = dataclasses.field(default="off", metadata={
        "help": "images in the probe prompts: off (text only) or noise (one noise image each)"})
    seed: int = dataclasses.field(default=0, metadata={
        "help": "seed of the prompts and probes"})

    def __post_init__(self) -> None:
        self.ratio = number_option(self.ratio, "ratio", "dowser", 0.0, 1.0)
        self.probes = number_option(self.probes, "probes", "dowser", 1, integer=True)
        self.samples = number_option(self.samples, "samples", "dowser", 1, integer=True)
        self.text_len = number_option(self.text_len, "text_len", "dowser", 2, integer=True)
        choice(self.images, ("off", "noise"), "images", "dowser")
        self.seed = number_option(self.seed, "seed", "dowser", 0, 2**63 - 1, integer=True)


# ============================================================================ the estimator
@dataclasses.dataclass
class Factors:
    """One linear weight's score factors: ``S = |W| * (psi^T diag(w) act) / sum(w)``.

    ``psi`` (T x d_out), ``act`` (T x d_in) and ``weight`` (T) are float32, one row per
    (probe, batch) pair.
    """

    psi: torch.Tensor
    act: torch.Tensor
    weight: torch.Tensor

    def mean_outer(self) -> torch.Tensor:
        """``sum_t w_t psi_t a_t^T / sum_t w_t`` (d_out x d_in, float32)."""
        w = self.weight / self.weight.sum()
        return (self.psi * w[:, None]).T @ self.act

    def score(self, weight: torch.Tensor) -> torch.Tensor:
        """The score of ``weight`` (float32, its shape)."""
        m = self.mean_outer().to(weight.device)
        return weight.detach().float().abs() * m


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear, str]]:
    """(module name, module, parameter name of its weight) of every ``nn.Linear`` whose weight
    is one of the model's parameters (tied weights: the first name ``named_parameters`` gives)."""
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    out = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) in names:
            out.append((module_name, module, names[id(module.weight)]))
    return out


def _boundary(param_name: str) -> str | None:
    """``"input"`` for a projector linear (a = 1), ``"output"`` for lm_head (psi = 1)."""
    from spider.naming import parse_param_name

    parsed = parse_param_name(param_name)
    if parsed.component == "projector":
        return "input"
    if parsed.module == "lm_head":
        return "output"
    return None


def _feature_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of |x| over every axis but the last (float32)."""
    x = x.detach().float().abs()
    return x.reshape(-1, x.shape[-1]).mean(0) if x.dim() > 1 else x


def _last_logits(output: Any) -> torch.Tensor:
    """f: the logits at the last position (B x V), or a plain model's (B x K) output."""
    logits = getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits[:, -1, :] if logits.dim() == 3 else logits


def probe_factors(model: nn.Module, batches, probes: int = 8, seed: int = 0
                  ) -> dict[str, Factors]:
    """The score factors of every linear weight the inputs reach, by parameter name.

    ``batches``: model inputs (dicts of keyword arguments, or tensors passed positionally).
    Per batch one forward pass and ``probes`` backward passes of ``xi . f / B`` (``xi`` drawn
    from a generator seeded by (seed, batch index) on the logits' device). Nothing is written
    to ``.grad``; the model's modes and ``requires_grad`` flags are restored.
    """
    targets = _linears(model)
    records: dict[str, dict[str, list]] = {pn: {"psi": [], "act": [], "w": []}
                                           for _, _, pn in targets}
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def hook(param_name):
        def fn(module, args, output):
            if torch.is_grad_enabled() and output.requires_grad:
                calls.setdefault(param_name, []).append((_feature_mean(args[0]), output))
        return fn

    was_training = model.training
    flags = [(p, p.requires_grad) for _, m, _ in targets for p in (m.weight,)]
    handles = [m.register_forward_hook(hook(pn)) for _, m, pn in targets]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(True)  # so every linear output is on the graph; no .grad is written
        for index, batch in enumerate(batches):
            calls.clear()
            with torch.enable_grad():
                if isinstance(batch, dict):
                    if hasattr(getattr(model, "config", None), "use_cache"):
                        batch = {"use_cache": False, **batch}  # no key/value cache to keep
                    output = model(**batch)
                else:
                    output = model(batch)
                f = _last_logits(output).float()
                size = f.shape[0]
                reached = [pn for pn in calls]
                outs = [z for pn in reached for _, z in calls[pn]]
                generator = torch.Generator(device=f.device).manual_seed(
                    int.from_bytes(hashlib.blake2b(f"dowser/{seed}/{index}".encode(),
                                                   digest_size=8).digest(), "little") % 2**63)
                for _ in range(probes):
                    xi = torch.randint(0, 2, f.shape, generator=generator,
                                       device=f.device).float().mul_(2).sub_(1)
                    s = (xi * f).sum() / size
                    grads = torch.autograd.grad(s, outs, retain_graph=True, allow_unused=True)
                    k = 0
                    for pn in reached:
                        n_calls = len(calls[pn])
                        gs = grads[k:k + n_calls]
                        k += n_calls
                        if all(g is None for g in gs):
                            continue  # not upstream of the logits
                        psi = torch.stack([_feature_mean(g) if g is not None
                                           else torch.zeros_like(_feature_mean(z))
                                           for g, (_, z) in zip(gs, calls[pn])]).mean(0)
                        act = torch.stack([a for a, _ in calls[pn]]).mean(0)
                        records[pn]["psi"].append(psi)
                        records[pn]["act"].append(act)
                        records[pn]["w"].append(float(size))
            del output, f, outs
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
        calls.clear()

    out: dict[str, Factors] = {}
    for _, _, pn in targets:
        rec = records[pn]
        if not rec["psi"]:
            continue
        psi = torch.stack(rec["psi"]).cpu()
        act = torch.stack(rec["act"]).cpu()
        side = _boundary(pn)
        if side == "input":
            act = torch.ones_like(act)
        elif side == "output":
            psi = torch.ones_like(psi)
        out[pn] = Factors(psi, act, torch.tensor(rec["w"], dtype=torch.float32))
    return out


def importance_scores(model: nn.Module, batches, probes: int = 8, seed: int = 0
                      ) -> dict[str, torch.Tensor]:
    """Model-Dowser's score ``S_ij = psi_i |W_ij| a_j`` of every linear weight that
    ``batches`` reach, by parameter name (float32, on the weight's device).

    ``batches`` are model inputs: dicts of keyword arguments (e.g. ``input_ids`` and
    ``attention_mask``; labels are not needed) or tensors for a plain module. ``f`` is the
    output at the last position. See the module docstring for the estimator.
    """
    batches = list(batches)
    params = dict(model.named_parameters())
    return {name: factors.score(params[name])
            for name, factors in probe_factors(model, batches, probes, seed).items()}


# ============================================================================ the prompts
def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def _special_ids(model: nn.Module) -> tuple[int, list[int]]:
    """(bos id, every special id) from the model's configs."""
    configs = [getattr(model, "generation_config", None), _text_config(model),
               getattr(model, "config", None)]
    ids: dict[str, int] = {}
    for config in configs:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id",
                    "image_token_index", "video_token_id"):
            value = getattr(config, key, None) if config is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int) and key not in ids:
                ids[key] = value
    bos = ids.get("bos_token_id", 1)
    return bos, sorted(set(ids.values()))


def can_generate(model: nn.Module) -> bool:
    config = _text_config(model)
    return hasattr(model, "generate") and isinstance(getattr(config, "vocab_size", None), int)


@torch.no_grad()
def synthetic_batches(model: nn.Module, samples: int = 64, text_len: int = 64,
                      images: str = "off", seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The probe prompts: ``samples`` self-generated sequences in batches of 4 (see module).

    Seeded; the global RNG is left as it was.
    """
    device = next(model.parameters()).device
    vocab = int(_text_config(model).vocab_size)
    bos, special = _special_ids(model)
    pad = next((i for i in (getattr(_text_config(model), "pad_token_id", None),
                            getattr(getattr(model, "generation_config", None), "pad_token_id",
                                    None)) if isinstance(i, int)), bos)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    batches = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            done = 0
            while done < samples:
                size = min(GENERATE_BATCH, samples - done)
                done += size
                lengths = torch.randint(PREFIX[0], PREFIX[1] + 1, (size,), generator=generator)
                width = min(int(lengths.max()) + 1, text_len)
                ids = torch.full((size, width), pad, dtype=torch.long)
                mask = torch.zeros((size, width), dtype=torch.long)
                for row, length in enumerate(lengths.tolist()):
                    prefix = torch.randint(0, vocab, (length,), generator=generator)
                    if special:
                        prefix[torch.isin(prefix, torch.tensor(special))] = bos
                    seq = torch.cat([torch.tensor([bos]), prefix])[:width]
                    ids[row, width - len(seq):] = seq  # left-padded, for generation
                    mask[row, width - len(seq):] = 1
                ids, mask = ids.to(device), mask.to(device)
                remain = text_len - width
                if remain > 0:
                    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                         max_new_tokens=remain, min_new_tokens=remain,
                                         pad_token_id=pad, use_cache=True, **GENERATION)
                    ids = out[:, :text_len]
                    mask = torch.cat([mask, torch.ones((size, ids.shape[1] - mask.shape[1]),
                                                       dtype=mask.dtype, device=device)], 1)
                batch = {"input_ids": ids, "attention_mask": mask}
                if images == "noise":
                    batch = _with_noise_image(model, batch, generator)
                batches.append(batch)
    finally:
        model.train(was_training)
    return batches


def _with_noise_image(model: nn.Module, batch: dict, generator: torch.Generator) -> dict:
    """Image tokens of one N(0, 1) noise image in front of each prompt (LLaVA-style models)."""
    config = model.config
    token = getattr(config, "image_token_id", None)
    token = token if isinstance(token, int) else getattr(config, "image_token_index", None)
    vision = getattr(config, "vision_config", None)
    if not isinstance(token, int) or vision is None or not hasattr(model, "get_image_features"):
        raise ValueError("option images=noise of method 'dowser' needs a LLaVA-style model "
                         "(an image token, a vision config, get_image_features)")
    size = int(getattr(vision, "image_size", 224))
    channels = int(getattr(vision, "num_channels", 3))
    ids = batch["input_ids"]
    dtype = next(model.parameters()).dtype
    pixels = torch.randn((ids.shape[0], channels, size, size), generator=generator).to(
        ids.device, dtype)
    features = model.get_image_features(pixel_values=pixels[:1])
    features = getattr(features, "pooler_output", None) if not torch.is_tensor(features) \
        else features
    if isinstance(features, (list, tuple)):
        features = features[0]
    n = features.reshape(-1, features.shape[-1]).shape[0]
    image = torch.full((ids.shape[0], n), token, dtype=ids.dtype, device=ids.device)
    return {"input_ids": torch.cat([image, ids], 1),
            "attention_mask": torch.cat([torch.ones_like(image), batch["attention_mask"]], 1),
            "pixel_values": pixels}


# ============================================================================ the cache
def cache_dir() -> Path:
    root = os.environ.get("SPIDERSCOPE_CACHE") or Path.home() / ".cache" / "spiderscope"
    return Path(root) / "dowser"


def weights_hash(model: nn.Module) -> str:
    """blake2b of every parameter's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        t = p.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_key(model: nn.Module, options: DowserOptions) -> str:
    device = next(model.parameters()).device.type
    text = (f"v{CACHE_VERSION}|{weights_hash(model)}|{device}|{options.probes}|"
            f"{options.samples}|{options.text_len}|{options.images}|{options.seed}")
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _save_factors(path: Path, factors: dict[str, Factors]) -> None:
    import safetensors.torch

    tensors = {}
    for name, f in factors.items():
        tensors[f"psi/{name}"] = f.psi.contiguous()
        tensors[f"act/{name}"] = f.act.contiguous()
        tensors[f"weight/{name}"] = f.weight.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    safetensors.torch.save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _factors_from(tensors: dict[str, torch.Tensor]) -> dict[str, Factors]:
    names = [k.split("/", 1)[1] for k in tensors if k.startswith("psi/")]
    return {n: Factors(tensors[f"psi/{n}"].float(), tensors[f"act/{n}"].float(),
                       tensors[f"weight/{n}"].float()) for n in names}


def cached_factors(model: nn.Module, options: DowserOptions
                   ) -> tuple[dict[str, Factors], Path | None]:
    """The model's factors under ``options``: from the disk cache, else scored and cached;
    and the cache file (None when it could not be written)."""
    import safetensors.torch

    path = cache_dir() / f"{cache_key(model, options)}.safetensors"
    if path.is_file():
        try:
            return _factors_from(safetensors.torch.load_file(str(path))), path
        except Exception:  # a damaged cache file is re-made
            pass
    batches = synthetic_batches(model, options.samples, options.text_len, options.images,
                                options.seed)
    factors = probe_factors(model, batches, options.probes, options.seed)
    try:
        _save_factors(path, factors)
    except OSError as err:
        warnings.warn(f"dowser: could not cache the scores in {path}: {err}", stacklevel=2)
        return factors, None
    return factors, path


def _read_factors(path: Path, name: str) -> Factors | None:
    """One weight's factors from a cache file (None when the file or the entry is gone)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return Factors(*(f.get_tensor(f"{g}/{name}").float()
                             for g in ("psi", "act", "weight")))
    except Exception:
        return None


# ============================================================================ the mask
def lowest_fraction(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask, True on exactly ``round(ratio * numel)`` entries of lowest ``score``
    (float32; ties: the lower flat index first)."""
    flat = score.detach().float().reshape(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    k = count_for(ratio, flat.numel())
    if k:
        order = torch.sort(flat, stable=True).indices
        keep[order[:k]] = True
    return keep.view(score.shape)


# integer types of the floating types' widths, to edit gradients bit for bit
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


def zero_frozen_(grad: torch.Tensor, frozen: torch.Tensor) -> None:
    """``grad[frozen] = 0`` in place, exactly (a NaN or inf there becomes +0 as well).

    On CPUs ``masked_fill_`` with a bool mask runs element by element (~25x an ``add_``);
    the same result comes from the gradient's bits as integers: ``bits - bits * frozen``
    is ``bits`` where the mask is 0 and 0 (the bits of +0.0) where it is 1, one vectorised
    pass with the bool mask read as uint8 (no copy of it, no temporary).
    """
    bits = _BITS.get(grad.dtype)
    if grad.device.type != "cpu" or bits is None or grad.shape != frozen.shape:
        grad.masked_fill_(frozen, 0)
        return
    as_int = grad.view(bits)
    as_int.addcmul_(as_int, frozen.view(torch.uint8), value=-1)


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


# Every live Dowser method, for the optimizer step hooks (weight decay of frozen entries).
_LIVE: weakref.WeakSet = weakref.WeakSet()
_HOOKS: list = []


def _frozen_of(param: torch.Tensor) -> torch.Tensor | None:
    for method in list(_LIVE):
        frozen = method._frozen_by_id.get(id(param))
        if frozen is not None and method._by_id.get(id(param)) is param:
            return frozen
    return None


def _decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))


def _pre_step(optimizer, args, kwargs) -> None:
    """Move the weight decay of groups holding masked weights onto their trainable entries."""
    if not _LIVE:
        return
    for group in optimizer.param_groups:
        decay = group.get("weight_decay", 0.0)
        if not decay:
            continue
        masks = [_frozen_of(p) for p in group["params"]]
        if all(m is None for m in masks):
            continue
        lr = group["lr"]
        with torch.no_grad():
            for p, frozen in zip(group["params"], masks):
                if p.grad is None:
                    continue  # the optimizer skips it, decay included
                if _decoupled(optimizer, group):  # AdamW: p <- p - lr * decay * p, first
                    if frozen is None:
                        p.mul_(1 - lr * decay)
                    else:  # p - 0 on frozen entries: bit-equal
                        p.sub_(p.masked_fill(frozen, 0), alpha=lr * decay)
                else:  # coupled L2 (SGD, Adam): grad <- grad + decay * p
                    term = p if frozen is None else p.masked_fill(frozen, 0)
                    p.grad.add_(term, alpha=decay)
        group["_dowser_decay"] = decay
        group["weight_decay"] = 0.0


def _post_step(optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        if "_dowser_decay" in group:
            group["weight_decay"] = group.pop("_dowser_decay")
    if _LIVE:
        _seed_second_moments(optimizer)


#: what Adam's second moment of a frozen entry is set to (any positive normal float would do)
SECOND_MOMENT_SEED = 1.0
#: re-seed before ``beta2 ** steps`` takes the seed below this (float32's normals end ~1e-38)
_SEED_FLOOR = 1e-30


def reseed_interval(beta2: float) -> int | None:
    """Optimizer steps between two seedings of frozen entries' second moments (``None``:
    not worth it, the moment decays to nothing within a few dozen steps)."""
    if beta2 >= 1.0:
        return 1 << 62  # no decay: once
    if beta2 <= 0.0:
        return None
    every = int(math.log(_SEED_FLOOR) / math.log(beta2))
    return every if every >= 64 else None


@torch.no_grad()
def _seed_second_moments(optimizer) -> None:
    """Give frozen entries' Adam second moments a positive value, on the CPU.

    Why: a frozen entry's gradient is 0, so its first moment stays exactly 0 and its update
    ``lr * m / (sqrt(v) + eps)`` is 0 whatever ``v`` is; but its ``v`` would be 0 too, and
    on x86 CPUs ``sqrt`` of zeros (and of subnormals) is several times slower than of normal
    floats: with 90 % of entries frozen, AdamW's step took ~1.5x its dense time. Seeding
    ``v`` with 1 at the first step, and again every ``reseed_interval(beta2)`` steps before
    ``beta2**t`` makes it subnormal, keeps Dowser's step as fast as full fine-tuning's and
    changes no weight. Steps are counted by the optimizer's own ``step``, so a resumed run
    seeds at the same steps as an uninterrupted one. Not on GPUs (no such slowdown there).
    """
    for group in optimizer.param_groups:
        betas = group.get("betas")
        every = reseed_interval(float(betas[1])) if betas else None
        if every is None:
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or p.device.type != "cpu" or "exp_avg_sq" not in state:
                continue
            step = state.get("step")
            if step is None or (int(step) - 1) % every:
                continue
            frozen = _frozen_of(p)
            if frozen is None:
                continue
            for key in ("exp_avg_sq", "max_exp_avg_sq"):
                moment = state.get(key)
                if moment is not None and moment.shape == frozen.shape:
                    moment.masked_fill_(frozen, SECOND_MOMENT_SEED)


def _install_hooks() -> None:
    if not _HOOKS:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        _HOOKS.append(register_optimizer_step_pre_hook(_pre_step))
        _HOOKS.append(register_optimizer_step_post_hook(_post_step))


# ============================================================================ the method
@register("dowser")
class Dowser(MethodBase):
    """Trains only the lowest-scoring ``ratio`` of each linear weight (Model-Dowser scores);
    the rest is frozen at theta0 through the gradients.

    Attributes:
        frozen: per masked weight, a bool tensor, True where the entry is frozen.
        factors: per masked weight, the score factors (``Factors``) held in memory: none
            when they are in the disk cache (read back for checkpoints and the analysis).
    """

    Options: ClassVar[type] = DowserOptions
    #: what ``importances()`` reports: the score S as the pre-training importance only
    importance_kinds: ClassVar[tuple[str, ...]] = ("pre",)
    summary: ClassVar[str] = (
        "Model-Dowser: scores each linear weight once by output sensitivity x |W| x input "
        "on self-generated prompts; only the lowest-scoring ratio (default 10%) trains.")

    #: built with ``scored=False`` a Dowser has no mask until ``load_state_dict`` gives it
    #: the saved one: how a resume (``spider.integrations.hf``) skips scoring weights that
    #: are no longer theta0 (a cache miss, and a score the saved mask replaces anyway)
    builds_unscored: ClassVar[bool] = True

    def __init__(self, model: nn.Module, options: Any | None = None, *, scored: bool = True):
        super().__init__(model, options)
        self.frozen: dict[str, torch.Tensor] = {}
        self.factors: dict[str, Factors] = {}
        self._factor_file: Path | None = None
        self._pre_stats: dict[str, torch.Tensor] = {}  # mean and mean square of S at theta0
        self._handles: list = []
        self._by_id: dict[int, torch.Tensor] = {}
        self._frozen_by_id: dict[int, torch.Tensor] = {}
        linears = {pn for _, _, pn in _linears(model)}
        targets = [n for n in self.params if n in linears and self.params[n].dim() == 2]
        if targets and scored:
            if can_generate(model):
                factors, self._factor_file = cached_factors(model, self.options)
            else:
                warnings.warn("dowser: the model cannot generate probe prompts; scoring by "
                              "|W| alone (pass your own inputs to importance_scores)",
                              stacklevel=2)
                factors = {n: Factors(torch.ones(1, self.params[n].shape[0]),
                                      torch.ones(1, self.params[n].shape[1]), torch.ones(1))
                           for n in targets}
            for name in targets:
                if name in factors:
                    self._adopt(name, factors[name])
            if self._factor_file is not None:
                self.factors = {}  # on disk: memory keeps the masks alone
        _LIVE.add(self)
        _install_hooks()
        # a method dropped without finalize() takes its gradient hooks with it
        weakref.finalize(self, _remove_handles, self._handles)

    def _adopt(self, name: str, factors: Factors) -> None:
        """Mask ``name`` by ``factors`` (its weights are theta0)."""
        score = factors.score(self.params[name])
        self.factors[name] = factors
        self.frozen[name] = ~lowest_fraction(score, self.options.ratio)
        self._pre_stats[name] = torch.stack([score.double().mean(),
                                             score.double().square().mean()]).cpu()
        del score
        self._watch(name)

    def _watch(self, name: str) -> None:
        p, frozen = self.params[name], self.frozen[name]
        self._by_id[id(p)] = p
        self._frozen_by_id[id(p)] = frozen
        # Zero the frozen entries of p.grad in place, once the backward pass has accumulated
        # into it: no new gradient tensor per step (a tensor hook must return a fresh one),
        # and clipping, which runs after backward, still sees only trainable entries.
        def zero_frozen(param: torch.Tensor, frozen: torch.Tensor = frozen) -> None:
            zero_frozen_(param.grad, frozen)

        self._handles.append(p.register_post_accumulate_grad_hook(zero_frozen))

    def _unwatch(self) -> None:
        _remove_handles(self._handles)
        self._by_id.clear()
        self._frozen_by_id.clear()

    def finalize(self) -> None:
        self._unwatch()  # training is over: the model's gradients are its own again

    # ----------------------------------------------------------------- views
    def masks(self) -> dict[str, torch.Tensor]:
        return {name: (~self.frozen[name]).float() if name in self.frozen
                else torch.ones_like(p, dtype=torch.float32) for name, p in self.params.items()}

    def importances(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"pre": S}`` per masked weight: the score at the weights the tensor holds, which
        is the pre-training score wherever they are theta0 (every frozen entry; every entry
        of the method the analysis rebuilds on theta0). Dowser has no fine-tuning importance."""
        out = {}
        for name in self.frozen:
            f = self.factor_of(name)
            if f is not None:
                out[name] = {"pre": f.score(self.params[name])}
        return out

    def factor_of(self, name: str) -> Factors | None:
        """The score factors of masked weight ``name`` (from memory or the disk cache)."""
        if name in self.factors:
            return self.factors[name]
        if self._factor_file is not None:
            return _read_factors(self._factor_file, name)
        return None

    def compute_statistics(self) -> dict[str, dict[str, float]]:
        """The mask's share and the score's moments at theta0 (computed once: neither changes)."""
        out = {}
        for name in self.params:
            row = dict.fromkeys(STAT_COLUMNS, float("nan"))
            free = 1.0
            if name in self.frozen:
                free = 1.0 - float(self.frozen[name].float().mean())
            row["mask_mean"] = row["mask_density"] = free
            if "mask_churn" in row:
                row["mask_churn"] = 0.0  # the mask is fixed before the first step
            if name in self._pre_stats:
                mean, sq_mean = self._pre_stats[name].tolist()
                row["importance_pre_mean"], row["importance_pre_sq_mean"] = mean, sq_mean
            out[name] = row
        return out

    # ----------------------------------------------------------------- state
    def analysis_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, frozen in self.frozen.items():
            state[f"frozen/{name}"] = frozen
            state[f"score_moments/{name}"] = self._pre_stats[name]
            f = self.factor_of(name)
            if f is None:  # the disk cache was removed: the mask is saved, not the score
                continue
            state[f"psi/{name}"] = f.psi
            state[f"act/{name}"] = f.act
            state[f"weight/{name}"] = f.weight
        return state

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.analysis_state()

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        groups = ("frozen", "psi", "act", "weight", "score_moments")
        names = set()
        for key in tensors:
            group, _, name = key.partition("/")
            if group not in groups or name not in self.params:
                raise ValueError(f"unknown tensor '{key}' in the state of method 'dowser'")
            names.add(name)
        for name in names:
            missing = [g for g in ("frozen", "score_moments") if f"{g}/{name}" not in tensors]
            present = [g for g in ("psi", "act", "weight") if f"{g}/{name}" in tensors]
            if present and len(present) < 3:
                missing = [g for g in ("psi", "act", "weight") if g not in present]
            if missing:
                raise ValueError(f"dowser state tensor '{missing[0]}/{name}' is missing")
            frozen = tensors[f"frozen/{name}"]
            if tuple(frozen.shape) != tuple(self.params[name].shape):
                raise ValueError(f"dowser state tensor 'frozen/{name}' has shape "
                                 f"{tuple(frozen.shape)}, expected "
                                 f"{tuple(self.params[name].shape)}")
        self._unwatch()
        self.frozen, self.factors, self._pre_stats = {}, {}, {}
        self._factor_file = None  # the state's factors are the ones that count
        for name in sorted(names):
            if f"psi/{name}" in tensors:
                self.factors[name] = _factors_from({f"{g}/{name}": tensors[f"{g}/{name}"]
                                                    for g in ("psi", "act", "weight")})[name]
            self.frozen[name] = tensors[f"frozen/{name}"].to(self.params[name].device,
                                                             torch.bool)
            self._pre_stats[name] = tensors[f"score_moments/{name}"].double().cpu()
            self._watch(name)
