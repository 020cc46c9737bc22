"""Cohorts (`engine/cohort.py`, `meddinov3 segment FOLDER -o FOLDER`): sharding by size, skipping finished cases,
the CSV, and real 2-process torchrun runs on the CPU (gloo), including a resume after a rank was killed mid-write."""

import csv
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3.cli.main import main
from meddinov3.engine.cohort import (CohortCase, cohort_cases, input_size, remove_partial_outputs, run_cohort,
                                     segment_cohort, shard_by_size)
from meddinov3.phantom import make_phantom_ct
from meddinov3.volumes import same_geometry
from Testing.helpers import make_package, write_dicom_series

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
SLICES = (3, 9, 4, 7, 5, 3)  # uneven scans: 6 cases, 31 slices of 40 x 40


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("model") / "pkg", spacing=(3.0, 3.0), seed=3)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort") / "scans"
    folder.mkdir()
    for k, z in enumerate(SLICES):
        sitk.WriteImage(make_phantom_ct((z, 40, 40), (3.0, 3.0, 5.0), seed=k)[0], str(folder / f"case{k}.nii.gz"))
    return folder


def read_csv(path: Path) -> dict:
    with open(path, newline="") as f:
        return {Path(r["input"]).name: r for r in csv.DictReader(f)}


def loads(shards, sizes):
    return [sum(sizes[i] for i in s) for s in shards]


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_shard_by_size_every_input_once_balanced(world):
    rng = random.Random(world)
    sizes = [int(rng.lognormvariate(17, 1)) for _ in range(41)]  # voxel counts of very uneven scans
    shards = shard_by_size(sizes, world)
    assert len(shards) == world
    assert sorted(i for s in shards for i in s) == list(range(41))  # each input exactly once
    best = max(sum(sizes) / world, max(sizes))  # no plan does better than this
    assert max(loads(shards, sizes)) <= 4 / 3 * best  # LPT's guarantee
    assert shard_by_size(sizes, world) == shards  # every rank computes the same plan


def test_shard_by_size_balances_work_not_counts():
    sizes = [90] + [10] * 9  # one big scan and nine small ones
    shards = shard_by_size(sizes, 2)
    assert loads(shards, sizes) == [90, 90]
    assert sorted(len(s) for s in shards) == [1, 9]  # by count it would be 5 + 5 (130 vs 50)
    assert shard_by_size([5, 5], 4) == [[0], [1], [], []]  # more ranks than cases: some idle


def test_input_size_from_header_without_reading_voxels(tmp_path):
    image = make_phantom_ct((5, 7, 9), (1.0, 1.0, 1.0))[0]
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    assert input_size(tmp_path / "a.nii.gz") == 5 * 7 * 9
    dicom = write_dicom_series(image, tmp_path / "series")
    assert input_size(dicom) == sum(f.stat().st_size for f in dicom.iterdir()) // 2
    (tmp_path / "bad.nrrd").write_bytes(b"x" * 300)
    assert input_size(tmp_path / "bad.nrrd") == 300  # unreadable: its bytes (its case fails on its own)
    assert input_size(tmp_path / "missing.nii.gz") == 0


def test_remove_partial_outputs_only_the_cases_own(tmp_path):
    case = CohortCase(tmp_path / "in.nii.gz", tmp_path / "ct.nii.gz", (tmp_path / "p" / "ct.npz",))
    (tmp_path / "p").mkdir()
    stale = [tmp_path / ".ct-ab_cd123.nii.gz", tmp_path / "p" / ".ct-zz9yx8w7.npz"]
    kept = [tmp_path / ".ct-ab_cd123.v2.nii.gz", tmp_path / ".ct2-ab_cd123.nii.gz", tmp_path / "ct.nii.gz",
            tmp_path / ".ct-short.nii.gz"]
    for f in stale + kept:
        f.write_bytes(b"x")
    assert sorted(remove_partial_outputs(case)) == sorted(stale)
    assert all(f.exists() for f in kept) and not any(f.exists() for f in stale)


