"""The study's SQLite database (`battle.db` in the output directory, WAL mode).

Tables:
- `runs`: one row per run, keyed by the hash of its resolved configuration;
  status is queued -> running -> done | failed; metrics once done. A tuning trial stopped by its
  pruner is done, with `pruned_after` = the epochs it trained (NULL for every run trained in full).
- `epochs`: the per-epoch curves of every run.
- `skipped`: grid combinations that were not run, with the reason.
- `meta`: the study as last launched (its spec and the keys of its runs).
- `evidence`: per done run, its per-example outcome on the validation set (bit-packed correct/wrong
  and the predicted class of every image, in the dataset's order, with a hash of the targets so
  that only runs scored on the same images are paired); runs of older spach versions have none.
- `analysis`: measurements after training (`spach.analysis`): one row per subject (a run key, or
  "study" for cross-run ones) and measurement, with the settings it was computed with.

Every process opens its own connection; writes are short transactions, so a
parent and its worker subprocesses can share the file.

A running run is owned by the process that executes it, which holds an exclusive
`flock` on `RUN_DIR/run.lock` from `mark_running` until `mark_done`/`mark_failed` or
its death. Whether the owner of a 'running' run is alive is asked of that lock, not of
a PID: a PID can be reused (a container restart, a fresh PID namespace where every
battle is pid 1), a lock dies with its process.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from spach.errors import NoSpaceError, SpachError

DB_NAME = "battle.db"
BLANK_FILE_BYTES = 1 << 20  # a file of only NUL bytes up to this size is a creation cut short (holds_nothing)
SQLITE_FULL = getattr(sqlite3, "SQLITE_FULL", 13)  # "database or disk is full"
RUN_LOCK = "run.lock"
_held: dict[str, int] = {}   # key -> fd of the run lock this process holds

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key            TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    grp            TEXT NOT NULL,
    family         TEXT NOT NULL,
    layout         TEXT NOT NULL,
    size           TEXT NOT NULL,
    cpe            INTEGER NOT NULL,
    shared         INTEGER NOT NULL,
    seed           INTEGER NOT NULL,
    model          TEXT NOT NULL,
    config         TEXT NOT NULL,      -- the resolved configuration (stable JSON), basis of the key
    output_dir     TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    error          TEXT,
    attempts       INTEGER NOT NULL DEFAULT 0,
    owner_pid      INTEGER,
    created_at     REAL NOT NULL,
    started_at     REAL,
    finished_at    REAL,
    params         INTEGER,
    macs           INTEGER,
    images_per_s   REAL,
    best_top1      REAL,
    final_top1     REAL,
    final_top5     REAL,
    final_val_loss REAL,
    final_train_loss REAL,
    train_time_s   REAL,
    job_id         TEXT,               -- launcher slurm: the run's current (or last) Slurm job
    job_attempt    INTEGER,            -- attempts of that job (1 + its requeues) seen so far
    node           TEXT,               -- where the run's current/last attempt ran
    submitted_at   REAL
);
CREATE TABLE IF NOT EXISTS epochs (
    key          TEXT NOT NULL REFERENCES runs(key),
    epoch        INTEGER NOT NULL,
    train_loss   REAL,
    val_loss     REAL,
    val_top1     REAL,
    val_top5     REAL,
    lr           REAL,
    images_per_s REAL,
    epoch_time_s REAL,
    PRIMARY KEY (key, epoch)
);
CREATE TABLE IF NOT EXISTS skipped (
    name   TEXT PRIMARY KEY,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    k TEXT PRIMARY KEY,
    v TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS evidence (
    key         TEXT PRIMARY KEY REFERENCES runs(key),
    n           INTEGER NOT NULL,    -- validation images
    targets_sha TEXT NOT NULL,       -- sha256 of the int64 targets in order: runs pair only when equal
    correct     BLOB NOT NULL,       -- numpy.packbits(prediction == target), big-endian bit order
    predictions BLOB NOT NULL,       -- the predicted class of every image, as pred_dtype
    pred_dtype  TEXT NOT NULL        -- uint8 | uint16 | int32
);
CREATE TABLE IF NOT EXISTS trials (
    grp      TEXT NOT NULL,          -- the architecture tuned (the group of its final runs)
    number   INTEGER NOT NULL,       -- Optuna's trial number, from 0
    key      TEXT NOT NULL,          -- the trial's run (runs.key)
    params   TEXT NOT NULL,          -- JSON: the recipe keys the trial sets
    state    TEXT NOT NULL,          -- Optuna's state: running | complete | pruned | fail
    value    REAL,                   -- its final top-1 on the selection split (pruned: after its last epoch)
    budget   INTEGER NOT NULL,       -- trials per architecture
    epochs   INTEGER,                -- epochs its run trained (so far, while running)
    PRIMARY KEY (grp, number)
);
CREATE TABLE IF NOT EXISTS analysis (
    subject    TEXT NOT NULL,        -- a run key, or 'study'
    kind       TEXT NOT NULL,        -- erf | cka | corruption | fourier | attn-distance
    settings   TEXT NOT NULL,        -- stable JSON of what it was computed with
    result     TEXT NOT NULL,        -- JSON
    created_at REAL NOT NULL,
    PRIMARY KEY (subject, kind)
);
"""

