"""The CPU benchmark scripts run to the end and report what they time."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_fused import _extension

pytestmark = pytest.mark.skipif(not _extension.available(), reason=str(_extension.load_error()))

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, *args):
    """benchmarks/<name>'s output (it must exit 0)."""
    # The package may be built in place rather than installed: import it from the root.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_op_times_lists_every_call_and_sums_them():
    out = run_script("cpu_op_times.py", "--arch", "resnet18", "--repeats", "2", "--min-ms", "0")
    calls = re.findall(r"^\s*\d+\s+([\d.]+)\s+(\S+)", out, re.MULTILINE)
    per_op = dict((name, (int(count), float(ms))) for name, count, ms in
                  re.findall(r"^  (\S+)\s+(\d+) calls\s+([\d.]+)$", out, re.MULTILINE))
    total = re.search(r"sum of the medians: ([\d.]+) ms over (\d+) calls", out)
    assert calls and per_op and total, out
    assert int(total.group(2)) == len(calls) == sum(count for count, _ in per_op.values())
    listed = sum(float(ms) for ms, _ in calls)
    assert float(total.group(1)) == pytest.approx(listed, abs=0.001 * len(calls))  # rounding
    # ResNet-18's 3x3 convs take the Winograd kernel wherever it runs.
    assert ("winograd_conv3x3" in per_op) == _extension.winograd_kernel_available(), out
