"""``presence-sync demo`` beyond a handful of agents: more agents than one subscription covers (the
rest polled), a rush hour of 1,000 random agents at most, every expectation held; and a failure of
the set-up is one line, not a traceback. (The 50,000-agent run is ``bench/scale.py``'s and the
demo's own, not a test's: it takes minutes.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service import demo
from service.stack import LocalStack


@pytest.mark.slow
def test_demo_with_1200_agents_passes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_SYNC_")}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "demo", "--speed", "0", "--agents", "1200"],
        cwd=tmp_path,
        env=env | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    assert "Traceback" not in out + done.stderr
    assert "agents 1200, covered 650, polled 550" in out  # one subscriber account: 650 ids
    assert "rush hour: 1000 other agent(s)" in out  # 1,197 others, a sample of 1,000
    assert "Teams shows all 1000 Busy/InACall" in out
    assert "both systems agree for all 1200 agent(s)" in out
    assert "demo passed" in out


async def test_a_failing_set_up_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    async def start(self: LocalStack) -> None:
        raise TimeoutError("the store did not answer within 20 s")

    monkeypatch.setattr(LocalStack, "start", start)
    lines: list[str] = []
    assert await demo.run_demo(lines.append, agents=5, speed=0, workdir=tmp_path) == 1
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == 1 and "TimeoutError: the store did not answer within 20 s" in failed[0]
    assert not any("Traceback" in line for line in lines)


async def test_a_bare_timeout_says_what_did_not_end(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    async def start(self: LocalStack) -> None:
        raise TimeoutError

    monkeypatch.setattr(LocalStack, "start", start)
    lines: list[str] = []
    assert await demo.run_demo(lines.append, agents=5, speed=0, workdir=tmp_path) == 1
    (failed,) = [line for line in lines if "FAILED" in line]
    assert "TimeoutError: the service did not settle in time" in failed