def test_folder_rerun_skips_finished_cases_and_writes_csv(tmp_path, scans, pkg, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("case0.nii.gz", "case2.nii.gz", "case5.nii.gz"):
        (inp / name).symlink_to(scans / name)
    out = tmp_path / "out"
    assert main(["segment", str(inp), "-o", str(out), "--model", str(pkg), "--device", "cpu"]) == 0
    rows = read_csv(out / "cohort.csv")
    assert {n: r["status"] for n, r in rows.items()} == dict.fromkeys(["case0.nii.gz", "case2.nii.gz",
                                                                       "case5.nii.gz"], "done")
    assert rows["case2.nii.gz"]["slices"] == "4" and float(rows["case2.nii.gz"]["seconds"]) > 0
    assert same_geometry(sitk.ReadImage(str(out / "case2.nii.gz")), sitk.ReadImage(str(scans / "case2.nii.gz")))

    # a preempted rerun: case5 never finished (its writer was killed: a temporary file is left), the others did
    (out / "case5.nii.gz").unlink()
    (out / ".case5-k1ll3d_0.nii.gz").write_bytes(b"half")
    before = {n: (out / n).stat().st_mtime_ns for n in ("case0.nii.gz", "case2.nii.gz")}
    (inp / "broken.nii.gz").write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["segment", str(inp), "-o", str(out), "--model", str(pkg), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "broken.nii.gz: unreadable" in err and "1 segmented, 2 skipped (already done), 1 failed" in err
    rows = read_csv(out / "cohort.csv")
    assert {n: r["status"] for n, r in rows.items()} == {"broken.nii.gz": "failed", "case0.nii.gz": "skipped",
                                                         "case2.nii.gz": "skipped", "case5.nii.gz": "done"}
    assert "unreadable" in rows["broken.nii.gz"]["message"]
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before  # finished outputs untouched
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "case2.nii.gz", "case5.nii.gz", "cohort.csv"]

    (inp / "broken.nii.gz").unlink()
    assert main(["segment", str(inp), "-o", str(out), "--model", str(pkg), "--device", "cpu", "--overwrite"]) == 0
    assert {r["status"] for r in read_csv(out / "cohort.csv").values()} == {"done"}
    assert all((out / n).stat().st_mtime_ns != t for n, t in before.items())  # --overwrite redoes every case


def test_python_api_resume_and_probabilities(tmp_path, scans, pkg):
    from meddinov3.checkpoints import load_model

    model = load_model(pkg, device="cpu")
    inputs = [scans / "case0.nii.gz", scans / "case3.nii.gz"]
    report = segment_cohort(inputs, tmp_path / "out", model, device="cpu", probabilities_folder=tmp_path / "p")
    assert [r["status"] for r in report.rows] == ["done", "done"] and report.csv == tmp_path / "out" / "cohort.csv"
    assert np.load(tmp_path / "p" / "case3.npz")["probabilities"].shape[1:] == (7, 40, 40)
    (tmp_path / "p" / "case3.npz").unlink()  # not finished any more: its label map exists, so it cannot be redone
    report = segment_cohort(inputs, tmp_path / "out", model, device="cpu", probabilities_folder=tmp_path / "p")
    assert [r["status"] for r in report.rows] == ["skipped", "failed"]
    assert "already exists (pass --overwrite" in report.rows[1]["message"]
    with pytest.raises(ValueError, match="is the input"):  # an output that is its own input is never "finished"
        segment_cohort([scans / "case0.nii.gz"], scans, model, device="cpu")
    with pytest.raises(ValueError, match="same output name"):
        cohort_cases([tmp_path / "a.nii.gz", tmp_path / "x" / "a.nrrd"], tmp_path)


def test_run_cohort_stops_on_errors_that_are_not_the_scans(tmp_path):
    cases = cohort_cases([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], tmp_path / "out")

    def missing(case):
        raise FileNotFoundError(case.input)  # not a bad scan: the run stops

    with pytest.raises(FileNotFoundError):
        run_cohort(cases, missing, interval=0.05)
    counters = [t for t in threading.enumerate() if t.name == "meddinov3-cohort-progress"]
    for t in counters:
        t.join(timeout=2)
    assert not any(t.is_alive() for t in counters)  # no progress thread left behind


def _torchrun(*args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]


def test_two_ranks_resume_after_a_rank_was_killed(tmp_path, scans, pkg):
    out = tmp_path / "out"
    killed = subprocess.run(_torchrun("Testing/engine/cohort_worker.py", scans, out, pkg), cwd=REPO, env=ENV,
                            capture_output=True, text=True, errors="replace", timeout=300)
    assert killed.returncode != 0, killed.stderr[-3000:]
    partial = [p for p in out.iterdir() if p.name.startswith(".")]
    assert partial, "the killed rank left no temporary file"
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("case*.nii.gz")}
    assert 1 <= len(finished) < len(SLICES)

    # the README's cohort command: `torchrun ... -m meddinov3.cli.main segment ...`
    r = subprocess.run(_torchrun("-m", "meddinov3.cli.main", "segment", scans, "-o", out, "--model", pkg,
                                 "--device", "cpu", "--json-progress"),
                       cwd=REPO, env=ENV, capture_output=True, text=True, errors="replace", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_csv(out / "cohort.csv")
    assert len(rows) == len(SLICES)
    for k, z in enumerate(SLICES):
        name = f"case{k}.nii.gz"
        assert rows[name]["status"] == ("skipped" if name in finished else "done")
        assert same_geometry(sitk.ReadImage(str(out / name)), sitk.ReadImage(str(scans / name)))
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # finished cases not redone
    assert not any(p.exists() for p in partial)  # the killed writer's temporary file is gone
    redone = [r for r in rows.values() if r["status"] == "done"]
    if len(redone) > 1:  # shared out: both ranks segmented
        assert {r["rank"] for r in redone} == {"0", "1"}
    events = [__import__("json").loads(line) for line in r.stdout.splitlines()]  # rank 0 only: one stream
    cohort = [e for e in events if e["event"] == "progress" and e["stage"] == "cohort"]
    assert cohort[-1]["done"] == cohort[-1]["total"] == len(SLICES) and cohort[-1]["skipped"] == len(finished)
    assert events[-1]["event"] == "done" and events[-1]["skipped"] == len(finished)
    assert sum(e["event"] == "started" for e in events) == 1


def test_torchrun_needs_a_folder_of_inputs(tmp_path, scans, pkg, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; refused before joining the job
    monkeypatch.setenv("RANK", "0")
    assert main(["segment", str(scans / "case0.nii.gz"), "-o", str(tmp_path / "x.nii.gz"), "--model", str(pkg),
                 "--device", "cpu"]) == 2
    assert "give a folder of scans" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_cpu_processes_share_the_cores_in_fast_mode(scans, pkg, monkeypatch):
    """`--fast` on the CPU used every core in each process: under torchrun, N processes on a machine took N x the
    cores. Each now takes cores / LOCAL_WORLD_SIZE."""
    import torch

    from meddinov3.engine import segment_image
    from meddinov3.engine.pipeline import cpu_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # one process per core, as torchrun reports it
    assert cpu_threads() == 1
    threads = torch.get_num_threads()
    try:
        segment_image(sitk.ReadImage(str(scans / "case0.nii.gz")), str(pkg), device="cpu", fast=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert cpu_threads() == cores
