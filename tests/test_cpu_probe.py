"""cpu_probe: the rate it measures against a call of known length, and its table's shape."""
from __future__ import annotations

import re
import time

from hrnet_fast.bench import cpu_probe


def test_rate_of_a_call_of_known_length():
    """A call that sleeps 20 ms, 1 unit of work a call: about 50 units a second (sleep overshoots a
    little, never undershoots)."""
    r = cpu_probe.rate(lambda: time.sleep(0.02), 1.0, time.time(), 0.3)
    assert 35 < r <= 50.5


def test_table_has_a_row_per_process_count_with_positive_rates(capsys):
    assert cpu_probe.main(["--procs", "1", "2", "--seconds", "0.2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"^\| \d", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2"]
    for r in rows:
        gflops, per, gbps, per_b = (float(c) for c in r.split("|")[2:6])
        assert gflops > 0 and gbps > 0
        assert abs(per * int(r.split("|")[1]) - gflops) <= 0.01 * gflops + 1  # per process = sum / processes
