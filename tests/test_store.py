import json
import math
import sqlite3
import threading

import pytest

from attar.errors import AttarError
from attar.store import SCHEMA_VERSION, RunStore, default_db_path, hash_path, new_run_id


@pytest.fixture
def store(tmp_path):
    with RunStore(tmp_path / "home" / "runs.db") as s:
        yield s


def test_default_location_follows_attar_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTAR_HOME", str(tmp_path / "h"))
    assert default_db_path() == tmp_path / "h" / "runs.db"
    assert default_db_path(tmp_path / "x") == tmp_path / "x" / "runs.db"
    monkeypatch.delenv("ATTAR_HOME")
    monkeypatch.chdir(tmp_path)
    with RunStore() as s:
        assert s.path.resolve() == (tmp_path / "runs" / "runs.db").resolve()
    assert (tmp_path / "runs" / "runs.db").exists()


def test_schema_pragmas_and_version(store, tmp_path):
    assert store.schema_version == SCHEMA_VERSION
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    # Reopening a store does not re-run migrations.
    with RunStore(store.path) as again:
        assert again.schema_version == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "runs.db"
    RunStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 999")
    conn.commit()
    conn.close()
    with pytest.raises(AttarError, match="newer"):
        RunStore(path)


def test_run_id_format():
    rid = new_run_id()
    date, hm, tail = rid.split("-")
    assert len(date) == 8 and len(hm) == 4 and len(tail) == 4


def test_round_trip(store, tmp_path):
    recipe = "stages:\n  - kind: train\n"
    rid = store.start_run("quickstart", recipe, tmp_path / "run", seed=7)
    run = store.get_run(rid)
    assert run["status"] == "running" and run["seed"] == 7 and run["name"] == "quickstart"
    assert run["recipe"] == recipe and len(run["recipe_sha256"]) == 64
    env = run["environment"]
    assert {"python", "torch", "attar", "platform", "cpu_count"} <= set(env)
    assert run["git_commit"] is None or len(run["git_commit"]) == 40

    store.start_stage(rid, "teacher", "train", 0, {"epochs": 3, "lr": 1e-3})
    store.start_stage(rid, "student", "distill", 1, {"teacher": "teacher"})
    for step in range(5):
        store.log_metrics(rid, "teacher", step, {"loss": 1.0 / (step + 1), "val/accuracy": 0.5 + step / 10})
    store.log_metrics(rid, "student", 10, {"loss": 2.0, "accuracy": 0.8})
    store.log_metrics(rid, "student", 20, {"loss": float("nan")})
    store.finish_stage(rid, "teacher")
    store.finish_stage(rid, "student", "failed", "NaN loss")
    store.finish_run(rid, "failed", "stage student failed")

    sm = store.stage_metrics(rid, "teacher")
    assert sm["loss"] == [(s, pytest.approx(1.0 / (s + 1))) for s in range(5)]
    assert [s for s, _ in sm["val/accuracy"]] == list(range(5))
    final = store.final_metrics(rid)
    assert final["teacher"] == {"loss": pytest.approx(0.2), "val/accuracy": pytest.approx(0.9)}
    assert math.isnan(final["student"]["loss"]) and final["student"]["accuracy"] == pytest.approx(0.8)
    assert set(store.curves(rid)) == {"teacher", "student"}

    run = store.get_run(rid)
    assert run["status"] == "failed" and run["error"] == "stage student failed" and run["ended"]
    assert [(s["name"], s["index"], s["status"]) for s in run["stages"]] == [
        ("teacher", 0, "done"),
        ("student", 1, "failed"),
    ]
    assert run["stages"][0]["params"] == {"epochs": 3, "lr": 1e-3}
    assert run["stages"][1]["error"] == "NaN loss"


def test_restarting_a_stage_resets_it(store, tmp_path):
    rid = store.start_run("r", "", tmp_path, seed=None)
    store.start_stage(rid, "s", "train", 0, {"a": 1})
    store.finish_stage(rid, "s", "failed", "boom")
    store.start_stage(rid, "s", "train", 0, {"a": 2})
    (stage,) = store.get_run(rid)["stages"]
    assert stage["status"] == "running" and stage["error"] is None and stage["params"] == {"a": 2}


