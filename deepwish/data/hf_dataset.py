"""Documents from Hugging Face `datasets` files on disk, read with pyarrow alone (no `datasets`
package, no hub access), one record batch at a time.

What PATH may be:
- a `save_to_disk` directory of one split: `state.json` lists its `data-*.arrow` files (Arrow IPC
  *stream* format, which is what `datasets` writes), `dataset_info.json` describes the features;
- a `save_to_disk` directory of a DatasetDict: `dataset_dict.json` lists the splits, each a
  directory as above; `--split` picks one (default `train`);
- any other directory: every `.arrow`, `.parquet` and `.jsonl` file below it, in sorted order
  (a hub snapshot's `data/train-00000-of-00002.parquet` layout, say); with `--split S` only the
  files whose path has a part named S or a file name starting with `S-`, `S_` or `S.`;
- one `.arrow` (IPC stream, or IPC file), `.parquet` or `.jsonl` file.

Which field: `text_field` (a string column) or `messages_field` (a list of {role, content}
structs, rendered with ChatML through chat.py), not both; with neither, `text` when the data has
it, else `messages`. A record whose field is null, or whose text is empty, is an error naming the
file and the row: silently dropping rows would change what the mix holds.

Memory: parquet and arrow are read in record batches (arrow files memory-mapped), jsonl line by
line; at most one batch of `batch_rows` rows is decoded at a time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .chat import render_chat, validate_messages

SUFFIXES = (".arrow", ".parquet", ".jsonl")


class DatasetInputError(ValueError):
    """A dataset path, split or field that cannot be read; the message names it."""


@dataclass(frozen=True)
class Field:
    """Which column holds a document: `name`, read as text or as a chat (`is_chat`)."""
    name: str
    is_chat: bool


def data_files(path: str | Path, split: str | None = None) -> list[Path]:
    """The files that hold `path`'s records (see the module doc), in reading order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DatasetInputError(f"{path}: unsupported dataset file type {path.suffix!r}; "
                                    f"expected one of {SUFFIXES}")
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        split = split or "train"
        if split not in splits:
            raise DatasetInputError(f"{path}: no split {split!r}; dataset_dict.json lists {splits}")
        return data_files(path / split)
    if (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text())
        files = [path / f["filename"] for f in state.get("_data_files", [])]
        if not files:
            raise DatasetInputError(f"{path}/state.json lists no _data_files")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DatasetInputError(f"{path}/state.json names missing file(s) {missing}")
        if split is not None and state.get("_split") not in (None, split):
            raise DatasetInputError(f"{path} holds split {state['_split']!r}, not the requested {split!r}")
        return files
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
    if split is not None:
        files = [f for f in files if split in f.relative_to(path).parts[:-1]
                 or any(f.name.startswith(split + sep) for sep in "-_.")]
    if not files:
        raise DatasetInputError(f"{path}: no {'/'.join(SUFFIXES)} files" + (f" of split {split!r}" if split else ""))
    return files


def record_batches(file: Path, columns: list[str] | None, batch_rows: int) -> Iterator[tuple[list[str], dict]]:
    """(column names, {column: python values}) per batch of at most `batch_rows` rows."""
    if file.suffix == ".jsonl":
        rows: list[dict] = []
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DatasetInputError(f"{file}:{line_no}: invalid JSON ({e.msg})") from None
                if len(rows) == batch_rows:
                    yield _columns_of(rows), _transpose(rows, columns)
                    rows = []
        if rows:
            yield _columns_of(rows), _transpose(rows, columns)
        return
    import pyarrow as pa
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(file)
        names = pf.schema_arrow.names
        use = [c for c in columns if c in names] if columns else None
        for batch in pf.iter_batches(batch_size=batch_rows, columns=use):
            yield names, batch.to_pydict()
        return
    source = pa.memory_map(str(file), "r")
    try:
        reader = pa.ipc.open_stream(source)  # what `datasets` writes
    except pa.ArrowInvalid:
        source.seek(0)
        try:
            reader = pa.ipc.open_file(source)  # also accept the random-access IPC file format
        except pa.ArrowInvalid as e:
            raise DatasetInputError(f"{file}: not an Arrow IPC stream or file ({e})") from None
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = iter(reader)
    names = reader.schema.names
    for batch in batches:
        if columns:
            batch = batch.select([c for c in columns if c in names])
        for start in range(0, batch.num_rows, batch_rows):  # datasets' batches can be large
            yield names, batch.slice(start, batch_rows).to_pydict()


def _columns_of(rows: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for r in rows:
        if isinstance(r, dict):
            names.update(dict.fromkeys(r))
    return list(names)


def _transpose(rows: list[dict], columns: list[str] | None) -> dict:
    keys = columns if columns else _columns_of(rows)
    return {k: [r.get(k) if isinstance(r, dict) else None for r in rows] for k in keys}


def choose_field(names: list[str], text_field: str | None, messages_field: str | None, where: str) -> Field:
    if text_field and messages_field:
        raise DatasetInputError("give --text-field or --messages-field, not both")
    if text_field or messages_field:
        name = text_field or messages_field
        if name not in names:
            raise DatasetInputError(f"{where}: no field {name!r}; fields are {names}")
        return Field(name, bool(messages_field))
    for name, is_chat in (("text", False), ("messages", True)):
        if name in names:
            return Field(name, is_chat)
    raise DatasetInputError(f"{where}: neither a 'text' nor a 'messages' field (fields are {names}); "
                            "name one with --text-field or --messages-field")


def iter_texts(path: str | Path, split: str | None = None, text_field: str | None = None,
               messages_field: str | None = None, batch_rows: int = 1024,
               render: bool = True) -> Iterator[tuple[list, bool]]:
    """Batches of document texts of the dataset at `path`: ([text, ...], is_chat). Chats come out
    rendered with ChatML (chat.render_chat), or, with render=False, as ([(messages, where), ...],
    True) for a template and loss mask of the caller's (mix.py)."""
    field = None
    for file in data_files(path, split):
        row = 0
        for names, cols in record_batches(file, [text_field or messages_field] if (text_field or messages_field)
                                          else None, batch_rows):
            if field is None:
                field = choose_field(names, text_field, messages_field, str(file))
            if field.name not in cols:
                raise DatasetInputError(f"{file}: no field {field.name!r} (fields are {names})")
            texts = []
            for value in cols[field.name]:
                where = f"{file} row {row}"
                row += 1
                if field.is_chat and not render:
                    texts.append((validate_messages(_plain_messages(value), where), where))
                elif field.is_chat:
                    texts.append(render_chat(validate_messages(_plain_messages(value), where)))
                elif not isinstance(value, str) or not value:
                    raise DatasetInputError(f"{where}: field {field.name!r} is "
                                            f"{'empty' if value == '' else type(value).__name__}, not text")
                else:
                    texts.append(value)
            yield texts, field.is_chat


def _plain_messages(value):
    """Arrow structs come back as dicts with every struct field (extra ones None): keep role and
    content, which is what the chat template reads."""
    if isinstance(value, list):
        return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in value]
    return value
