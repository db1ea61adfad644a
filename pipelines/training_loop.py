"""The step loop every Ray Train program here runs on its workers: when to log, evaluate and checkpoint.

Training, pre-training and the proposal model differ in what one step does, what they score and what a
checkpoint holds; they agree on the cadence around it, and this module owns that cadence, so that resume,
logging and the non-finite guard behave the same in all three. It imports no Ray: each program passes Ray
Train's report and checkpoint calls in as hooks (``pipelines.ray_training``), and a test passes plain functions.

The non-finite guard stops the run: a step whose loss (mean over ranks) is nan or infinite raises
:class:`FloatingPointError` on every rank before anything of that step is logged or saved, so the latest
checkpoint is still the last good one to resume from.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import numpy as np

log = logging.getLogger("dynrefer.training_loop")

Metrics = dict[str, Any]


class Counters(Protocol):
    """What the loop advances: a :class:`pipelines.ray_training.TrainState` or anything with these two."""

    step: int
    samples: int


@dataclass(frozen=True)
class MicroStep:
    """One micro-batch done: its losses (floats or 0-d tensors), whether the optimizer stepped after it, and how
    many samples it trained on over all ranks."""

    losses: Mapping[str, Any]
    stepped: bool = True
    samples: int = 0


@dataclass(frozen=True)
class Cadence:
    """When the loop stops, logs, evaluates and checkpoints, in optimizer steps."""

    max_steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int = 0  # steps between evaluations (0: only at the end; -1: never)
    throughput: str | None = None  # the report key of samples/s over this attempt after two warm-up steps


def _losses_only(mean: dict[str, float], samples: int, seconds: float) -> dict[str, float]:
    return dict(mean)


def _nothing(*_: Any) -> None:
    return None


@dataclass
class LoopHooks:
    """What a program does at each point of the loop; only ``micro_step``, ``report`` and ``checkpoint`` are
    required.

    ``micro_step(batch, step, micro)`` trains on one batch (``step``: optimizer steps done, ``micro``: its index
    within the step). ``reduce`` averages a step's losses over ranks. ``step_metrics(mean, samples, seconds)``
    gives the per-step metrics (logged, and averaged into each report). ``evaluate(step, final)`` scores the model
    and returns the report's keys. ``report_extras()`` is merged into every report that goes out. ``report``
    sends a report; ``checkpoint`` saves one with its report (every rank calls both, as Ray Train wants).
    ``on_step(step, metrics)`` sees every step's metrics (TensorBoard, a loss history).
    """

    micro_step: Callable[[Any, int, int], MicroStep]
    report: Callable[[Metrics], None]
    checkpoint: Callable[[Metrics], None]
    reduce: Callable[[dict[str, float]], dict[str, float]] = dict
    step_metrics: Callable[[dict[str, float], int, float], dict[str, float]] = _losses_only
    evaluate: Callable[[int, bool], Metrics] | None = None
    report_extras: Callable[[], Metrics] = dict
    on_step: Callable[[int, dict[str, float]], None] = _nothing
    clock: Callable[[], float] = time.perf_counter


def mean_over(rows: list[Mapping[str, float]]) -> dict[str, float]:
    """The mean of each key of the first row over all rows."""
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def run_loop(batches: Iterable[Any], state: Counters, cadence: Cadence, hooks: LoopHooks, rank: int = 0,
             evaluate_first: bool = False) -> None:
    """Train from ``state.step`` to ``cadence.max_steps`` on ``batches``, advancing ``state`` in place.

    A checkpoint is saved every ``checkpoint_every`` steps since this attempt's start (a resumed run counts from
    its checkpoint) and at the end; evaluation runs every ``eval_every`` steps and at the end, and, with
    ``evaluate_first``, once before the first step, reported on its own. Every ``log_every`` steps, and with
    each checkpoint, the report carries the mean of the per-step metrics since the last such report.
    """
    if hooks.evaluate is not None and evaluate_first:
        first = hooks.evaluate(state.step, False)
        hooks.report({"step": state.step, **first, **hooks.report_extras()})
    if state.step >= cadence.max_steps:
        return
    window: list[dict[str, float]] = []  # per-step metrics since the last report with them
    micro: list[dict[str, float]] = []  # losses of the micro-batches of the current step
    micro_samples = 0
    first_step = last_eval = last_checkpoint = state.step
    timed_seconds, timed_samples = 0.0, 0
    step_start = hooks.clock()
    for batch in batches:
        done = hooks.micro_step(batch, state.step, len(micro))
        micro.append({k: float(v) for k, v in done.losses.items()})
        micro_samples += done.samples
        if not done.stepped:
            continue
        state.step += 1
        state.samples += micro_samples
        mean = hooks.reduce(mean_over(micro))
        samples, micro, micro_samples = micro_samples, [], 0
        if not all(math.isfinite(v) for v in mean.values()):
            raise FloatingPointError(f"step {state.step}: non-finite loss {mean}")
        now = hooks.clock()
        metrics = hooks.step_metrics(mean, samples, now - step_start)
        if state.step > first_step + 2:
            timed_seconds, timed_samples = timed_seconds + now - step_start, timed_samples + samples
        window.append(metrics)
        hooks.on_step(state.step, metrics)
        final = state.step >= cadence.max_steps
        report: Metrics = {}
        if hooks.evaluate is not None and (
                (cadence.eval_every > 0 and state.step - last_eval >= cadence.eval_every) or final):
            report.update(hooks.evaluate(state.step, final))
            last_eval = state.step
        save = state.step - last_checkpoint >= cadence.checkpoint_every or final
        logged = state.step % cadence.log_every == 0 or save
        if logged:
            report.update(mean_over(window))
            report.update(step=state.step, samples=state.samples)
            if cadence.throughput and timed_samples:
                report[cadence.throughput] = timed_samples / timed_seconds
            window = []
        if report:
            report.update(hooks.report_extras())
        if logged and rank == 0:
            log.info("step %d: %s", state.step,
                     {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()})
        if save:
            hooks.checkpoint(report)
            last_checkpoint = state.step
        elif report:
            hooks.report(report)
        if final:
            break
        step_start = hooks.clock()  # evaluation and checkpoints do not count as step time


def epochs(shard: Any, batch_size: int, shuffle_buffer: int, seed: int, rank: int, unit: str = "regions"
           ) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches without end from a Ray Data shard: one epoch after another, each locally shuffled with its
    own seed (when ``shuffle_buffer``), full batches only."""
    epoch = 0
    while True:
        empty = True
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=shuffle_buffer or None,
                                        local_shuffle_seed=seed * 1_000_003 + rank * 1_009 + epoch
                                        if shuffle_buffer else None):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"an epoch gave rank {rank} no full batch of {batch_size} {unit}: too few train {unit}")
        epoch += 1
