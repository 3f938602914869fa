"""The results folder: one owner of its format, its writing and its reading.

* `schema`: the format's version, the record and classifier-entry types, the table columns, and the
  rules readers apply (an entry's label, the dominant class, a prompt's majority class).
* `store`: writing a folder (images, appended record shards, merge, resume and repair, tables, run.json)
  and who may write where.
* `reader`: `open_run(path) -> RunView`, the one way to read a folder (run.json, battery, streamed
  records, typed tables).

The layout and every field are documented for people in docs/results-format.md.
"""

from evalsuite.results.reader import RunView, open_run
from evalsuite.results.schema import (
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    STATUSES,
    Entry,
    OnPrompt,
    Record,
    classifier_entry,
    dominant_class,
    entry,
    label,
    label_index,
    majority_classes,
    make_record,
    refused_record,
)

__all__ = [
    "READABLE_VERSIONS", "SCHEMA_VERSION", "STATUSES", "Entry", "OnPrompt", "Record", "RunView", "classifier_entry",
    "dominant_class", "entry", "label", "label_index", "majority_classes", "make_record", "open_run",
    "refused_record",
]
