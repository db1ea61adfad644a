"""The step loop the three Ray Train programs share, driven by plain functions (no Ray): when it evaluates,
logs and checkpoints, how micro-batches make a step, the non-finite guard, and resuming from a saved step."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from pipelines.training_loop import Cadence, LoopHooks, MicroStep, epochs, run_loop


@dataclass
class State:
    step: int = 0
    samples: int = 0


@dataclass
class Recorder:
    """The hooks' calls, in order; ``losses`` gives the loss of each micro-batch (by call)."""

    losses: list[float] = field(default_factory=lambda: [1.0] * 100)
    accumulate: int = 1
    calls: list[tuple] = field(default_factory=list)
    micro_calls: list[tuple[int, int]] = field(default_factory=list)
    ticks: itertools.count = field(default_factory=itertools.count)

    def hooks(self, with_eval: bool = True) -> LoopHooks:
        def micro_step(batch: int, step: int, micro: int) -> MicroStep:
            self.micro_calls.append((step, micro))
            return MicroStep({"loss": self.losses[len(self.micro_calls) - 1]},
                             stepped=micro + 1 == self.accumulate, samples=4)

        return LoopHooks(
            micro_step=micro_step,
            report=lambda r: self.calls.append(("report", dict(r))),
            checkpoint=lambda r: self.calls.append(("checkpoint", dict(r))),
            evaluate=(lambda step, final: {"score": float(step), "final": final}) if with_eval else None,
            step_metrics=lambda mean, samples, seconds: {**mean, "per_s": samples / seconds},
            report_extras=lambda: {"extra": 1},
            clock=lambda: float(next(self.ticks)))

    def steps(self, kind: str) -> list[int]:
        return [r["step"] for k, r in self.calls if k == kind and "step" in r]

    def evaluated(self) -> list[float]:
        return [r["score"] for _, r in self.calls if "score" in r]


def test_eval_checkpoint_and_log_happen_at_the_configured_steps():
    rec = Recorder()
    state = State()
    run_loop(itertools.count(), state, Cadence(max_steps=10, log_every=3, checkpoint_every=4, eval_every=5,
                                               throughput="throughput"), rec.hooks())
    assert state.step == 10 and state.samples == 40
    assert rec.steps("checkpoint") == [4, 8, 10]  # every 4 steps, and at the end
    assert rec.steps("report") == [3, 6, 9]  # logged steps without a checkpoint
    assert rec.evaluated() == [5.0, 10.0]  # every 5 steps, and at the end
    last = rec.calls[-1][1]
    assert last["final"] is True and last["extra"] == 1 and last["samples"] == 40
    assert last["per_s"] == pytest.approx(4.0) and last["throughput"] == pytest.approx(4.0)
    # An evaluation between logged steps is reported on its own, with the extras but no step metrics.
    assert ("report", {"score": 5.0, "final": False, "extra": 1}) in rec.calls


def test_a_step_averages_its_micro_batches_and_the_window_averages_its_steps():
    rec = Recorder(losses=[1.0, 3.0, 5.0, 7.0], accumulate=2)
    state = State()
    run_loop(itertools.count(), state, Cadence(max_steps=2, log_every=2, checkpoint_every=10, eval_every=-1),
             rec.hooks(with_eval=False))
    assert rec.micro_calls == [(0, 0), (0, 1), (1, 0), (1, 1)]  # steps done and micro index, as a step sees them
    assert state.samples == 16
    (kind, report), = rec.calls
    assert kind == "checkpoint" and report["loss"] == pytest.approx(4.0)  # steps of 2.0 and 6.0


def test_evaluate_first_reports_before_any_step():
    rec = Recorder()
    run_loop(itertools.count(), State(), Cadence(max_steps=1, log_every=1, checkpoint_every=1, eval_every=0),
             rec.hooks(), evaluate_first=True)
    assert rec.calls[0] == ("report", {"step": 0, "score": 0.0, "final": False, "extra": 1})
    assert rec.evaluated() == [0.0, 1.0]


def test_a_non_finite_loss_stops_the_run_before_that_step_is_reported_or_saved():
    rec = Recorder(losses=[1.0, 1.0, float("nan")] + [1.0] * 10)
    state = State()
    with pytest.raises(FloatingPointError, match="step 3: non-finite loss"):
        run_loop(itertools.count(), state, Cadence(max_steps=10, log_every=1, checkpoint_every=2), rec.hooks())
    assert rec.steps("checkpoint") == [2] and rec.steps("report") == [1]


def test_resume_continues_from_the_saved_step_and_counts_cadence_from_there():
    rec = Recorder()
    state = State(step=6, samples=24)
    run_loop(itertools.count(), state, Cadence(max_steps=12, log_every=100, checkpoint_every=4, eval_every=4),
             rec.hooks())
    assert rec.micro_calls[0] == (6, 0) and state.step == 12 and state.samples == 48
    assert rec.steps("checkpoint") == [10, 12]
    assert rec.evaluated() == [10.0, 12.0]
    done = Recorder()
    run_loop(iter(()), State(step=12), Cadence(max_steps=12, log_every=1, checkpoint_every=1), done.hooks())
    assert done.calls == [] and done.micro_calls == []  # nothing is left to do


class Shard:
    """A Ray Data shard's ``iter_batches``, over ``rows`` rows."""

    def __init__(self, rows: int):
        self.rows, self.seeds = rows, []

    def iter_batches(self, batch_size, batch_format, drop_last, local_shuffle_buffer_size, local_shuffle_seed):
        self.seeds.append(local_shuffle_seed)
        for start in range(0, self.rows - batch_size + 1, batch_size):
            yield {"id": list(range(start, start + batch_size))}


def test_epochs_go_on_with_a_new_seed_each_and_refuse_a_shard_without_a_full_batch():
    shard = Shard(5)
    batches = list(itertools.islice(epochs(shard, 2, shuffle_buffer=8, seed=1, rank=1), 5))
    assert [b["id"] for b in batches] == [[0, 1], [2, 3]] * 2 + [[0, 1]]
    assert len(set(shard.seeds)) == 3
    unshuffled = Shard(4)
    next(epochs(unshuffled, 2, shuffle_buffer=0, seed=1, rank=0))
    assert unshuffled.seeds == [None]
    with pytest.raises(ValueError, match="no full batch of 8 images"):
        next(epochs(Shard(5), 8, 0, 0, 0, unit="images"))
