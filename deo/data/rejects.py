"""The rejects table: every input that did not reach the store, with the stage and the reason.

Nothing is lost: each selected input ends up in the store or here. A stage fails only when
the share of rejects passes ``data.max_reject_fraction``.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from deo.errors import DataError

COLUMNS: tuple[str, ...] = ("path", "stage", "reason")


@dataclass(frozen=True)
class Reject:
    path: str
    stage: str
    reason: str


def write_rejects(rejects: Iterable[Reject], path: Path) -> None:
    """Write rejects as CSV (always with a header, so an empty table is still a valid file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(astuple(r) for r in rejects)


def read_rejects(path: Path) -> list[Reject]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise DataError(
                path, f"rejects table must have columns {COLUMNS}, got {reader.fieldnames}"
            )
        return [Reject(**{k.name: row[k.name] for k in fields(Reject)}) for row in reader]


def summarise(rejects: Sequence[Reject], worst: int = 5) -> str:
    """The most frequent reasons with an example path each, for error messages and logs."""
    by_reason = Counter(r.reason for r in rejects)
    example = {r.reason: r.path for r in reversed(rejects)}
    lines = [
        f"{n} × {reason} (e.g. {example[reason]})" for reason, n in by_reason.most_common(worst)
    ]
    return "; ".join(lines)


def check_reject_fraction(
    rejects: Sequence[Reject], n_total: int, bound: float, where: str | Path
) -> None:
    """Fail when more than ``bound`` of ``n_total`` inputs were rejected, naming the worst."""
    if n_total == 0:
        raise DataError(where, "no inputs selected; check data.max_samples and the source CSVs")
    fraction = len(rejects) / n_total
    if fraction > bound:
        raise DataError(
            where,
            f"{len(rejects)} of {n_total} inputs rejected ({fraction:.1%} > "
            f"data.max_reject_fraction={bound:.1%}): {summarise(rejects)}",
        )
