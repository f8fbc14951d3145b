"""The bundled sample runs keep their statistics compacted (``layers.parquet``: a twentieth of
the log's size, for the repository's budget). Tests about the log itself — appending to it,
damaging it, cutting it short — need it as the runner writes it for a small run: one JSON
object per line. These give it back."""

from __future__ import annotations

import json
from pathlib import Path

from spider.rundir import RunDir


def layers_jsonl_lines(run_dir: Path) -> list[str]:
    """The run's statistics rows as ``layers.jsonl`` lines, NaN written as the writer
    writes it (``NaN``)."""
    return [json.dumps({k: v for k, v in row.items() if v is not None})
            for row in RunDir(run_dir).read_layers()]


def expand_to_jsonl(run_dir: Path) -> Path:
    """Turn a (copied) run's compacted statistics back into ``layers.jsonl``, as a small run
    that was never compacted keeps them; returns the log's path."""
    run = RunDir(run_dir)
    log = run.layers_file
    log.write_text("\n".join(layers_jsonl_lines(run_dir)) + "\n")
    run.layers_parquet_file.unlink(missing_ok=True)
    return log