METRICS = ("params", "macs", "images_per_s", "best_top1", "final_top1", "final_top5", "final_val_loss",
           "final_train_loss", "train_time_s", "pruned_after")  # what mark_done stores (pruned_after: see the doc)
# columns added after the first release: (name, SQL type), added to older databases by `migrate`
ADDED_COLUMNS = (("job_id", "TEXT"), ("job_attempt", "INTEGER"), ("node", "TEXT"), ("submitted_at", "REAL"),
                 ("cpu_time_s", "REAL"),  # CPU seconds of the run's finished epochs (all threads of its process)
                 ("data_fingerprint", "TEXT"),   # JSON {split: spach.data.fingerprint} of the data it trains on
                 ("pruned_after", "INTEGER"))    # a pruned tuning trial: the epochs it trained
ADDED_TRIAL_COLUMNS = (("epochs", "INTEGER"),)  # columns added to `trials` after its first release
EPOCH_FIELDS = ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s", "epoch_time_s")


def connect(out_dir: str | Path, create: bool = False) -> sqlite3.Connection:
    """Open OUT/battle.db; with `create`, make it (the coordinator, holding the study lock, is the only caller
    with `create`). A file that holds nothing (:func:`holds_nothing`: a creation cut short, e.g. by a full
    disk) is no study: made anew with `create`, FileNotFoundError without. A full disk is a NoSpaceError."""
    path = Path(out_dir) / DB_NAME
    if not create and not path.is_file():
        raise FileNotFoundError(f"no study database at {path} (run `spach battle --out {out_dir}` first)")
    for attempt in (1, 2):
        new = not path.exists()
        try:
            return _open(path, create)
        except sqlite3.DatabaseError as e:
            error = e
        if is_disk_full(error):
            if new:  # spach's own half-made file: gone, so the next run starts afresh
                remove_database(path)
            raise NoSpaceError(f"no space left on device at {path}{' (nothing was stored)' if new else ''}: "
                               "free some space and run again") from None
        # only now read the file itself: closing another descriptor of a database this process has open
        # would drop SQLite's locks on it
        if attempt == 1 and holds_nothing(path):
            if not create:
                raise FileNotFoundError(f"no study in {path} yet: the file holds nothing (its creation was cut "
                                        f"short, e.g. by a full disk); run `spach battle --out {out_dir}` again")
            remove_database(path)
            continue
        break
    raise SpachError(f"{path} is not a study database ({error}); it was left as it is: move it aside, or use "
                     "another --out")


def _open(path: Path, create: bool) -> sqlite3.Connection:
    """A connection to the study database at `path` (its schema made or completed with `create`), checked by
    reading its runs table; sqlite3.DatabaseError (the connection closed) if it cannot be."""
    conn = sqlite3.connect(path, timeout=60.0, isolation_level=None)  # autocommit; explicit BEGIN below
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=60000")
        if create:
            conn.executescript(SCHEMA)
            migrate(conn)
        conn.execute("SELECT key, status, config FROM runs LIMIT 1").fetchall()
    except sqlite3.DatabaseError:
        conn.close()
        raise
    return conn


def is_disk_full(error: sqlite3.DatabaseError) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full") or an ENOSPC underneath."""
    return getattr(error, "sqlite_errorcode", None) == SQLITE_FULL or "disk is full" in str(error)


