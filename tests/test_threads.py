"""Thread selection: --threads, then OMP_NUM_THREADS, then one core left free on small machines."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from attar.errors import AttarError
from attar.threads import SMALL, apply_threads, choose_threads, usable_cores


@pytest.mark.parametrize("cores, want", [(1, 1), (2, 1), (3, 2), (4, 3), (SMALL + 1, None), (64, None)])
def test_small_machines_leave_a_core_free_large_ones_keep_torch_default(cores, want):
    n, why = choose_threads(None, env={}, cores=cores)
    assert n == want and str(cores) in why


def test_omp_num_threads_is_honoured_and_explicit_wins():
    assert choose_threads(None, env={"OMP_NUM_THREADS": "3"}, cores=2) == (3, "OMP_NUM_THREADS")
    assert choose_threads(None, env={"OMP_NUM_THREADS": "4,2"}, cores=64)[0] == 4  # nested list: the outer pool
    assert choose_threads(None, env={"OMP_NUM_THREADS": " "}, cores=2)[0] == 1  # blank: as if unset
    assert choose_threads(2, env={"OMP_NUM_THREADS": "3"}, cores=64) == (2, "--threads")


@pytest.mark.parametrize("explicit, env, word", [(0, {}, "--threads 0"), (-1, {}, "--threads -1"),
                                                (None, {"OMP_NUM_THREADS": "lots"}, "OMP_NUM_THREADS"),
                                                (None, {"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS")])
def test_bad_thread_counts_are_refused_by_name(explicit, env, word):
    with pytest.raises(AttarError, match=word):
        choose_threads(explicit, env=env, cores=2)


def test_usable_cores_is_the_affinity_at_most():
    n = usable_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert n <= len(os.sched_getaffinity(0))


def test_apply_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert apply_threads() == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("args, env, word", [(["--threads", "0"], {}, "--threads 0"),
                                              ([], {"OMP_NUM_THREADS": "lots"}, "OMP_NUM_THREADS")])
def test_cli_refuses_bad_thread_counts_before_any_work(tmp_path, args, env, word):
    from attar.cli import app

    before = torch.get_num_threads()
    (tmp_path / "r.yaml").write_text("name: x\nstages: []\n")
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "--home", str(tmp_path / "home"), *args], env=env)
    torch.set_num_threads(before)
    assert res.exit_code == 2 and word in res.output and "Traceback" not in res.output
    assert not (tmp_path / "home").exists()
