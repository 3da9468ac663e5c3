"""Agent directory import (rule 1): a CSV an admin fills in, checked line by line before anything is
written, so a bad file changes nothing and the report says which line to fix."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from mapping.errors import ConfigError
from mapping.model import Agent

CSV_HEADER = ("dynamics_user_id", "entra_object_id", "display_name")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def is_guid(value: str) -> bool:
    return bool(_GUID.match(value.strip()))


@dataclass
class CsvReport:
    agents: list[Agent] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_agents_csv(text: str, source: str = "<csv>") -> CsvReport:
    """Every problem, each as ``FILE:LINE: what is wrong``; agents only when there are none."""
    report = CsvReport()
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    rows = list(reader)
    if not rows:
        report.errors.append(f"{source}:1: empty file; expected the header {','.join(CSV_HEADER)}")
        return report
    header = tuple(h.strip().lower() for h in rows[0])
    if header[:3] != CSV_HEADER:
        report.errors.append(f"{source}:1: header is {','.join(rows[0])!r}; expected {','.join(CSV_HEADER)}")
        return report
    seen_d: dict[str, int] = {}
    seen_e: dict[str, int] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) < 2 or len(row) > 3:
            report.errors.append(f"{source}:{n}: expected 3 columns ({','.join(CSV_HEADER)}), found {len(row)}")
            continue
        d, e = row[0].strip().lower(), row[1].strip().lower()
        name = row[2].strip() if len(row) > 2 else ""
        bad = [
            f"{col} {val!r} is not a GUID" for col, val in ((CSV_HEADER[0], d), (CSV_HEADER[1], e)) if not is_guid(val)
        ]
        if bad:
            report.errors.append(f"{source}:{n}: " + "; ".join(bad))
            continue
        if d in seen_d:
            report.errors.append(f"{source}:{n}: dynamics_user_id {d} already on line {seen_d[d]}")
            continue
        if e in seen_e:
            report.errors.append(f"{source}:{n}: entra_object_id {e} already on line {seen_e[e]}")
            continue
        seen_d[d], seen_e[e] = n, n
        report.agents.append(Agent(d, e, name))
    if report.errors:
        report.agents.clear()
    return report


def read_agents_csv(path: str | Path) -> CsvReport:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot be read as UTF-8 text: {e}") from None
    return parse_agents_csv(text, str(p))