def holds_nothing(path: Path) -> bool:
    """True for a database file with nothing in it, as a creation cut short leaves it (no study is lost by
    making it anew): empty or only NUL bytes (space allocated, never written) with no write-ahead log beside
    it, or a valid SQLite database without a single table. Reads only."""
    size = path.stat().st_size
    if size <= BLANK_FILE_BYTES and not path.read_bytes().strip(b"\0"):
        wal = path.with_name(path.name + "-wal")
        return not wal.exists() or wal.stat().st_size == 0
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\0":
            return False
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            return conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False


def remove_database(path: Path) -> None:
    """Remove a database file with its WAL and shared-memory files."""
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        p.unlink(missing_ok=True)


def connect_readonly(out_dir: str | Path) -> sqlite3.Connection:
    """Open OUT/battle.db only to read it: never changes the file, works in a read-only directory."""
    path = Path(out_dir) / DB_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no study database at {path} (run `spach battle --out {out_dir}` first)")
    error: Exception | None = None
    # WAL readers need the -shm file; where it cannot be created (read-only folder, nobody writing) read as immutable
    for mode in ("mode=ro", "immutable=1"):
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, timeout=60.0)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("SELECT key, status, config FROM runs LIMIT 1").fetchall()
            return conn
        except sqlite3.DatabaseError as e:
            conn.close()
            error = e
            if not isinstance(e, sqlite3.OperationalError):  # "file is not a database"
                break
    if holds_nothing(path):
        raise FileNotFoundError(f"no study in {path} yet: the file holds nothing (its creation was cut short, "
                                f"e.g. by a full disk); run `spach battle --out {out_dir}` again")
    raise SpachError(f"{path} cannot be read as a study database ({error})")


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Add the columns of ADDED_COLUMNS (runs) and ADDED_TRIAL_COLUMNS (trials) that a database written by an
    older spach lacks; returns their names."""
    added = []
    with _Tx(conn):
        for table, columns in (("runs", ADDED_COLUMNS), ("trials", ADDED_TRIAL_COLUMNS)):
            have = {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                    added.append(name)
    return added


class _Tx:
    """`with _Tx(conn):` — one IMMEDIATE transaction (takes the write lock up front)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *_):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def register_study(conn: sqlite3.Connection, study, run_dir: Any) -> None:
    """Record the study and insert its runs that the database does not have yet (as queued)."""
    from spach.battle.findings import mixer_facts

    with _Tx(conn):
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('study', ?)", (json.dumps(study.source),))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('name', ?)", (study.name,))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('keys', ?)", (json.dumps([r.key for r in study.runs]),))
        # what the report needs to know of each mixer, recorded while its plugin is imported: a report is
        # computed from the database alone, in any process
        facts = json.loads((conn.execute("SELECT v FROM meta WHERE k = 'mixer_facts'").fetchone() or ["{}"])[0])
        facts.update(mixer_facts(sorted({r.family for r in study.runs} - set(facts))))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('mixer_facts', ?)", (json.dumps(facts, sort_keys=True),))
        conn.execute("DELETE FROM skipped")
        conn.executemany("INSERT INTO skipped VALUES (?, ?)", study.skipped)
        insert_runs(conn, study.runs, run_dir)


def insert_runs(conn: sqlite3.Connection, runs: Iterable, run_dir: Any) -> None:
    """Insert the runs (spec.Run) the database does not have yet, as queued (inside the caller's transaction,
    or one of its own); their names are kept current."""
    from spach.battle.spec import stable_json

    now = time.time()
    with contextlib.ExitStack() as stack:
        if not conn.in_transaction:
            stack.enter_context(_Tx(conn))
        for r in runs:
            conn.execute(
                "INSERT OR IGNORE INTO runs (key, name, grp, family, layout, size, cpe, shared, seed, model, config,"
                " output_dir, status, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?, 'queued', ?)",
                (r.key, r.name, r.group, r.family, r.layout, r.size, int(r.cpe), int(r.shared), r.seed, r.model,
                 stable_json(r.resolved()), str(run_dir(r)), now))
            # names are presentation: keep them current if the study file renamed a run
            conn.execute("UPDATE runs SET name = ?, grp = ? WHERE key = ?", (r.name, r.group, r.key))


def runs_on_other_data(conn: sqlite3.Connection, keys: Iterable[str], fingerprint: str) -> list[dict[str, Any]]:
    """The done runs among `keys` that were trained on data with another fingerprint (unknown ones excepted)."""
    wanted = set(keys)
    rows = conn.execute("SELECT key, name, data_fingerprint FROM runs WHERE status = 'done'"
                        " AND data_fingerprint IS NOT NULL AND data_fingerprint != ?", (fingerprint,))
    return [dict(r) for r in rows if r["key"] in wanted]


