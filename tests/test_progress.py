"""Progress that tells the truth: estimates from measured rates (the warm-up batch left
out), recomputed as the work goes; the command line says each fine-tuning epoch once."""

from __future__ import annotations

import pytest

import probe
from probe import cli
from probe.finetune import TrainingPace
from probe.progress import Advanced, BatchDone, EpochDone, Estimate, Pace, Rate, Stage


class FakeClock:
    """A clock the test moves: `clock.tick(seconds)`."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def test_rate_leaves_out_the_warm_up_steps():
    rate = Rate(warm_up=1)
    rate.add(30.0, 4)  # builds the graph
    assert rate.per_unit is None
    rate.add(4.0, 4)
    rate.add(2.0, 2)
    assert rate.per_unit == pytest.approx(1.0)
    assert Rate(warm_up=0).per_unit is None


def test_the_estimate_follows_the_measured_rate():
    clock = FakeClock()
    pace = Pace(total=100, clock=clock)
    clock.tick(60)  # the first batch of 10 traces the model: 6 s per image, if it counted
    elapsed, remaining = pace.advance(10)
    assert elapsed == 60 and remaining is None
    clock.tick(10)  # then 1 s per image
    elapsed, remaining = pace.advance(20)
    assert elapsed == 70 and remaining == pytest.approx(80)  # not 70 / 20 * 80 = 280
    clock.tick(5)  # faster: the estimate drops with it
    _, faster = pace.advance(30)
    assert faster == pytest.approx(15 / 20 * 70) and faster < remaining
    clock.tick(50)  # the machine got busy: it rises
    _, slower = pace.advance(40)
    assert slower == pytest.approx(65 / 30 * 60) and slower > faster
    _, left = pace.advance(100)
    assert left == 0


def test_without_a_warm_up_a_slow_first_batch_weighs_until_fast_ones_outnumber_it():
    clock = FakeClock()
    pace = Pace(total=40, warm_up=0, clock=clock)
    clock.tick(30)
    estimates = [pace.advance(10)[1]]
    for done in (20, 30):
        clock.tick(2)
        estimates.append(pace.advance(done)[1])
    assert estimates[0] == pytest.approx(90) and estimates == sorted(estimates, reverse=True)


def run_epoch(pace: TrainingPace, clock: FakeClock, epoch: int, train: list[float],
              val: list[float]) -> list[float | None]:
    """Drive `pace` as the Keras callback does; the estimates after each batch."""
    estimates = []
    pace.epoch_begins(epoch)
    for batch, seconds in enumerate(train, 1):
        clock.tick(seconds)
        estimates.append(pace.train_batch_done(batch)[1])
    pace.validation_begins()
    for batch, seconds in enumerate(val, 1):
        clock.tick(seconds)
        estimates.append(pace.val_batch_done(batch)[1])
    return estimates


def test_fine_tuning_estimate_comes_from_measured_training_and_validation_batches():
    clock = FakeClock()
    pace = TrainingPace(epochs=3, steps=4, val_steps=2, clock=clock)
    first = run_epoch(pace, clock, 1, [40, 3, 3, 3], [12, 1])
    # nothing is known while the first (compiling) batch is the only one measured
    assert first[0] is None
    # after batch 2: 3 s a training batch (an epoch's first one too, until one is
    # measured), a validation batch guessed at a third of that: 1 s
    assert first[1] == pytest.approx(3 * (2 + 4 + 4) + 1 * (2 + 2 + 2))
    # the first validation batch compiles too; the second is measured: 1 s
    assert first[-1] == pytest.approx(2 * (3 * 4 + 1 * 2))
    assert pace.seconds_per_epoch() == pytest.approx(3 * 4 + 1 * 2)
    # epoch 2 pays 7 s to start (data pipeline, weights copied), then runs faster
    second = run_epoch(pace, clock, 2, [7, 1, 1, 1], [1, 1])
    assert second[0] == pytest.approx(3 * 3 + 1 * 2 + 7 + 3 * 3 + 1 * 2)
    assert pace.seconds_per_epoch() == pytest.approx(7 + (3 * 3 + 3) / 6 * 3 + 1 * 2)
    assert second[3] < second[1] < second[0]  # the fast batches bring the estimate down
    third = run_epoch(pace, clock, 3, [7, 1, 1, 1], [1, 1])
    assert third[-1] == 0
    assert pace.elapsed() == pytest.approx(40 + 9 + 13 + 2 * (7 + 3 + 2))


def test_a_two_epoch_fine_tuning_says_each_epoch_once(capsys, monkeypatch):
    """In a log file (stderr not a terminal): no batch lines, one line per epoch; on a
    terminal the batch status line is rewritten in place and cleared before the epoch's."""
    events = [BatchDone(done=1, total=2, epoch=1, epochs=2, elapsed=30.0),
              BatchDone(done=2, total=2, epoch=1, epochs=2, elapsed=33.0, remaining=70.0),
              Estimate(seconds_per_epoch=40.0, seconds_total=103.0, epochs=2, device="CPU"),
              EpochDone(done=1, total=2, logs={"loss": 0.5}, elapsed=35.0, remaining=68.0),
              BatchDone(done=1, total=2, epoch=2, epochs=2, elapsed=40.0, remaining=60.0),
              BatchDone(done=2, total=2, epoch=2, epochs=2, elapsed=45.0, remaining=2.0),
              EpochDone(done=2, total=2, logs={"loss": 0.25}, elapsed=47.0, remaining=0.0)]
    shown = cli._Events(quiet=False)
    for event in events:
        shown(event)
    shown.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["about 40 s per epoch on this machine (CPU): about 1 min 45 s for 2 epochs",
                     "epoch 1/2: loss 0.5000 (about 1 min 10 s left for 1 epoch)",
                     "epoch 2/2: loss 0.2500"]

    shown = cli._Events(quiet=False)
    shown.status.enabled = True  # as on a terminal
    for event in events:
        shown(event)
    shown.close()
    err = capsys.readouterr().err
    assert "\repoch 1/2, batch 1/2\repoch 1/2, batch 2/2, about 1 min 10 s left\r" in err
    said = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    assert said == lines + [""]  # the status line is cleared at the end too


@pytest.mark.parametrize("seconds, text", [(0.2, "1 s"), (42, "42 s"), (70, "1 min 10 s"),
                                           (68, "1 min 10 s"), (119, "2 min"),
                                           (754, "13 min"), (3600, "1 h"), (3900, "1 h 5 min")])
def test_format_left(seconds, text):
    assert cli.format_left(seconds) == text


def test_extraction_events_carry_the_measured_pace(image_tree):
    events = []
    probe.extract(image_tree, "vgg16", weights="none", image_size=32, batch_size=4,
                  progress=events.append)
    advanced = [e for e in events if type(e) is Advanced and e.stage is Stage.EXTRACT]
    assert [e.done for e in advanced] == [4, 8, 12, 16, 20]
    assert advanced[0].remaining is None  # the first batch traces the model
    assert all(e.remaining is not None and e.remaining >= 0 for e in advanced[1:])
    assert advanced[-1].remaining == 0
    assert [e.elapsed for e in advanced] == sorted(e.elapsed for e in advanced)
