"""Writes the four contracts the prototype compares, from contract 0.1.0
(wit/v0.1.0/keepwarm.wit).

- wit-old/: today's contract (one string per text of each change), exports only.
- wit-packed/: each change's texts in one string, its parts as span records.
- wit-flat/: each change's texts in one string, every number of the batch in flat lists.
- wit-answers/: flat's batch, and the answers flat too: every operation's numbers in one list,
  its keys and values in one byte list (or, for a value, a span of the change's own texts).

Only the `transform` export differs. The operations a plugin returns are the same in all four;
`answers` returns them as the two lists that `ANSWERS` describes.
"""
import pathlib
import sys

here = pathlib.Path(__file__).parent
src = pathlib.Path(sys.argv[1]).read_text()
imports = src.index("/// Logging from inside a plugin")
export = src.index("/// What a plugin exports.")
world = src.index("/// A keepwarm plugin.")
change = src.index("    /// One change to one row, as Sequin delivered it.")
after_change = src.index("    /// A string field and its value, for hashes.")
WORLD = "world plugin {\n    export transform;\n}\n"

PACKED = """    /// A part of a change's `texts`: `len` bytes from `start`.
    record span {
        start: u32,
        len: u32,
    }

    /// One change; its texts are spans of its `texts`.
    record change {
        action: action,
        texts: string,
        schema: span,
        table: span,
        %record: span,
        /// `len` = u32::MAX when absent.
        changes: span,
        /// The change's primary keys: `pks-count` spans of the batch's `pks` from `pks-first`.
        pks-first: u32,
        pks-count: u32,
        commit-lsn: option<u64>,
        commit-idx: option<u64>,
        commit-timestamp: span,
        idempotency-key: span,
        metadata: span,
    }

    /// A batch of changes.
    record batch {
        pks: list<span>,
        changes: list<change>,
    }

"""

FLAT = """    /// A batch of changes, flat.
    record batch {
        /// Each change's texts.
        texts: list<string>,
        /// Per change 17 numbers: action, then start and length of schema, table, record,
        /// changes (length u32::MAX when absent), commit-timestamp, idempotency-key, metadata,
        /// then the first and count of its primary keys in `pks`.
        layout: list<u32>,
        /// Start and length of each primary key in its change's texts.
        pks: list<u32>,
        /// Per change: commit-lsn, commit-idx (u64::MAX when absent).
        versions: list<u64>,
    }

"""


# What `answers` returns, as a tuple of these two lists.
ANSWERS = """    /// The answers of a batch, flat.
    record answers {
        /// Per operation 6 numbers: the change it answers, its kind (0 set, 1 del; +256 when
        /// its value is a span of the change's texts rather than of `bytes`), then start and
        /// length of its key in `bytes`, then start and length of its value.
        ops: list<u32>,
        /// The keys and values, back to back.
        bytes: list<u8>,
    }

"""


def write(name, text):
    out = here / f"wit-{name}"
    out.mkdir(exist_ok=True)
    text = text.replace("package keepwarm:plugin@0.1.0;", f"package proto:{name}@0.1.0;")
    (out / f"{name}.wit").write_text(text)


old = src[:imports] + src[export:world] + WORLD
write("old", old)
for name, record in (("packed", PACKED), ("flat", FLAT)):
    text = src[:change] + record + src[after_change:imports] + src[export:world] + WORLD
    text = text.replace("use types.{change, change-result};", "use types.{batch, change-result};")
    text = text.replace(
        "handle-batch: func(changes: list<change>) -> list<change-result>;",
        "handle-batch: func(batch: batch) -> list<change-result>;",
    )
    write(name, text)
    if name == "flat":
        # Without the `op` types nothing uses (bindgen lends them a lifetime it never declares).
        text = text[: text.index("    /// A string field and its value")] + text[
            text.index("    /// Severity of a log line.") :
        ]
        # As a tuple (`ANSWERS` says what it holds).
        text = text.replace(
            "handle-batch: func(batch: batch) -> list<change-result>;",
            "handle-batch: func(batch: batch) -> tuple<list<u32>, list<u8>>;",
        )
        text = text.replace("use types.{batch, change-result};", "use types.{batch};")
        write("answers", text)
