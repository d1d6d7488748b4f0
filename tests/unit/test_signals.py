"""The daemon's SIGTERM/SIGINT handler (kernel_driver.worker.stop_on_signals).

A Python signal handler runs in the main thread between two bytecodes, also while that thread
holds the lock of an Event it is clearing or waiting on, as the daemon's loop does all the time
(`_wake.clear()`, `_wake.wait()`). A handler that set that Event itself waited for a lock its own
thread held: the daemon hung on SIGTERM (seen once in `make bench-smoke`, kernel 1.5.0).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from kernel_driver.worker import stop_on_signals


@pytest.mark.timeout(20)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_loop_holds_its_wake_lock_still_stops_it(signum):
    wake = threading.Event()

    with stop_on_signals(wake.set):
        with wake._cond:  # as inside the loop's wake.clear() or wake.wait()
            os.kill(os.getpid(), signum)
            time.sleep(0.2)  # the handler runs here, in this thread, with the lock held
        assert wake.wait(5), "the stop never came"
