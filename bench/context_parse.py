"""Dataverse webhook context parser: CPU per ``parse_context`` beside ``json.loads`` of the same body.

Every ``POST /api/dataverse/webhook`` decodes the body (``json.loads``) and then reduces the decoded
``RemoteExecutionContext`` to an ``AgentStatusChange`` (``dataverse.context.parse_context``). Both are
pure CPU in the request's path, so the parser is measured against the one cost no route can avoid:
``json.loads`` of the very body it parses, in the same run.

Bodies, each parsed successfully before it is timed:

- ``update``: a seed-shaped Update, exactly as ``bench/webhook_bench.py`` posts it (its ``Bodies``: the
  seed ``tests/dataverse/data/update-presence.json`` with its agent, presence and RowVersion replaced);
- ``create``: the seed Create ``tests/dataverse/data/create-agent.json`` as recorded;
- ``partial+image``: a Target with only the columns the writer sent and the post-image that
  ``register-webhook`` registers (``tests.dataverse.conftest.partial_update``);
- ``deep parents``: the Update with a ``ParentContext`` chain as deep as the parser accepts
  (``MAX_NESTING`` parents), the agent only in the deepest.

Each figure is the CPU time (``time.process_time``) per call, the median of ``--repeat`` timeit repeats;
``x json`` is the parser's time over ``json.loads``'s on the same body. ``parse`` parses the same body
again and again, as for an agent seen a moment ago; ``new ids`` empties the parser's memo of GUIDs
(``dataverse.context._GUIDS``) before each parse, as for an agent not seen in the last few thousand
GUIDs (the memo's limit), every id read afresh.

    python bench/context_parse.py [--repeat 7] [--target-seconds 0.2]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the repository root on the path (and this directory, for webhook_bench).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from webhook_bench import Bodies, make_agents  # noqa: E402

from dataverse import context  # noqa: E402
from dataverse.context import MAX_NESTING, parse_context  # noqa: E402
from tests.dataverse.conftest import DATA, partial_update  # noqa: E402

PRESENCE = "efdeb843-c07a-e811-8162-000d3aa11f50"


def say(text: str) -> None:
    print(text, flush=True)


def encode(ctx: dict[str, Any]) -> bytes:
    """As Dataverse sends it: compact, ``/`` escaped as ``\\/`` (DataContractJsonSerializer)."""
    return json.dumps(ctx, separators=(",", ":")).replace("/", "\\/").encode()


def deep_parents() -> bytes:
    """The Update seed with ``MAX_NESTING`` parents (the deepest chain accepted), the agent only in the
    deepest one, so that every level is read."""
    top: dict[str, Any] = json.loads((DATA / "update-presence.json").read_bytes())
    parent = top["ParentContext"]
    levels = [top] + [copy.deepcopy(parent) for _ in range(MAX_NESTING)]
    for upper, lower in itertools.pairwise(levels):
        upper["ParentContext"] = lower
    for level in levels[:-1]:
        entity = level["InputParameters"][0]["value"]
        entity["Attributes"] = [p for p in entity["Attributes"] if p["key"] != "msdyn_agentid"]
    return encode(top)


def bodies() -> list[tuple[str, bytes]]:
    agents = make_agents(300)
    return [
        ("update", Bodies(agents).next(1)[0]),
        ("create", (DATA / "create-agent.json").read_bytes()),
        ("partial+image", encode(partial_update(PRESENCE, image_agent=agents[0].dynamics_user_id))),
        ("deep parents", deep_parents()),
    ]


def cpu_us(fn: Callable[[], object], repeat: int, target_seconds: float) -> float:
    """Median CPU microseconds per call over ``repeat`` repeats of about ``target_seconds`` each."""
    timer = timeit.Timer(fn, timer=time.process_time)
    number = 1
    while timer.timeit(number) < target_seconds / 4:
        number *= 2
    number *= 4
    return statistics.median(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timeit repeats per figure; the median is shown")
    parser.add_argument("--target-seconds", type=float, default=0.2, help="CPU seconds per repeat (about)")
    args = parser.parse_args(argv)

    header = (
        f"{'body':<14} {'bytes':>6} {'levels':>6} {'json.loads us':>13} {'parse us':>9} {'x json':>7}"
        f" {'new ids us':>10} {'x json':>7}"
    )
    memo: dict[str, str] = getattr(context, "_GUIDS", {})
    rows = []
    for name, raw in bodies():
        decoded = json.loads(raw)
        change = parse_context(decoded)  # a ContextError here is a broken bench body: let it raise
        assert change.agent_id is not None and change.presence_id is not None, (name, change)
        levels, ctx = 0, decoded
        while ctx is not None:
            levels, ctx = levels + 1, ctx.get("ParentContext")
        base = cpu_us(lambda raw=raw: json.loads(raw), args.repeat, args.target_seconds)
        parse = cpu_us(lambda decoded=decoded: parse_context(decoded), args.repeat, args.target_seconds)
        cold = cpu_us(lambda decoded=decoded: (memo.clear(), parse_context(decoded)), args.repeat, args.target_seconds)
        rows.append(
            f"{name:<14} {len(raw):>6} {levels:>6} {base:>13.1f} {parse:>9.1f} {parse / base:>7.2f}"
            f" {cold:>10.1f} {cold / base:>7.2f}"
        )
    say(f"python {sys.version.split()[0]}; CPU us per call (time.process_time), median of {args.repeat} repeats")
    say(header)
    for row in rows:
        say(row)
    say("")
    say("json.loads: decoding the body, the baseline every route pays; parse: parse_context on the decoded body;")
    say("new ids: the same with the parser's GUID memo emptied before each call (an agent not seen lately).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
