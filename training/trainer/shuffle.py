"""Shuffled training batches streamed from Parquet files (or a table), memory bounded by a window.

Every pass (epoch) over the rows:

    blocks    the row groups of the files (a table: one block), in a shuffled order when the rows
              do not fit one window, else in file order
    windows   consecutive blocks of that order, each until it holds ≥ `window_rows` rows
    rows      each window's rows in a shuffled order, drawn when the window is loaded

and batches are the next `batch_size` rows of that sequence (a batch may span two windows); the
pass ends when fewer than `batch_size` rows are left, and the next pass shuffles anew. Only the
window in use is in memory, so a dataset of any size trains in the memory of `window_rows` rows;
when all rows fit one window, this is a plain shuffle of all of them.

Every process of a data-parallel training draws the same sequence (same seed) and trains on its
slice of each batch (`training/trainer/parallel.py`). The position (pass, window, row) and the generator's
state before the window's shuffle are the whole state: a resumed training reloads the window and
draws its shuffle again (`state` / `restore`, saved by `training/trainer/resume.py`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch


@dataclass(frozen=True)
class Block:
    """Rows read together: one row group of one Parquet file (`group` None: the whole `table`), the
    rows of `teachers` only when it names some (their `teacher_id`)."""

    rows: int
    path: Path | None = None
    group: int | None = None
    table: pa.Table | None = None
    teachers: tuple[str, ...] = ()

    def read(self, columns: list[str] | None = None) -> pa.Table:
        if self.table is not None:
            return self.table if columns is None else self.table.select(columns)
        needed = columns if columns is None or not self.teachers else list(dict.fromkeys([*columns, "teacher_id"]))
        rows = pq.ParquetFile(self.path).read_row_group(self.group, columns=needed)
        if self.teachers:
            rows = rows.filter(pc.is_in(rows["teacher_id"], pa.array(self.teachers)))
        return rows if columns is None else rows.select(columns)

    def column_names(self) -> list[str]:
        return self.table.column_names if self.table is not None else pq.ParquetFile(self.path).schema_arrow.names


def blocks_of(source: pa.Table | list, teachers: list[str] = ()) -> list[Block]:
    """A table as one block, or every row group of the Parquet files `source`, in order; with
    `teachers`, only their rows (counted from the `teacher_id` column alone)."""
    teachers = tuple(teachers)
    if isinstance(source, pa.Table):
        source = source.filter(pc.is_in(teacher_ids(source), pa.array(teachers))) if teachers else source
        blocks = [Block(source.num_rows, table=source)]
    else:
        blocks = []
        for path in source:
            file = pq.ParquetFile(path)
            for g in range(file.metadata.num_row_groups):
                rows = file.metadata.row_group(g).num_rows
                if rows and teachers:
                    rows = pc.sum(pc.is_in(teacher_ids(file.read_row_group(g, columns=["teacher_id"])), pa.array(teachers))).as_py() or 0
                if rows:
                    blocks.append(Block(rows, Path(path), g, teachers=teachers))
    if teachers and not blocks:
        raise ValueError(f"no rows were scored by teachers {list(teachers)}: name teacher ids the data has (its teacher_id "
                         "column; 'mixture' needs teacher_labeled's `mixture`)")
    return blocks


def teacher_ids(rows: pa.Table) -> pa.ChunkedArray:
    if "teacher_id" not in rows.column_names:
        raise ValueError("these rows have no teacher_id (labeled before several teachers could label): leave `teachers` empty")
    return rows["teacher_id"]


class ShuffledBatches:
    """Batches of `batch_size` rows of `blocks` (see the module docstring), forever; `prepare` is
    applied to each window as it is loaded (checks, re-rendering)."""

    def __init__(self, blocks: list[Block], batch_size: int, seed: int, window_rows: int,
                 prepare: Callable[[pa.Table], pa.Table] = lambda rows: rows):
        self.blocks, self.batch_size, self.window_rows, self.prepare = blocks, batch_size, window_rows, prepare
        self.total = sum(block.rows for block in blocks)
        if self.total < batch_size:
            raise ValueError(f"{self.total} rows are fewer than one batch of {batch_size}: lower batch_size or add data")
        self.generator = torch.Generator().manual_seed(seed)
        self.windows: list[list[int]] | None = None  # this pass's windows, as block indices
        self.window, self.used, self.offset = -1, 0, 0  # the loaded window; rows used this pass, and of the window
        self.window_state = None  # the generator before the loaded window's shuffle
        self.table, self.order = None, None  # the loaded window, prepared, and its shuffled row order

    def __call__(self, step: int) -> pa.Table:
        """The next batch (the position, not the step, says which: it is restored on resume)."""
        return next(self)

    def resumed_at(self, step: int) -> None:
        """Nothing to do: `restore` put the position back."""

    def __iter__(self):
        return self

    def __next__(self) -> pa.Table:
        if self.windows is None or self.used + self.batch_size > self.total:
            self._start_pass()
        parts, needed = [], self.batch_size
        while needed:
            if self.offset == len(self.order):
                self._load(self.window + 1)
            take = min(needed, len(self.order) - self.offset)
            parts.append(self.table.take(pa.array(self.order[self.offset : self.offset + take].numpy())))
            self.offset += take
            needed -= take
        self.used += self.batch_size
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def _start_pass(self) -> None:
        order = torch.randperm(len(self.blocks), generator=self.generator).tolist() if self.total > self.window_rows \
            else list(range(len(self.blocks)))
        self.windows, rows = [[]], 0
        for index in order:
            if rows >= self.window_rows:
                self.windows.append([])
                rows = 0
            self.windows[-1].append(index)
            rows += self.blocks[index].rows
        self.used = 0
        if len(self.windows) == 1 and self.table is not None:  # everything is loaded already: shuffle again
            self.window_state = self.generator.get_state()
            self.order, self.offset = torch.randperm(self.table.num_rows, generator=self.generator), 0
        else:
            self._load(0)

    def _load(self, window: int) -> None:
        self.table = None  # the previous window goes before the next is read
        rows = self.prepare(pa.concat_tables([self.blocks[i].read() for i in self.windows[window]], promote_options="default"))
        self.window, self.window_state = window, self.generator.get_state()
        self.table, self.order, self.offset = rows, torch.randperm(rows.num_rows, generator=self.generator), 0

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON, tensors): the position and the generator before the loaded window's shuffle."""
        position = {"windows": self.windows, "window": self.window, "used": self.used, "offset": self.offset}
        return position, {"generator": self.window_state}

    def restore(self, position: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Continues from `state()`: reloads that window and draws its shuffle again."""
        self.windows, self.used = position["windows"], position["used"]
        self.generator.set_state(tensors["generator"])
        self._load(position["window"])
        self.offset = position["offset"]
