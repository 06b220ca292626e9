"""Per-rank append-only records, resume, and the strict merge.

Each rank appends one JSON line per evaluated sample to `records/rank<r>.jsonl` and flushes
it. A restarted evaluation (any number of ranks) skips every index found in any rank file;
a line cut by a kill is dropped when its file is reopened. The merge demands every expected
index exactly once and fails naming the gap or duplicate and the files involved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from robustmim.errors import UserError

RECORDS_DIR = "records"
MERGED = "records.jsonl"
# The layout of records and summaries. 2: attack results keyed by every setting of the attack,
# their settings stored as fields in the plan and summary (1 had keys without step size,
# restarts or EOT). Records of another format are refused by the merge, summaries by the report.
RECORDS_FORMAT = 2


def rank_file(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / RECORDS_DIR / f"rank{rank:05d}.jsonl"


def _complete_lines(path: Path) -> list[str]:
    """The lines of a rank file that end with a newline (a kill can cut the last one)."""
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines() if "\n" in text else []


def read_rank_records(out_dir: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted((Path(out_dir) / RECORDS_DIR).glob("rank*.jsonl")):
        for number, line in enumerate(_complete_lines(path), 1):
            try:
                found.append((path, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not a JSON record ({e})") from None
    return found


def recorded_indices(out_dir: Path) -> set[int]:
    return {record["idx"] for _, record in read_rank_records(out_dir)}


class RecordWriter:
    def __init__(self, out_dir: Path, rank: int):
        self.path = rank_file(out_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop a line cut by a kill before appending after it
            kept = _complete_lines(self.path)
            if self.path.stat().st_size != sum(len(line) + 1 for line in kept):
                self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def merge_records(out_dir: Path, expected: list[int], settings_digest: str | None = None) -> list[dict]:
    """Every expected index exactly once, sorted; an error names any gap or duplicate, and any
    record made under other settings than `settings_digest` (the plan's)."""
    by_index: dict[int, tuple[Path, dict]] = {}
    duplicates = []
    for path, record in read_rank_records(out_dir):
        if settings_digest is not None and record.get("settings") != settings_digest:
            raise UserError(f"{path}: the record of index {record['idx']} was made with other settings "
                            f"({record.get('settings') or 'unrecorded'}, the plan's are {settings_digest}); "
                            f"re-run with fresh=true to start over")
        idx = record["idx"]
        if idx in by_index:
            duplicates.append(f"index {idx} in {by_index[idx][0].name} and {path.name}")
        else:
            by_index[idx] = (path, record)
    if duplicates:
        raise UserError(f"{out_dir}: {len(duplicates)} duplicate record(s): {'; '.join(duplicates[:5])}")
    wanted = set(expected)
    missing = sorted(wanted - set(by_index))
    extra = sorted(set(by_index) - wanted)
    if missing:
        raise UserError(f"{out_dir}: {len(missing)} of {len(expected)} samples have no record "
                        f"(first: {missing[:10]}); re-run the evaluation to complete them")
    if extra:
        raise UserError(f"{out_dir}: records for {len(extra)} index(es) outside the evaluated list "
                        f"(first: {extra[:10]}): the records come from another evaluation")
    return [by_index[i][1] for i in sorted(wanted)]
