"""The logged tokens/s: training time only, evaluation and checkpoint saves left out (fake clock)."""

from retnet_train.components.metrics import Throughput


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_paused_time_is_not_training_time():
    clock = FakeClock()
    meter = Throughput(tokens_seen=1000, clock=clock)
    clock.now += 2.0  # 2 s of training: 4,000 tokens
    with meter.paused():  # a 30 s checkpoint save
        clock.now += 30.0
    clock.now += 2.0  # 2 more s of training: 4,000 tokens
    assert meter.rate(9000) == 2000.0
    # the next interval starts after the log and owes nothing to the earlier pause
    clock.now += 4.0
    assert meter.rate(17000) == 2000.0


def test_an_exception_inside_a_pause_still_ends_it():
    clock = FakeClock()
    meter = Throughput(tokens_seen=0, clock=clock)
    try:
        with meter.paused():
            clock.now += 5.0
            raise RuntimeError("save failed")
    except RuntimeError:
        pass
    clock.now += 1.0
    assert meter.rate(500) == 500.0
