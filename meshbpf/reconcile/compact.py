"""Keeping churned dicts at the size their live entries need.

Under endpoint churn the dicts keyed by backend (by ID: IDs are handed out
above the highest in use; by address: a moved endpoint's is new) lose one
key and gain another for ever. A CPython dict does not reuse a deleted
key's slot: it fills its table and then resizes to fit its live entries
three times over, which for 400 000 backends (100 000 Services) is twice
the table it was built with, 20 MB more per dict (README, an hour of
churn; `python3 bench/experiments/dict_churn.py`). A rebuilt dict holds its
live entries in a table 1.5 to 3 times their number, so how soon it fills
depends on where that number falls. Such a dict is rebuilt once as many
keys were deleted as half its live entries (a roomy table never fills
before), or once it resized after a sixteenth (a tight one fills early: 40
000 backends, 10 000 Services, after ~3 700 events), at the cost of one
copy per so many deletions. The copy's transient table is handed back to
the system after (glibc keeps a freed 20 MB table as RSS otherwise).
"""

from __future__ import annotations

import sys

from ..gcpause import trim_malloc

# Below this a dict's churn costs less than counting it.
MIN_DELETED = 4096


def compact(table: dict) -> None:
    """Rebuilds `table` in place (its identity and order kept): a copy
    holds the live entries only, and update() into the emptied dict takes
    the copy's table whole."""
    live = dict(table)
    table.clear()
    table.update(live)


class DeleteCount:
    """The keys deleted from a group of dicts that churn together (the
    first one stands for the group), compacting them all once enough went."""

    def __init__(self) -> None:
        self.deleted = 0
        self.compactions = 0
        self.size: int | None = None  # the first dict's bytes after the last compaction

    def add(self, deleted: int, *tables: dict) -> None:
        if self.size is None:
            self.size = sys.getsizeof(tables[0])
        self.deleted += deleted
        if self.deleted < MIN_DELETED:
            return
        live = len(tables[0])
        if self.deleted >= live // 2 or (self.deleted >= live // 16 and sys.getsizeof(tables[0]) > self.size):
            for table in tables:
                compact(table)
            trim_malloc()
            self.deleted = 0
            self.compactions += 1
            self.size = sys.getsizeof(tables[0])
