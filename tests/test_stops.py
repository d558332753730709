"""stops.py: a stop signal is recorded, not acted on, while a run holds the handlers; the line it
ends with names the signal and the exit status. The loop's use of it (last.pt written, exit 75):
tests/test_train.py.

    .venv/bin/python -m pytest -q tests/test_stops.py
"""
import os
import signal

import stops


def test_a_stop_signal_is_recorded_then_the_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in stops.STOP_SIGNALS}
    previous = stops.catch_stop_signals()
    try:
        assert not stops.any_rank_received(1, "cpu")
        os.kill(os.getpid(), signal.SIGUSR1)  # the default action would end this process
        assert stops.any_rank_received(1, "cpu")
        err = stops.stopped("at step 7: rerun")
        assert isinstance(err, stops.Stopped) and isinstance(err, KeyboardInterrupt)
        assert str(err) == f"stopped by SIGUSR1 at step 7: rerun (exit {stops.EXIT_STOPPED})"
    finally:
        stops.restore_signals(previous)
    assert {s: signal.getsignal(s) for s in stops.STOP_SIGNALS} == before
    again = stops.catch_stop_signals()  # the next run starts with nothing received
    assert not stops.any_rank_received(1, "cpu")
    stops.restore_signals(again)


def test_a_data_loader_worker_ignores_the_stop_signals():
    previous = {s: signal.getsignal(s) for s in stops.STOP_SIGNALS}
    try:
        stops.ignore_stop_signals(worker_id=0)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in stops.STOP_SIGNALS)
    finally:
        stops.restore_signals(previous)