def record_data_fingerprint(conn: sqlite3.Connection, keys: Iterable[str], fingerprint: str,
                            accepted: str | None = None) -> None:
    """The runs among `keys` that will train (not done), and done ones without a fingerprint (written by an
    older spach), train on data of `fingerprint`. `accepted`: done runs on other data are kept (the
    `--accept-changed-data` of `spach battle`): they take the new fingerprint, and `accepted` (what changed)
    is stored for the report (`data_change_accepted`)."""
    with _Tx(conn):
        done = "" if accepted else " AND (status != 'done' OR data_fingerprint IS NULL)"
        conn.executemany(f"UPDATE runs SET data_fingerprint = ? WHERE key = ?{done}",
                         [(fingerprint, k) for k in keys])
        if accepted:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('data_change_accepted', ?)", (accepted,))


def data_change_accepted(conn: sqlite3.Connection) -> str | None:
    """What changed in the data of done runs that were kept anyway (`record_data_fingerprint`), or None."""
    row = conn.execute("SELECT v FROM meta WHERE k = 'data_change_accepted'").fetchone()
    return row["v"] if row else None


def reset_interrupted(conn: sqlite3.Connection) -> tuple[list[str], list[tuple[str, int]]]:
    """Runs left 'running' by a dead owner go back to 'queued' (the caller holds the study lock).

    Returns (names reset, [(name, pid)] of runs whose owner process is still alive — e.g. a worker
    that outlived a killed `spach battle`; those are left alone).
    """
    with _Tx(conn):
        # runs of Slurm jobs (job_id set) belong to their job, not to a local process
        rows = list(conn.execute("SELECT key, name, owner_pid, output_dir FROM runs WHERE status = 'running'"
                                 " AND job_id IS NULL"))
        dead = [r for r in rows if not owner_alive(r)]
        conn.executemany("UPDATE runs SET status = 'queued', owner_pid = NULL WHERE key = ?",
                         [(r["key"],) for r in dead])
    return [r["name"] for r in dead], [(r["name"], r["owner_pid"]) for r in rows if r not in dead]


def requeue_failed(conn: sqlite3.Connection, keys: Iterable[str]) -> int:
    keys = list(keys)
    with _Tx(conn):
        cur = conn.executemany("UPDATE runs SET status = 'queued', error = NULL WHERE key = ? AND status = 'failed'",
                               [(k,) for k in keys])
    return cur.rowcount


def mark_running(conn: sqlite3.Connection, key: str, pid: int) -> None:
    """The calling process (pid) executes the run from now on: it takes the run's lock (see the module doc)."""
    _take_run_lock(key, Path(get_run(conn, key)["output_dir"]))
    with _Tx(conn):
        conn.execute("UPDATE runs SET status = 'running', owner_pid = ?, started_at = ?, attempts = attempts + 1,"
                     " error = NULL WHERE key = ?", (pid, time.time(), key))


def mark_submitted(conn: sqlite3.Connection, key: str, job_id: str) -> None:
    """A Slurm job was submitted for the run: it is 'running' (queued or executing on the cluster)."""
    with _Tx(conn):
        conn.execute("UPDATE runs SET status = 'running', job_id = ?, job_attempt = 0, node = NULL, owner_pid = NULL,"
                     " submitted_at = ?, error = NULL WHERE key = ?", (job_id, time.time(), key))


def mark_job_attempt(conn: sqlite3.Connection, key: str, job_id: str, attempt: int, node: str | None,
                     started_at: float | None) -> None:
    """The run's Slurm job started its `attempt`-th time (1 + requeues) on `node`; counted once per attempt."""
    with _Tx(conn):
        conn.execute("UPDATE runs SET attempts = attempts + (? - job_attempt), job_attempt = ?, node = ?,"
                     " started_at = COALESCE(?, started_at) WHERE key = ? AND job_id = ? AND job_attempt < ?",
                     (attempt, attempt, node, started_at, key, job_id, attempt))


