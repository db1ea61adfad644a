"""The engines that step DynRefer (and the pre-trainer) on a Ray Train worker: DeepSpeed, or plain torch DDP.

Both take one micro-batch at a time and say when the optimizer stepped, with the same optimizer, parameter
groups and learning-rate schedule, so that a run can switch engines (``ddp: true``) and compare like with like.
Each saves and loads its own part of a checkpoint directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

from dynrefer.batching import ModelInputs
from dynrefer.config import DynReferConfig
from pipelines.train_job import TrainJob

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops are cached, so that they are built once per machine, not per run."""
    cache = os.environ.get("DYNREFER_CACHE", os.path.expanduser("~/.cache/dynrefer"))
    return os.path.join(cache, "torch_extensions")


def epoch_cosine_factor(step: int, steps_per_epoch: int, epochs: int) -> float:
    """The lr multiplier of LAVIS's per-epoch cosine at optimizer step ``step``."""
    return 0.5 * (1.0 + math.cos(math.pi * (step // steps_per_epoch) / epochs))


def lr_scheduler(optimizer: Any, job: Any) -> Any:
    """The schedule of ``job.schedule`` on a torch optimizer (DDP), or DeepSpeed's (a client scheduler)."""
    s = job.schedule
    if getattr(s, "type", "warmup_cosine") == "epoch_cosine":
        import torch

        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: epoch_cosine_factor(step, s.steps_per_epoch, s.epochs))
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    return WarmupCosineLR(optimizer, **schedule_params(job))


def schedule_params(job: TrainJob) -> dict[str, Any]:
    """Arguments of DeepSpeed's WarmupCosineLR, which both engines use."""
    s = job.schedule
    return {"total_num_steps": job.max_steps, "warmup_num_steps": max(1, s.warmup_steps),
            "warmup_min_ratio": s.warmup_min_ratio, "cos_min_ratio": s.min_ratio, "warmup_type": s.warmup_type}


def deepspeed_config(job: TrainJob) -> dict[str, Any]:
    """The DeepSpeed JSON with every ``"auto"`` filled from the training config; any other ``"auto"`` is an error."""
    path = job.deepspeed if os.path.exists(job.deepspeed) else os.path.join(REPO, job.deepspeed)
    with open(path) as f:
        template = json.load(f)
    o = job.optimizer
    values = {
        "train_micro_batch_size_per_gpu": job.batch_size, "gradient_accumulation_steps": job.grad_accum,
        "gradient_clipping": o.grad_clip, "optimizer.params.lr": o.lr, "optimizer.params.betas": list(o.betas),
        "optimizer.params.eps": o.eps, "optimizer.params.weight_decay": o.weight_decay,
        "torch_autocast.enabled": job.precision == "bf16",
        **{f"scheduler.params.{k}": v for k, v in schedule_params(job).items()},
    }

    if job.schedule.type != "warmup_cosine":
        template.pop("scheduler", None)  # the stepper hands DeepSpeed the schedule as a client scheduler

    def fill(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, f"{prefix}{k}") if not isinstance(v, dict) else fill(v, f"{prefix}{k}.")
                    for k, v in node.items()}
        if node == "auto":
            if prefix not in values:
                raise ValueError(f"{path}: no value for {prefix!r} = \"auto\"")
            return values[prefix]
        return node

    return fill(template, "")


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only: weight decay on matrices (and query tokens), none on biases, norms, scalars."""
    decay, plain = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else plain).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def exclude_frozen(cfg: DynReferConfig) -> bool:
    """Whether every frozen weight can be reloaded from a weights path, so checkpoints may leave them out."""
    return bool(cfg.encoder.checkpoint) and (bool(cfg.language.path) or not cfg.language.freeze)


def tensors(inputs: ModelInputs, device: Any) -> tuple[Any, Any, Any]:
    """:meth:`ModelInputs.to_tensors`, as the steppers' argument builders call it."""
    return inputs.to_tensors(device)


class DeepSpeedStepper:
    """Forward, backward and optimizer step through a DeepSpeed engine (any ZeRO stage)."""

    def __init__(self, model: Any, ds_config: dict[str, Any], backend: str, weight_decay: float,
                 scheduler: Any = None):
        """``scheduler``: a callable that builds the schedule on DeepSpeed's optimizer, when ``ds_config`` has
        none."""
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, weight_decay), config=ds_config,
            lr_scheduler=None if "scheduler" in ds_config else scheduler)
        # DeepSpeed's scheduler starts at iteration -1 (lr 0): step it once so the first update uses warmup_min_ratio.
        self.scheduler.step()
        self.zero3 = self.engine.zero_optimization_stage() == 3
        self.exclude_frozen = exclude_frozen(model.cfg)

    @property
    def module(self) -> Any:
        return self.engine.module

    def train_step(self, inputs: ModelInputs, device: Any) -> tuple[dict[str, Any], bool]:
        """One micro-batch; returns the detached losses and whether the optimizer stepped."""
        losses = self.engine(*tensors(inputs, device), inputs.captions, inputs.tags)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(losses["loss"])
        self.engine.step()
        return {k: v.detach().float() for k, v in losses.items()}, boundary

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def gathered(self) -> Any:
        """Full parameters on every rank for the duration (ZeRO-3 partitions them), e.g. for generation."""
        import deepspeed

        if not self.zero3:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag="deepspeed", save_latest=False,
                                    exclude_frozen_parameters=self.exclude_frozen)

    def load(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag="deepspeed", load_module_strict=not self.exclude_frozen)
        if path is None:
            raise RuntimeError(f"{directory}: no DeepSpeed checkpoint to resume from")


