"""The run store's schema: statuses, artifact kinds and the migrations that build each version.

Each entry of ``MIGRATIONS`` migrates the schema from version i to i+1. Append, never edit: stores in the wild
are at some version and replay only the entries after it.
"""

from __future__ import annotations

DB_NAME = "runs.db"
# "interrupted": stopped by SIGTERM or Ctrl-C, or found gone (killed) by `attar runs list`; resumable.
RUN_STATUSES = ("running", "done", "failed", "interrupted")
ARTIFACT_KINDS = ("model", "data", "report", "checkpoint")

# Each entry migrates the schema from version i to i+1. Append, never edit: stores in
# the wild are at some version and replay only the entries after it.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            recipe TEXT NOT NULL,
            recipe_sha256 TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
            error TEXT,
            started TEXT NOT NULL,
            ended TEXT,
            run_dir TEXT,
            seed INTEGER,
            git_commit TEXT,
            environment TEXT NOT NULL
        )""",
        "CREATE INDEX runs_started ON runs (started)",
        """CREATE TABLE stages (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            kind TEXT NOT NULL,
            idx INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
            error TEXT,
            started TEXT NOT NULL,
            ended TEXT,
            params TEXT NOT NULL,
            PRIMARY KEY (run_id, name)
        )""",
        """CREATE TABLE metrics (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            stage TEXT NOT NULL,
            step INTEGER NOT NULL,
            key TEXT NOT NULL,
            value REAL
        )""",
        "CREATE INDEX metrics_curve ON metrics (run_id, stage, key, step)",
        """CREATE TABLE artifacts (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            stage TEXT NOT NULL,
            name TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('model', 'data', 'report', 'checkpoint')),
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            created TEXT NOT NULL,
            PRIMARY KEY (run_id, stage, name)
        )""",
    ],
    # v2: runs and stages may be 'interrupted'. SQLite cannot change a CHECK constraint in place, so both
    # tables are rebuilt (foreign keys are off during migrations, so the rebuild cascades nothing).
    [
        """CREATE TABLE runs_v2 (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            recipe TEXT NOT NULL,
            recipe_sha256 TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
            error TEXT,
            started TEXT NOT NULL,
            ended TEXT,
            run_dir TEXT,
            seed INTEGER,
            git_commit TEXT,
            environment TEXT NOT NULL
        )""",
        "INSERT INTO runs_v2 SELECT id, name, recipe, recipe_sha256, status, error, started, ended, run_dir, seed,"
        " git_commit, environment FROM runs",
        "DROP TABLE runs",
        "ALTER TABLE runs_v2 RENAME TO runs",
        "CREATE INDEX runs_started ON runs (started)",
        """CREATE TABLE stages_v2 (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            kind TEXT NOT NULL,
            idx INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
            error TEXT,
            started TEXT NOT NULL,
            ended TEXT,
            params TEXT NOT NULL,
            PRIMARY KEY (run_id, name)
        )""",
        "INSERT INTO stages_v2 SELECT run_id, name, kind, idx, status, error, started, ended, params FROM stages",
        "DROP TABLE stages",
        "ALTER TABLE stages_v2 RENAME TO stages",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)
