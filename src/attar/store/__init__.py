"""SQLite run store: every run, stage, metric and artifact, in one file.

Why SQLite: one file under ``$ATTAR_HOME`` that `attar runs list/show/compare`
can query while a run is still writing (WAL mode lets readers proceed alongside
one writer), with no server to set up. The schema is versioned so later attar
versions migrate old stores in place instead of refusing them.

This module deliberately imports neither torch nor matplotlib, so CLI commands
that only read the store start fast. Rank-0-only writing is the caller's job.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

from attar.errors import AttarError
from attar.lifecycle import lock_state, no_space_error
from attar.store.provenance import (  # noqa: F401  (part of the store's API)
    check_home,
    default_db_path,
    environment_info,
    git_commit,
    hash_path,
    make_run_dir,
    new_run_id,
    now_iso,
)
from attar.store.schema import ARTIFACT_KINDS, DB_NAME, MIGRATIONS, RUN_STATUSES, SCHEMA_VERSION  # noqa: F401


class CompareRow(NamedTuple):
    stage: str
    metric: str
    a: float | None
    b: float | None
    delta: float | None  # b - a, None unless both are present


# ---------------------------------------------------------------- helpers


def _to_float(key: str, value: Any) -> float | None:
    if hasattr(value, "item"):  # tensors and numpy scalars, without importing either
        value = value.item()
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise AttarError(f"Metric {key!r} has value {value!r}, which is not a number.") from None
    return None if math.isnan(f) else f  # SQLite stores NaN as NULL; we read NULL back as NaN


def _from_db(value: float | None) -> float:
    return math.nan if value is None else value


# ---------------------------------------------------------------- the store


class RunStore:
    """One connection to a runs database; thread-safe for one writer plus readers.

    Other processes may open the same file and read while this one writes (WAL).
    Use as ``with RunStore(path) as store: ...`` or call :meth:`close`.
    """

    def __init__(self, path: str | Path | None = None, *, home: str | Path | None = None):
        self.path = Path(path) if path is not None else default_db_path(home)
        self._lock = threading.RLock()
        check_home(self.path.parent)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AttarError(f"Cannot create the runs folder {self.path.parent}: {e.strerror}. Point ATTAR_HOME or "
                             "--home at a folder you can write.") from None
        with self._db_errors():
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is one transaction.
            self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            # In WAL mode, NORMAL makes commits cheap (no fsync per commit) and stays crash-consistent.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=OFF")  # a migration may rebuild a table others reference
            self._migrate()
            self._conn.execute("PRAGMA foreign_keys=ON")

    # -- plumbing

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if hasattr(self, "_conn"):
                self._conn.close()

    @contextmanager
    def _db_errors(self) -> Iterator[None]:
        """SQLite's errors as one paragraph naming the store file and the way out (IntegrityError passes:
        callers handle it). Why: a damaged or full store must not end `attar runs list` in a traceback."""
        try:
            yield
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as e:
            code = getattr(e, "sqlite_errorcode", None)
            if code == sqlite3.SQLITE_FULL:
                raise no_space_error(self.path) from None
            if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise AttarError(f"The run store {self.path} stayed locked by another process for 30 s ({e}); "
                                 "try again when that process has finished writing.") from None
            if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN):
                raise AttarError(f"Cannot write the run store {self.path} ({e}): check that you may write that file "
                                 "and its folder, or point ATTAR_HOME or --home at a folder you can write.") from None
            raise AttarError(
                f"The run store {self.path} cannot be read ({e}): the file is damaged or is not an attar run store. "
                f"Move it aside (e.g. `mv {self.path} {self.path}.damaged`, and any {self.path.name}-wal and "
                f"{self.path.name}-shm files next to it) and the next `attar run` starts a fresh store; the run "
                "folders next to it (models, checkpoints, reports) are separate files and stay intact. Or point "
                "ATTAR_HOME or --home elsewhere."
            ) from None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front, so it waits rather than deadlocks."""
        with self._lock, self._db_errors():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite may have rolled back already (e.g. disk full); report the first error
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock, self._db_errors():
            return self._conn.execute(sql, args).fetchall()

    def _migrate(self) -> None:
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = c.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if row is None:
                c.execute("INSERT INTO schema_version (version) VALUES (0)")
            if version > SCHEMA_VERSION:
                raise AttarError(
                    f"The run store {self.path} has schema version {version}, newer than this attar understands "
                    f"({SCHEMA_VERSION}). Upgrade attar, or use another ATTAR_HOME."
                )
            for statements in MIGRATIONS[version:]:
                for sql in statements:
                    c.execute(sql)
            c.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @property
    def schema_version(self) -> int:
        return self._query("SELECT version FROM schema_version")[0][0]

    # -- runs

    def start_run(
        self,
        name: str,
        recipe_text: str,
        run_dir: str | Path | None,
        seed: int | None,
        *,
        run_id: str | None = None,
    ) -> str:
        """Record a new running run; returns its id.

        To name the run folder after the id, pass ``run_dir=None`` and call :meth:`set_run_dir`
        once it exists, or choose the id up front with ``run_id=new_run_id()``.
        """
        env = json.dumps(environment_info(), sort_keys=True)
        commit = git_commit()
        recipe_sha = hashlib.sha256(recipe_text.encode()).hexdigest()
        for _ in range(20):
            rid = run_id or new_run_id()
            try:
                with self._tx() as c:
                    c.execute(
                        "INSERT INTO runs (id, name, recipe, recipe_sha256, status, started, run_dir, seed, git_commit,"
                        " environment) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                        (rid, name, recipe_text, recipe_sha, now_iso(), None if run_dir is None else str(run_dir), seed, commit, env),
                    )
                return rid
            except sqlite3.IntegrityError:
                if run_id is not None:
                    raise AttarError(f"A run with id {run_id!r} already exists in {self.path}.") from None
        raise AttarError(f"Could not find a free run id in {self.path}.")  # pragma: no cover

    def finish_run(self, run_id: str, status: str, error: str | None = None) -> None:
        """Mark a run ``done``, ``failed`` or ``interrupted`` (with the error text shown by `attar runs show`).

        A stage still ``running`` in a failed or interrupted run gets the run's status: it stopped with it.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
        when = now_iso()
        with self._tx() as c:
            cur = c.execute("UPDATE runs SET status = ?, error = ?, ended = ? WHERE id = ?", (status, error, when, run_id))
            if status != "done":
                c.execute("UPDATE stages SET status = ?, error = ?, ended = ? WHERE run_id = ? AND status = 'running'",
                          (status, error, when, run_id))
        if cur.rowcount == 0:
            raise AttarError(f"No run {run_id!r} in {self.path}.")

    def set_run_dir(self, run_id: str, run_dir: str | Path) -> None:
        self._update_run(run_id, "run_dir = ?", (str(run_dir),))

    def resume_run(self, run_id: str) -> None:
        """Mark a failed or interrupted run as running again (its stages and metrics are kept)."""
        if not self._query("SELECT 1 FROM runs WHERE id = ?", (run_id,)):
            raise AttarError(f"Run {run_id!r} is not in the run store {self.path}. Resume with the --home (or "
                             "ATTAR_HOME) the run was started with: the folder that holds both the run and runs.db.")
        self._update_run(run_id, "status = 'running', error = NULL, ended = NULL", ())

    def _run_folder(self, run_id: str, run_dir: str | None) -> Path:
        # Runs live in <home>/<id> next to runs.db; a relative run_dir was relative to the runner's cwd, not ours.
        here = self.path.parent / run_id
        if not here.is_dir() and run_dir and Path(run_dir).is_absolute():
            return Path(run_dir)
        return here

    def mark_gone_runs(self) -> list[str]:
        """Record ``running`` runs whose process is gone (nobody holds the run folder's lock) as ``interrupted``;
        returns their ids.

        Why: a process killed with SIGKILL (or by the out-of-memory killer) cannot record that it stopped.
        The lock is checked again inside the write transaction: a resume takes the run lock before it marks
        the run running, so a run being resumed right now is never marked.
        """
        rows = self._query("SELECT id, run_dir FROM runs WHERE status = 'running'")
        gone = [(r["id"], self._run_folder(r["id"], r["run_dir"])) for r in rows]
        gone = [(rid, d) for rid, d in gone if lock_state(d) is False]
        marked = []
        if gone:
            when = now_iso()
            with self._tx() as c:
                for rid, d in gone:
                    if lock_state(d) is not False:
                        continue
                    error = (f"the process stopped without recording it (killed, e.g. SIGKILL or out of memory); "
                             f"resume with `attar run --resume {d}`")
                    cur = c.execute("UPDATE runs SET status = 'interrupted', error = ?, ended = ? WHERE id = ? AND "
                                    "status = 'running'", (error, when, rid))
                    c.execute("UPDATE stages SET status = 'interrupted', ended = ? WHERE run_id = ? AND status = "
                              "'running'", (when, rid))
                    if cur.rowcount:
                        marked.append(rid)
        return marked

    def update_recipe(self, run_id: str, recipe_text: str) -> None:
        """Record the recipe a resume continued with (only optimiser settings may differ; see Pipeline.check_resume)."""
        sha = hashlib.sha256(recipe_text.encode()).hexdigest()
        self._update_run(run_id, "recipe = ?, recipe_sha256 = ?", (recipe_text, sha))

    def _update_run(self, run_id: str, assignments: str, args: tuple[Any, ...]) -> None:
        with self._tx() as c:
            cur = c.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*args, run_id))
        if cur.rowcount == 0:
            raise AttarError(f"No run {run_id!r} in {self.path}.")

    def resolve_run_id(self, ref: str) -> str:
        """Full id for ``ref``: an exact id, a unique id prefix, or ``latest``."""
        if ref == "latest":
            rows = self._query("SELECT id FROM runs ORDER BY started DESC, rowid DESC LIMIT 1")
            if not rows:
                raise AttarError(f"The run store {self.path} has no runs yet.")
            return rows[0][0]
        if self._query("SELECT 1 FROM runs WHERE id = ?", (ref,)):
            return ref
        escaped = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self._query(
            "SELECT id FROM runs WHERE id LIKE ? ESCAPE '\\' ORDER BY started DESC LIMIT 11", (escaped + "%",)
        )
        if len(rows) == 1:
            return rows[0][0]
        if not rows:
            recent = ", ".join(r[0] for r in self._query("SELECT id FROM runs ORDER BY started DESC LIMIT 5"))
            hint = f" Recent runs: {recent}." if recent else " The store has no runs yet."
            raise AttarError(f"No run matches {ref!r} in {self.path}.{hint} See `attar runs list`.")
        names = ", ".join(r[0] for r in rows[:10]) + (", …" if len(rows) > 10 else "")
        raise AttarError(f"Run id prefix {ref!r} is ambiguous; it matches {names}. Type more characters.")

    @staticmethod
    def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        d["environment"] = json.loads(d["environment"])
        return d

    def list_runs(self, limit: int | None = 20) -> list[dict[str, Any]]:
        """Newest first; the recipe text is left out to keep listings small."""
        rows = self._query(
            "SELECT id, name, recipe_sha256, status, error, started, ended, run_dir, seed, git_commit, environment"
            " FROM runs ORDER BY started DESC, rowid DESC LIMIT ?",
            (-1 if limit is None else int(limit),),
        )
        return [self._run_dict(r) for r in rows]

    def get_run(self, ref: str) -> dict[str, Any]:
        """A run with its ``stages`` and ``artifacts``; ``ref`` may be an id prefix or ``latest``."""
        rid = self.resolve_run_id(ref)
        run = self._run_dict(self._query("SELECT * FROM runs WHERE id = ?", (rid,))[0])
        run["stages"] = self.list_stages(rid)
        run["artifacts"] = self.list_artifacts(rid)
        return run

    # -- stages

    def start_stage(self, run_id: str, name: str, kind: str, index: int, params: Mapping[str, Any] | None = None) -> None:
        """Record a stage as running. Starting it again (resume) resets its status and params."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO stages (run_id, name, kind, idx, status, started, params) VALUES (?, ?, ?, ?, 'running', ?, ?)"
                " ON CONFLICT (run_id, name) DO UPDATE SET kind = excluded.kind, idx = excluded.idx,"
                " status = 'running', error = NULL, started = excluded.started, ended = NULL, params = excluded.params",
                (run_id, name, kind, int(index), now_iso(), json.dumps(dict(params or {}), sort_keys=True, default=str)),
            )

    def finish_stage(self, run_id: str, name: str, status: str = "done", error: str | None = None) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"stage status must be one of {RUN_STATUSES}, got {status!r}")
        with self._tx() as c:
            cur = c.execute(
                "UPDATE stages SET status = ?, error = ?, ended = ? WHERE run_id = ? AND name = ?",
                (status, error, now_iso(), run_id, name),
            )
        if cur.rowcount == 0:
            raise AttarError(f"Run {run_id!r} has no stage {name!r}; call start_stage first.")

    def list_stages(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM stages WHERE run_id = ? ORDER BY idx, started", (run_id,))
        out = []
        for r in rows:
            d = dict(r)
            d["index"] = d.pop("idx")
            d["params"] = json.loads(d["params"])
            out.append(d)
        return out

    # -- metrics

    def log_metrics(self, run_id: str, stage: str | None, step: int, values: Mapping[str, Any]) -> None:
        """Append one step's metrics in a single transaction (tensors and numpy scalars accepted; NaN kept).

        ``stage=None`` records run-level metrics (stored under the stage name ``""``).
        """
        rows = [(run_id, stage or "", int(step), k, _to_float(k, v)) for k, v in values.items()]
        if not rows:
            return
        with self._tx() as c:
            c.executemany("INSERT INTO metrics (run_id, stage, step, key, value) VALUES (?, ?, ?, ?, ?)", rows)

    def stage_metrics(self, run_id: str, stage: str | None) -> dict[str, list[tuple[int, float]]]:
        """``{key: [(step, value), ...]}`` in step order, ready to plot.

        A step logged twice (a resumed run replays steps since its last checkpoint) keeps the later value.
        """
        rows = self._query(
            "SELECT key, step, value FROM metrics WHERE run_id = ? AND stage = ? ORDER BY key, step, rowid",
            (run_id, stage or ""),
        )
        by_key: dict[str, dict[int, float]] = {}
        for key, step, value in rows:
            by_key.setdefault(key, {})[step] = _from_db(value)
        return {k: list(steps.items()) for k, steps in by_key.items()}

    def curves(self, run_id: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """Every stage's metrics, the ``curves`` argument of :func:`attar.report.write_report`."""
        stages = [s["name"] for s in self.list_stages(run_id)]
        extra = [r[0] for r in self._query("SELECT DISTINCT stage FROM metrics WHERE run_id = ? ORDER BY stage", (run_id,))]
        return {s: self.stage_metrics(run_id, s) for s in stages + [s for s in extra if s not in stages]}

    def final_metrics(self, run_id: str) -> dict[str, dict[str, float]]:
        """``{stage: {key: value at the highest step}}`` (ties: the value logged last)."""
        rows = self._query(
            "SELECT stage, key, value FROM ("
            " SELECT stage, key, value, ROW_NUMBER() OVER (PARTITION BY stage, key ORDER BY step DESC, rowid DESC) AS rn"
            " FROM metrics WHERE run_id = ?) WHERE rn = 1 ORDER BY stage, key",
            (run_id,),
        )
        out: dict[str, dict[str, float]] = {}
        for stage, key, value in rows:
            out.setdefault(stage, {})[key] = _from_db(value)
        return out

    def compare(self, run_a: str, run_b: str) -> list[CompareRow]:
        """Final metrics of two runs side by side, stages in recipe order, ``delta = b - a``."""
        ida, idb = self.resolve_run_id(run_a), self.resolve_run_id(run_b)
        fa, fb = self.final_metrics(ida), self.final_metrics(idb)
        order: dict[str, int] = {}
        for rid in (ida, idb):
            for s in self.list_stages(rid):
                order.setdefault(s["name"], len(order))
        stages = sorted(set(fa) | set(fb), key=lambda s: (order.get(s, len(order)), s))
        rows = []
        for stage in stages:
            ma, mb = fa.get(stage, {}), fb.get(stage, {})
            for key in sorted(set(ma) | set(mb)):
                a, b = ma.get(key), mb.get(key)
                delta = b - a if a is not None and b is not None else None
                rows.append(CompareRow(stage, key, a, b, delta))
        return rows

    # -- artifacts

    def add_artifact(self, run_id: str, stage: str | None, name: str, kind: str, path: str | Path) -> dict[str, Any]:
        """Record a file or folder with its sha256 and size; re-adding the same name replaces it (resume).

        ``stage=None`` records a run-level artifact such as the report (stored under the stage name ``""``).
        """
        stage = stage or ""
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"artifact kind must be one of {ARTIFACT_KINDS}, got {kind!r}")
        path = Path(path).resolve()
        digest, nbytes = hash_path(path)
        row = (run_id, stage, name, kind, str(path), digest, nbytes, now_iso())
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO artifacts (run_id, stage, name, kind, path, sha256, bytes, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        return dict(zip(("run_id", "stage", "name", "kind", "path", "sha256", "bytes", "created"), row))

    def list_artifacts(self, run_id: str, stage: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT a.* FROM artifacts a LEFT JOIN stages s ON s.run_id = a.run_id AND s.name = a.stage WHERE a.run_id = ?"
        args: tuple[Any, ...] = (run_id,)
        if stage is not None:
            sql += " AND a.stage = ?"
            args += (stage,)
        return [dict(r) for r in self._query(sql + " ORDER BY s.idx IS NULL, s.idx, a.created, a.rowid", args)]

    def get_artifact(self, run_ref: str, stage: str, name: str | None = None, kind: str | None = None) -> dict[str, Any]:
        """The one artifact a ``{artifact: run/stage}`` reference means; errors list what exists."""
        rid = self.resolve_run_id(run_ref)
        found = [
            a
            for a in self.list_artifacts(rid, stage)
            if (name is None or a["name"] == name) and (kind is None or a["kind"] == kind)
        ]
        if len(found) == 1:
            return found[0]
        have = ", ".join(f"{a['stage']}/{a['name']} ({a['kind']})" for a in self.list_artifacts(rid)) or "none"
        what = f"{rid}/{stage}" + (f"/{name}" if name else "") + (f" of kind {kind}" if kind else "")
        if not found:
            raise AttarError(f"No artifact {what}. Run {rid} has: {have}.")
        raise AttarError(f"Artifact reference {what} is ambiguous; name one of: {have}.")