def dynrefer_arguments(inputs: ModelInputs, device: Any) -> tuple[Any, ...]:
    """DynRefer's forward arguments for a batch: views, view index, RoIs, captions, tags."""
    return (*tensors(inputs, device), inputs.captions, inputs.tags)


def dynrefer_state(model: Any) -> dict[str, Any]:
    """The tensors a DynRefer checkpoint holds (those of its export)."""
    from dynrefer.checkpoint import saved_state

    return saved_state(model)


class DDPStepper:
    """The same steps with torch DDP, torch AdamW and DeepSpeed's WarmupCosineLR (so only the engine differs).

    ``arguments`` turns a batch into the model's forward arguments and ``state`` gives the tensors a checkpoint
    keeps: DynRefer's by default; pre-training passes its own for the CLIP it trains.
    """

    def __init__(self, model: Any, device: Any, job: Any, arguments: Any = dynrefer_arguments,
                 state: Any = dynrefer_state):
        import torch
        from torch.nn.parallel import DistributedDataParallel

        self.arguments, self.state = arguments, state
        self.model = model.to(device)
        self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        o = job.optimizer
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                           eps=o.eps)
        self.scheduler = lr_scheduler(self.optimizer, job)
        self.scheduler.step()  # as DeepSpeedStepper: the first update uses warmup_min_ratio
        self.grad_clip, self.accum, self.micro = o.grad_clip, job.grad_accum, 0
        self.autocast = job.precision == "bf16"
        self.device = device

    @property
    def module(self) -> Any:
        return self.model

    def train_step(self, inputs: Any, device: Any) -> tuple[dict[str, Any], bool]:
        import torch

        boundary = (self.micro + 1) % self.accum == 0
        sync = contextlib.nullcontext() if boundary else self.ddp.no_sync()
        with sync:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                losses = self.ddp(*self.arguments(inputs, device))
            (losses["loss"] / self.accum).backward()
        self.micro += 1
        if boundary:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        return {k: v.detach().float() for k, v in losses.items()}, boundary

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def gathered(self) -> Any:
        return contextlib.nullcontext()

    def save(self, directory: str) -> None:
        import torch
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:
            os.makedirs(os.path.join(directory, "ddp"), exist_ok=True)
            torch.save({"model": self.state(self.model), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, os.path.join(directory, "ddp", "state.pt"))

    def load(self, directory: str) -> None:
        import torch

        state = torch.load(os.path.join(directory, "ddp", "state.pt"), map_location=self.device, weights_only=True)
        _, unexpected = self.model.load_state_dict(state["model"], strict=False)  # frozen weights with a path: absent
        if unexpected:
            raise RuntimeError(f"{directory}: checkpoint does not fit the model (unexpected {unexpected[:5]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_stepper(job: TrainJob, model: Any, ds_config: dict[str, Any] | None, device: Any) -> Any:
    """DeepSpeed with ``ds_config``, or DDP (``job.ddp``) with the same optimizer and schedule numbers."""
    if job.ddp:
        return DDPStepper(model, device, job)
    return DeepSpeedStepper(model, ds_config, "nccl" if device.type == "cuda" else "gloo", job.optimizer.weight_decay,
                            scheduler=lambda optimizer: lr_scheduler(optimizer, job))