def mark_done(conn: sqlite3.Connection, key: str, metrics: dict[str, Any]) -> None:
    """The one way a run becomes 'done': its metrics, and its per-example evidence when its output
    directory holds one (`spach.engine.evidence`), in one transaction."""
    from spach.engine.evidence import read_evidence

    cols = ", ".join(f"{m} = ?" for m in METRICS)
    evidence = read_evidence(get_run(conn, key)["output_dir"])
    with _Tx(conn):
        conn.execute(f"UPDATE runs SET status = 'done', finished_at = ?, owner_pid = NULL, {cols} WHERE key = ?",
                     (time.time(), *[metrics.get(m) for m in METRICS], key))
        if evidence is not None:
            conn.execute("INSERT OR REPLACE INTO evidence VALUES (?, ?, ?, ?, ?, ?)", (key, *pack_evidence(*evidence)))
    _release_run_lock(key)


def pack_evidence(predictions: np.ndarray, targets: np.ndarray) -> tuple[int, str, bytes, bytes, str]:
    """(n, targets_sha, correct bits, predictions bytes, their dtype): a run's evidence as stored."""
    top = int(max(predictions.max(initial=0), targets.max(initial=0)))
    dtype = "uint8" if top < 2 ** 8 else "uint16" if top < 2 ** 16 else "int32"
    sha = hashlib.sha256(np.ascontiguousarray(targets, dtype=np.int64).tobytes()).hexdigest()
    return (len(targets), sha, np.packbits(predictions == targets).tobytes(),
            predictions.astype(dtype).tobytes(), dtype)


