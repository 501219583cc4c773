"""Demo task for the default config: a loop that reports and stops cleanly.

Plain Python: it runs without pyipcd too. When hosted by pyipcd, print()
and logging output land in the daemon's log tagged with the task's name.
"""

import logging
import time

log = logging.getLogger("demo")


def heartbeat(interval: float = 5.0) -> None:
    """Prints a heartbeat until the host stops (pyipcd.stopping()) or forever."""
    try:
        from pyipcd import stopping
    except ImportError:  # outside pyipcd, without its Python package installed

        def stopping() -> bool:
            return False

    beats = 0
    print("demo task started")
    while not stopping():
        beats += 1
        log.info("heartbeat %d", beats)
        # Short sleeps so a stop request is noticed quickly.
        for _ in range(int(interval * 10)):
            if stopping():
                break
            time.sleep(0.1)
    print(f"demo task stopping after {beats} heartbeats")
