"""A tiny model, a fixed batch and the training loop of the method
contract (ARCHITECTURE.md, "Methods"), shared by the method tests.

Exposed through the ``harness`` fixture (conftest modules are not meant to be imported).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import safetensors.torch
import torch
from torch import nn

from spider.methods import MethodBase


class TinyNet(nn.Module):
    """Two trainable Linear layers around a LayerNorm, one frozen Linear, and an ``lm_head``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.frozen = nn.Linear(16, 16)
        self.hidden = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.embed(x)))
        h = h + torch.tanh(self.frozen(h))
        return self.lm_head(torch.tanh(self.hidden(h)))


class Harness:
    """Helpers for driving any registered method the way ``spider.train`` does."""

    @staticmethod
    def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyNet:
        torch.manual_seed(seed)
        model = TinyNet()
        with torch.no_grad():  # a non-degenerate norm weight (all ones would tie every rank)
            model.norm.weight.add_(0.1 * torch.randn(16))
            model.norm.bias.add_(0.1 * torch.randn(16))
        return model.to(dtype)

    @staticmethod
    def make_batch(seed: int = 1, dtype: torch.dtype = torch.float32):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(32, 6, generator=generator)
        y = torch.randn(32, 3, generator=generator)
        return x.to(dtype), y.to(dtype)

    @staticmethod
    def make_optimizer(method: MethodBase, kind: str = "adamw") -> torch.optim.Optimizer:
        params = list(method.trainable_parameters())
        if kind == "adamw":
            return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        raise ValueError(kind)

    @staticmethod
    def train(
        method: MethodBase,
        optimizer: torch.optim.Optimizer,
        batch,
        steps: int,
        after_step: Callable[[MethodBase], None] | None = None,
    ) -> list[float]:
        """The method contract's loop (ARCHITECTURE.md, "Methods"); returns the data loss (without the penalty) of each step."""
        x, y = batch
        losses = []
        for _ in range(steps):
            outputs = method.model(x)
            loss = nn.functional.mse_loss(outputs.float(), y.float())
            losses.append(loss.item())
            extra = method.output_penalty({"x": x}, outputs)  # LwF: needs batch and outputs
            if extra is not None:
                loss = loss + extra
            penalty = method.loss_penalty()
            if penalty is not None:
                loss = loss + penalty
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(method.trainable_parameters()), 1.0)
            method.before_optimizer_step()
            optimizer.step()
            method.after_optimizer_step()
            if after_step is not None:
                after_step(method)
            optimizer.zero_grad()
        return losses

    @staticmethod
    def through_disk(state: dict) -> dict:
        """What a checkpoint keeps of a method state: JSON meta + safetensors tensors."""
        tensors = {k: t.detach().contiguous() for k, t in state["tensors"].items()}
        return {
            "meta": json.loads(json.dumps(state["meta"])),
            "tensors": safetensors.torch.load(safetensors.torch.save(tensors)),
        }

    @staticmethod
    def weights(module: nn.Module) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.fixture
def harness() -> type[Harness]:
    return Harness


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is ~30x faster than several fighting over them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