def evidence(conn: sqlite3.Connection, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{key: {"n", "targets_sha", "correct" (bool array), "predictions"}} for those of `keys` that have
    evidence (an older database may have none: an empty dict)."""
    keys = list(keys)
    out = {}
    for i in range(0, len(keys), 500):  # SQLite's bound on host parameters
        chunk = keys[i:i + 500]
        for r in _rows_of_optional_table(conn, f"SELECT * FROM evidence WHERE key IN ({','.join('?' * len(chunk))})",
                                         tuple(chunk)):
            n = r["n"]
            out[r["key"]] = {"n": n, "targets_sha": r["targets_sha"],
                             "correct": np.unpackbits(np.frombuffer(r["correct"], np.uint8), count=n).astype(bool),
                             "predictions": np.frombuffer(r["predictions"], r["pred_dtype"])}
    return out


def record_speed(conn: sqlite3.Connection, key: str, images_per_s: float) -> None:
    """Store a done run's inference throughput (measured after all training, one run at a time)."""
    with _Tx(conn):
        conn.execute("UPDATE runs SET images_per_s = ? WHERE key = ? AND status = 'done'", (images_per_s, key))


def mark_failed(conn: sqlite3.Connection, key: str, error: str) -> None:
    with _Tx(conn):
        conn.execute("UPDATE runs SET status = 'failed', finished_at = ?, owner_pid = NULL, error = ? WHERE key = ?",
                     (time.time(), error, key))
    _release_run_lock(key)


def record_epoch(conn: sqlite3.Connection, key: str, record: dict[str, Any]) -> None:
    with _Tx(conn):
        conn.execute(f"INSERT OR REPLACE INTO epochs (key, epoch, {', '.join(EPOCH_FIELDS)}) VALUES (?, ?, "
                     + ", ".join("?" for _ in EPOCH_FIELDS) + ")",
                     (key, int(record["epoch"]), *[_num(record.get(f)) for f in EPOCH_FIELDS]))


def _num(x: Any) -> float | None:
    return None if x is None else float(x)


def study_keys(conn: sqlite3.Connection) -> list[str]:
    row = conn.execute("SELECT v FROM meta WHERE k = 'keys'").fetchone()
    return json.loads(row["v"]) if row else []


def mixer_facts_of(conn: sqlite3.Connection) -> dict[str, dict[str, Any]] | None:
    """{family: {"weight_free": bool | None}} as recorded when the study was registered; None for a
    database written before spach recorded them."""
    return get_meta(conn, "mixer_facts")


def study_name(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT v FROM meta WHERE k = 'name'").fetchone()
    return row["v"] if row else "study"


def runs(conn: sqlite3.Connection, keys: list[str] | None = None) -> list[dict[str, Any]]:
    rows = [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY created_at, name")]
    if keys is None:
        return rows
    order = {k: i for i, k in enumerate(keys)}
    return sorted((r for r in rows if r["key"] in order), key=lambda r: order[r["key"]])


def epochs_of(row: dict[str, Any]) -> int | None:
    """The epochs a run's recipe trains for (None if not set), from its row."""
    return json.loads(row["config"])["train"].get("epochs")


def get_run(conn: sqlite3.Connection, key: str) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM runs WHERE key = ?", (key,)).fetchone()
    if row is None:
        raise ValueError(f"no run with key {key} in the database")
    return dict(row)


def epochs(conn: sqlite3.Connection, key: str) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute("SELECT * FROM epochs WHERE key = ? ORDER BY epoch", (key,))]


def skipped(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    return [(r["name"], r["reason"]) for r in conn.execute("SELECT * FROM skipped ORDER BY name")]


def _take_run_lock(key: str, run_dir: Path) -> None:
    _release_run_lock(key)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpachError(f"{run_dir} is being trained by another process (its {RUN_LOCK} is held)") from None
    except OSError:  # a file system without locks: owner_alive falls back to the PID
        os.close(fd)
        return
    _held[key] = fd


def _release_run_lock(key: str) -> None:
    fd = _held.pop(key, None)
    if fd is not None:
        os.close(fd)  # closing releases the flock


def owner_alive(row: Any) -> bool:
    """Is the run of this 'running' row still executed by a live process? (its run lock is held)"""
    if row["key"] in _held:  # this very process, which is not executing it now (an interrupted run_study)
        _release_run_lock(row["key"])
        return False
    path = Path(row["output_dir"]) / RUN_LOCK
    if not path.is_file():  # started by a spach without run locks: only the PID is known
        return pid_alive(row["owner_pid"])
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks
        return pid_alive(row["owner_pid"])
    finally:
        os.close(fd)
    return False


def record_analysis(conn: sqlite3.Connection, subject: str, kind: str, settings: str, result: dict) -> None:
    """Store one measurement (replacing the one of the same subject and kind, computed with other settings)."""
    with _Tx(conn):
        conn.execute("INSERT OR REPLACE INTO analysis VALUES (?, ?, ?, ?, ?)",
                     (subject, kind, settings, json.dumps(result), time.time()))


def _rows_of_optional_table(conn: sqlite3.Connection, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    """The rows of a query on a table that a database written by an older spach may lack ([] then; such a
    database is read without being changed)."""
    try:
        return list(conn.execute(sql, params))
    except sqlite3.OperationalError:  # no such table
        return []


def analysis_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every stored measurement: subject, kind, settings, result (parsed); [] for a database without them."""
    rows = _rows_of_optional_table(conn, "SELECT * FROM analysis ORDER BY created_at")
    return [dict(r, result=json.loads(r["result"])) for r in rows]


def pid_alive(pid: int | None) -> bool:
    """Is `pid` a live process running spach (a recycled PID of another program does not count)?"""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return b"spach" in cmdline.read_bytes()
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- tuning (spach.battle.tune)

def add_cpu_time(conn: sqlite3.Connection, key: str, seconds: float) -> None:
    """Add CPU seconds spent on a run (counted per finished epoch by its executing process)."""
    with _Tx(conn):
        conn.execute("UPDATE runs SET cpu_time_s = COALESCE(cpu_time_s, 0) + ? WHERE key = ?", (seconds, key))


def set_meta(conn: sqlite3.Connection, k: str, value: Any) -> None:
    """Store `value` (JSON) under meta key `k`."""
    with _Tx(conn):
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, json.dumps(value)))


def get_meta(conn: sqlite3.Connection, k: str) -> Any:
    """The JSON value stored under meta key `k`, or None."""
    row = conn.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
    return json.loads(row["v"]) if row else None


def record_trial(conn: sqlite3.Connection, grp: str, number: int, key: str, params: dict, state: str,
                 value: float | None, budget: int, epochs: int | None = None) -> None:
    """Store (or update) trial `number` of architecture `grp`: its run, parameters, state, score and the epochs
    its run trained."""
    with _Tx(conn):
        conn.execute("INSERT OR REPLACE INTO trials (grp, number, key, params, state, value, budget, epochs)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (grp, number, key, json.dumps(params, sort_keys=True), state, value, budget, epochs))


def trials(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every recorded trial (params parsed), by architecture and number; [] for a database without them."""
    rows = _rows_of_optional_table(conn, "SELECT * FROM trials ORDER BY grp, number")
    return [dict(r, params=json.loads(r["params"])) for r in rows]