def test_artifacts_hash_files_and_folders(store, tmp_path):
    rid = store.start_run("r", "", tmp_path, seed=0)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"abc")
    a = store.add_artifact(rid, "teacher", "weights", "model", f)
    # sha256("abc"), a well-known test vector
    assert a["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert a["bytes"] == 3

    d1, d2 = tmp_path / "ck1", tmp_path / "ck2"
    for d, order in ((d1, ["b.txt", "sub/a.txt"]), (d2, ["sub/a.txt", "b.txt"])):
        for name in order:  # creation order differs; the digest must not
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(name)
    (d2 / ".state.json.x1.tmp").write_text("half-written leftover")
    assert hash_path(d1) == hash_path(d2)
    assert hash_path(d1)[1] == len("b.txt") + len("sub/a.txt")
    (d2 / "b.txt").write_text("changed")
    assert hash_path(d1)[0] != hash_path(d2)[0]

    store.start_stage(rid, "teacher", "train", 0, {})
    store.add_artifact(rid, "teacher", "checkpoint", "checkpoint", d1)
    store.add_artifact(rid, "teacher", "checkpoint", "checkpoint", d2)  # same name replaces
    arts = store.list_artifacts(rid)
    assert [(x["name"], x["kind"]) for x in arts] == [("weights", "model"), ("checkpoint", "checkpoint")]
    assert store.get_artifact(rid, "teacher", kind="model")["path"] == str(f.resolve())
    with pytest.raises(AttarError, match="ambiguous"):
        store.get_artifact(rid, "teacher")
    with pytest.raises(AttarError, match="teacher/weights"):
        store.get_artifact(rid, "nope")
    with pytest.raises(AttarError, match="does not exist"):
        store.add_artifact(rid, "teacher", "x", "data", tmp_path / "missing")
    with pytest.raises(ValueError):
        store.add_artifact(rid, "teacher", "x", "weird", f)


def test_list_get_prefix_and_errors(store, tmp_path):
    ids = [store.start_run(f"r{i}", "", tmp_path, seed=i, run_id=rid) for i, rid in
           enumerate(["20260101-0000-aaaa", "20260101-0000-aabb", "20260102-0000-cccc"])]
    assert [r["id"] for r in store.list_runs()] == ids[::-1]
    assert len(store.list_runs(limit=2)) == 2
    assert "recipe" not in store.list_runs()[0]
    assert store.get_run("20260102")["id"] == ids[2]
    assert store.get_run("20260101-0000-aab")["id"] == ids[1]
    assert store.get_run("latest")["id"] == ids[2]
    with pytest.raises(AttarError) as e:
        store.get_run("20260101")
    assert "ambiguous" in str(e.value) and ids[0] in str(e.value) and ids[1] in str(e.value)
    with pytest.raises(AttarError, match="No run matches 'zzz'"):
        store.get_run("zzz")
    with pytest.raises(AttarError, match="No run matches"):
        store.get_run("2026%")  # LIKE wildcards are literal
    with pytest.raises(AttarError, match="already exists"):
        store.start_run("dup", "", tmp_path, seed=0, run_id=ids[0])
    with pytest.raises(AttarError, match="No run"):
        store.finish_run("nope", "done")
    with pytest.raises(ValueError):
        store.finish_run(ids[0], "finished")
    with pytest.raises(sqlite3.IntegrityError):  # foreign keys are on
        store.log_metrics("no-such-run", "s", 0, {"loss": 1.0})


def test_compare(store, tmp_path):
    a = store.start_run("a", "", tmp_path, seed=0)
    b = store.start_run("b", "", tmp_path, seed=1)
    for rid, acc, extra in ((a, 0.80, {"only_a": 1.0}), (b, 0.85, {})):
        store.start_stage(rid, "train", "train", 0, {})
        store.start_stage(rid, "eval", "evaluate", 1, {})
        store.log_metrics(rid, "train", 0, {"loss": 9.0})
        store.log_metrics(rid, "train", 1, {"loss": 1.0 if rid == a else 0.5})
        store.log_metrics(rid, "eval", 0, {"accuracy": acc, **extra})
    rows = store.compare(a, b)
    assert [(r.stage, r.metric) for r in rows] == [("train", "loss"), ("eval", "accuracy"), ("eval", "only_a")]
    assert rows[0].a == 1.0 and rows[0].b == 0.5 and rows[0].delta == pytest.approx(-0.5)
    assert rows[1].delta == pytest.approx(0.05)
    assert rows[2].b is None and rows[2].delta is None


def test_tensor_and_numpy_values(store, tmp_path):
    import numpy as np
    import torch

    rid = store.start_run("r", "", tmp_path, seed=0)
    store.log_metrics(rid, "s", 0, {"t": torch.tensor(0.25), "n": np.float32(0.5), "i": 3})
    assert store.final_metrics(rid)["s"] == {"i": 3.0, "n": 0.5, "t": 0.25}
    with pytest.raises(AttarError, match="'bad'"):
        store.log_metrics(rid, "s", 1, {"bad": "x"})


def test_concurrent_readers_while_writing(tmp_path):
    """WAL: other connections read consistent snapshots while one writer appends."""
    path = tmp_path / "runs.db"
    writer = RunStore(path)
    rid = writer.start_run("w", "", tmp_path, seed=0)
    writer.start_stage(rid, "train", "train", 0, {})
    n_steps = 300
    errors: list[BaseException] = []
    seen: list[int] = []
    done = threading.Event()

    partial_seen = threading.Event()

    def write():
        try:
            for step in range(n_steps):
                if step == n_steps // 2:  # guarantee readers overlap with an unfinished run
                    partial_seen.wait(timeout=10)
                writer.log_metrics(rid, "train", step, {"loss": 1.0 / (step + 1), "acc": step / n_steps})
        except BaseException as e:  # pragma: no cover
            errors.append(e)
        finally:
            done.set()

    def read():
        try:
            with RunStore(path) as reader:
                while True:
                    finished = done.is_set()
                    m = reader.stage_metrics(rid, "train")
                    # Each step's two keys are one transaction: never see one without the other.
                    assert len(m.get("loss", [])) == len(m.get("acc", []))
                    seen.append(len(m.get("loss", [])))
                    if 0 < seen[-1] < n_steps:
                        partial_seen.set()
                    reader.list_runs()
                    if finished:
                        break
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    writer.close()
    assert not errors, errors
    assert max(seen) == n_steps and any(0 < n < n_steps for n in seen)
    with RunStore(path) as s:
        assert len(s.stage_metrics(rid, "train")["loss"]) == n_steps


def test_environment_is_json(store, tmp_path):
    rid = store.start_run("r", "", tmp_path, seed=0)
    raw = store._conn.execute("SELECT environment FROM runs WHERE id = ?", (rid,)).fetchone()[0]
    assert json.loads(raw)["cpu_count"] >= 1


def test_open_reader_does_not_block_writer(tmp_path):
    """The WAL property itself: a reader mid-transaction keeps its snapshot and the writer still commits."""
    path = tmp_path / "runs.db"
    with RunStore(path) as writer:
        rid = writer.start_run("w", "", tmp_path, seed=0)
        writer.log_metrics(rid, "s", 0, {"loss": 1.0})
        reader = sqlite3.connect(path, timeout=0.1, isolation_level=None)
        reader.execute("BEGIN")
        count = "SELECT COUNT(*) FROM metrics"
        assert reader.execute(count).fetchone()[0] == 1
        writer.log_metrics(rid, "s", 1, {"loss": 0.5})  # would raise 'database is locked' without WAL
        assert reader.execute(count).fetchone()[0] == 1  # snapshot isolation
        reader.execute("COMMIT")
        assert reader.execute(count).fetchone()[0] == 2
        reader.close()


def test_pipeline_conveniences(store, tmp_path):
    """run_dir set after the id is known, resume, run-level (stage=None) records, replayed steps."""
    rid = store.start_run("r", "", None, seed=0)
    assert store.get_run(rid)["run_dir"] is None
    store.set_run_dir(rid, tmp_path / rid)
    assert store.get_run(rid)["run_dir"] == str(tmp_path / rid)
    store.finish_run(rid, "failed", "killed")
    store.resume_run(rid)
    run = store.get_run(rid)
    assert run["status"] == "running" and run["error"] is None and run["ended"] is None

    report = tmp_path / "report.md"
    report.write_text("# r")
    store.add_artifact(rid, None, "markdown", "report", report)
    assert store.get_artifact(rid, "", "markdown")["bytes"] == 3
    store.log_metrics(rid, None, 0, {"wall_s": 1.5})
    assert store.final_metrics(rid)[""] == {"wall_s": 1.5}

    for step, loss in ((10, 1.0), (20, 0.9), (20, 0.8), (30, 0.7)):  # resumed from step 10: 20 replayed
        store.log_metrics(rid, "train", step, {"train_loss": loss})
    assert store.stage_metrics(rid, "train")["train_loss"] == [(10, 1.0), (20, 0.8), (30, 0.7)]


# ---------------------------------------------------------------- interrupted runs, damaged and full stores


def _v1_store(path):
    """A store as attar wrote it before the 'interrupted' status existed (schema version 1)."""
    from attar.store import MIGRATIONS

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    for sql in MIGRATIONS[0]:
        conn.execute(sql)
    conn.execute("INSERT INTO runs (id, name, recipe, recipe_sha256, status, started, run_dir, environment)"
                 " VALUES ('old', 'n', 'r', 'h', 'running', '2024', NULL, '{}')")
    conn.execute("INSERT INTO stages VALUES ('old', 'teacher', 'train', 0, 'running', NULL, '2024', NULL, '{}')")
    conn.execute("INSERT INTO metrics VALUES ('old', 'teacher', 1, 'loss', 0.5)")
    conn.close()


def test_migration_to_interrupted_keeps_rows_and_cascades(tmp_path):
    path = tmp_path / "runs.db"
    _v1_store(path)
    with RunStore(path) as s:
        assert s.schema_version == SCHEMA_VERSION >= 2
        assert s.get_run("old")["stages"][0]["name"] == "teacher"
        assert s.stage_metrics("old", "teacher") == {"loss": [(1, 0.5)]}
        s.finish_run("old", "interrupted", "stopped by SIGTERM")
        run = s.get_run("old")
        assert run["status"] == "interrupted" and run["stages"][0]["status"] == "interrupted"
        assert s._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert s._conn.execute("PRAGMA foreign_key_check").fetchall() == []
        s._conn.execute("DELETE FROM runs WHERE id = 'old'")  # the foreign keys still point at the rebuilt table
        assert s._conn.execute("SELECT COUNT(*) FROM stages").fetchone()[0] == 0
        assert s._conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 0


def test_failed_run_closes_its_running_stage(store, tmp_path):
    rid = store.start_run("r", "", tmp_path, seed=0)
    store.start_stage(rid, "a", "train", 0)
    store.finish_stage(rid, "a")
    store.start_stage(rid, "b", "train", 1)
    store.finish_run(rid, "failed", "boom")
    assert [(s["name"], s["status"], s["error"]) for s in store.list_stages(rid)] == [
        ("a", "done", None), ("b", "failed", "boom")]


def test_runs_whose_process_is_gone_are_marked_interrupted(tmp_path):
    from attar.lifecycle import run_lock

    home = tmp_path / "home"
    with RunStore(home / "runs.db") as s:
        live, gone, moved = (s.start_run(n, "", None, seed=0) for n in ("live", "gone", "moved"))
        for rid in (live, gone, moved):
            (home / rid).mkdir()
            s.set_run_dir(rid, f"runs/{rid}")  # relative to the cwd of the process that ran it, not ours
        done = s.start_run("done", "", home / "x", seed=0)
        s.finish_run(done, "done")
        s.start_stage(gone, "teacher", "train", 0)
        with run_lock(home / live):
            (home / gone / "run.lock").write_text('{"pid": 1}')  # left behind by a process that died
            assert sorted(s.mark_gone_runs()) == sorted([gone, moved])
            assert s.mark_gone_runs() == []
        status = {r["id"]: r["status"] for r in s.list_runs()}
        assert status == {live: "running", gone: "interrupted", moved: "interrupted", done: "done"}
        run = s.get_run(gone)
        assert run["stages"][0]["status"] == "interrupted"
        assert "attar run --resume" in run["error"] and str(home / gone) in run["error"]
        s.resume_run(gone)  # a resume makes it running again, under its own lock
        with run_lock(home / gone):
            assert s.mark_gone_runs() == [live]  # live's lock was released above without finishing the run


def test_resume_with_another_home_says_so(store):
    with pytest.raises(AttarError, match="--home"):
        store.resume_run("20240101-0000-abcd")


def test_full_disk_is_one_paragraph_naming_the_store(store, tmp_path):
    from attar.lifecycle import DiskFullError

    rid = store.start_run("r", "", tmp_path, seed=0)
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages + 1}")  # SQLite's own SQLITE_FULL, as on a full disk
    with pytest.raises(DiskFullError) as e:
        for step in range(2000):
            store.log_metrics(rid, "s", step, {f"k{i}": 1.0 for i in range(20)})
    assert f"while writing {store.path}" in str(e.value) and "No space left" in str(e.value)
    assert store.get_run(rid)["status"] == "running"  # the store still works for reads


@pytest.mark.parametrize("content", [b"\x00\x01garbage" * 500, b"SQLite format 3\x00" + b"\xff" * 200,
                                     "meeting notes\n".encode() * 100])
def test_damaged_store_is_reported_with_the_way_out(tmp_path, content):
    path = tmp_path / "runs.db"
    path.write_bytes(content)
    with pytest.raises(AttarError) as e:
        with RunStore(path) as s:
            s.list_runs()
    msg = str(e.value)
    assert str(path) in msg and "Move it aside" in msg and "stay intact" in msg and "\n" not in msg


def test_home_that_is_a_file(tmp_path):
    from attar.store import check_home

    f = tmp_path / "f"
    f.write_text("x")
    for home in (f, f / "sub" / "deeper"):
        with pytest.raises(AttarError, match=f"{f} is a file, not a folder"):
            RunStore(home=home)
        with pytest.raises(AttarError, match="is a file"):
            check_home(home)
    assert check_home(tmp_path / "new" / "home") == tmp_path / "new" / "home"
