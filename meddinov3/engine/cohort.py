"""Cohorts: many scans segmented by one process, or shared out over every rank of a torchrun job (GPUs, nodes).

`segment_cohort(inputs, output_folder, model)` is the Python API; `meddinov3 segment FOLDER -o OUT_FOLDER` (alone or
under torchrun) runs the same `run_cohort`. How it works:

- Planning (`plan_cohort`, every rank calls it; rank 0's list of cases is the one used): a case whose outputs all
  exist is finished and skipped unless `overwrite`; the rest is shared out by size (voxels from the image header) with
  greedy longest-processing-time, so the ranks finish together however uneven the scans are.
- No shared file system is assumed. Every rank looks for finished outputs in its own view of the output folder and
  the findings are combined (a case finished on any node is finished); progress counts travel by gloo all-reduce on
  a process group of their own, so no rank ever waits for another's case; rank 0 gathers the per-case rows and
  writes the CSV. With a shared output folder everything lands in it; without one, each node's folder holds the
  cases its ranks did, and rank 0's holds the CSV.
- Outputs are written atomically (`segment_file`); before a case is redone, the temporary files a killed process
  left for its outputs are removed, so a preempted job resumes by running the same command again.
"""

from __future__ import annotations

import csv
import datetime
import heapq
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import SimpleITK as sitk
import torch
import torch.distributed as dist

from ..files import atomic_path
from .. import distributed as D
from ..volumes import InputError, itk_warnings_off, strip_suffix

CSV_NAME = "cohort.csv"
CSV_FIELDS = ("input", "output", "status", "rank", "host", "seconds", "voxels", "slices", "device", "message")
CASE_ERRORS = (InputError, FileExistsError)  # a bad scan fails its own case; anything else stops the run


@dataclass(frozen=True)
class CohortCase:
    """One scan and the files segmenting it writes (all of them existing = finished): the label map `output` and
    `extras` beside it (probabilities, statistics, ...)."""

    input: Path
    output: Path
    extras: tuple[Path, ...] = ()

    @property
    def outputs(self) -> list[Path]:
        return [self.output, *self.extras]


@dataclass
class CohortReport:
    """`rows`: one dict per case (CSV_FIELDS), in the cases' order (every rank gets all of them); `csv`: the file
    rank 0 wrote (None elsewhere)."""

    rows: list[dict] = field(default_factory=list)
    csv: Path | None = None

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)


def cohort_cases(inputs: Sequence[str | os.PathLike], output_folder: str | os.PathLike, suffix: str = "nii.gz",
                 extra_folders: Sequence[tuple[str | os.PathLike, str]] = ()) -> list[CohortCase]:
    """Output names in folders: `output_folder`/NAME.<suffix>, and FOLDER/NAME.<ext> for each (FOLDER, ext) of
    `extra_folders` (e.g. (probabilities folder, "npz")), for an input NAME.<image suffix> or a folder NAME.

    ValueError when two inputs would write the same name.
    """
    stems = [strip_suffix(p) for p in inputs]
    dupes = sorted({n for n in stems if stems.count(n) > 1})
    if dupes:
        raise ValueError(f"inputs would write the same output name(s): {', '.join(dupes)}")
    return [CohortCase(Path(p), Path(output_folder) / f"{n}.{suffix}",
                       tuple(Path(folder) / f"{n}.{ext}" for folder, ext in extra_folders))
            for p, n in zip(inputs, stems)]


def input_size(path: str | os.PathLike) -> int:
    """Work estimate of one input: voxels from an image file's header (no voxels read); a DICOM folder's bytes / 2
    (about 2 bytes a voxel); an unreadable file's bytes (its case fails quickly anyway); 0 when missing."""
    path = Path(path)
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) // 2
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            with itk_warnings_off():
                reader.ReadImageInformation()
        except RuntimeError:
            return path.stat().st_size
        size = 1
        for n in reader.GetSize():
            size *= n
        return size
    except OSError:
        return 0


def shard_by_size(sizes: Sequence[int], world: int) -> list[list[int]]:
    """Greedy longest-processing-time: indices of `sizes`, largest first, each to the rank with the least work so
    far (ties: the lower rank). Every index goes to exactly one of the `world` lists, each in that order; the largest
    load is at most 4/3 of the best possible. Deterministic, so every rank computes the same plan."""
    shards: list[list[int]] = [[] for _ in range(world)]
    loads = [(0, r) for r in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        shards[rank].append(i)
        heapq.heappush(loads, (load + sizes[i], rank))
    return shards


def is_finished(case: CohortCase) -> bool:
    """All the case's outputs exist: as they are written atomically, an existing one is complete."""
    return all(p.exists() for p in case.outputs)


def remove_partial_outputs(case: CohortCase) -> list[Path]:
    """Remove the temporary files a killed writer left for the case's outputs (`files.atomic_path` names them
    `.<name up to its first dot>-<8 random characters><suffixes>` beside the output); returns them."""
    removed = []
    for out in case.outputs:
        if not out.parent.is_dir():
            continue
        # the suffix in any case: label maps' temporary files have it in lower case (for ITK)
        pattern = re.compile(re.escape(f".{out.name.split('.')[0]}-") + r"[a-z0-9_]{8}(?i:"
                             + re.escape("".join(out.suffixes)) + ")$")
        for tmp in out.parent.iterdir():
            if pattern.match(tmp.name) and tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def join_cohort(device: str = "auto") -> tuple[D.DistInfo, torch.device]:
    """Join the torchrun job when there is one (its own GPU per rank: cuda:LOCAL_RANK) and pick the device.

    CPU ranks on one machine share its cores: each uses cores / LOCAL_WORLD_SIZE threads (`pipeline.cpu_threads`;
    torchrun's default of one thread per rank would leave cores idle). Raises `D.DeviceError` for a device that does
    not exist here.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # one process: the engine's choice ("auto" may be MPS)
        from .pipeline import resolve_device

        try:
            return D.DistInfo(), resolve_device(device)
        except (ValueError, RuntimeError, TypeError) as e:
            raise D.DeviceError(str(e)) from None
    from .pipeline import cpu_threads

    info, dev = D.init(device)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads())
    return info, dev


def plan_cohort(cases: list[CohortCase], info: D.DistInfo, overwrite: bool = False
                ) -> tuple[list[CohortCase], list[int], list[int], list[int]]:
    """(the cases (rank 0's), indices this rank segments, indices skipped as finished, size of every case).

    A collective: every rank calls it. Each rank checks every case's outputs and sizes its share of the unfinished
    ones; the results are combined, so the work scales with the ranks and no file system needs to be shared.
    """
    cases = D.broadcast_object(cases, info)
    seen = [i for i, c in enumerate(cases) if not overwrite and is_finished(c)]
    skipped = sorted(set().union(*D.all_gather_object(seen, info)))
    done = set(skipped)
    todo = [i for i in range(len(cases)) if i not in done]
    mine = {i: input_size(cases[i].input) for i in todo[info.rank::info.world_size]}
    sizes = [0] * len(cases)
    for part in D.all_gather_object(mine, info):
        for i, n in part.items():
            sizes[i] = n
    shards = shard_by_size([sizes[i] for i in todo], info.world_size)
    return cases, [todo[j] for j in shards[info.rank]], skipped, sizes


class _Counter(threading.Thread):
    """Cohort progress: every `interval` s this rank's counts (done, failed, voxels, finished) are summed over all
    ranks by a gloo all-reduce on a group of their own (works between nodes; the main threads never wait for it),
    and rank 0 reports the sums as one progress line (or JSON progress events)."""

    def __init__(self, info: D.DistInfo, total: int, skipped: int, voxels_left: int, report: Callable[[list], None],
                 interval: float = 2.0):
        super().__init__(daemon=True, name="meddinov3-cohort-progress")
        self.info, self.report, self.interval = info, report, interval
        self.total, self.skipped, self.voxels_left = total, skipped, voxels_left
        self.mine = [0, 0, 0, 0]  # done, failed, voxels processed, finished (0/1)
        self.wake = threading.Event()
        self.abandoned = False
        # a collective: every rank creates it, in the same order; long timeout: ranks only wait for each other's
        # counter threads (a dead rank ends the job through torchrun)
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7)) if info.enabled else None
        self.started = time.monotonic()

    def add(self, done: int, failed: int, voxels: int) -> None:
        self.mine[0] += done
        self.mine[1] += failed
        self.mine[2] += voxels
        self.wake.set()

    def finish(self) -> None:
        self.mine[3] = 1
        self.wake.set()
        self.join()

    def abandon(self) -> None:
        """Stop without waiting for the other ranks (this one is failing; torchrun ends the job)."""
        self.abandoned = True
        self.wake.set()

    def run(self) -> None:
        last = None
        while not self.abandoned:
            sums = torch.tensor(self.mine, dtype=torch.int64)
            if self.group is not None:
                dist.all_reduce(sums, group=self.group)
            done, failed, voxels, finished = sums.tolist()
            if self.info.is_main and (done, failed) != last:
                last = (done, failed)
                elapsed = time.monotonic() - self.started
                eta = elapsed * (self.voxels_left - voxels) / voxels if voxels else None
                self.report([self.skipped + done + failed, self.total, self.skipped, failed, elapsed, eta])
            if finished == self.info.world_size:
                return
            self.wake.wait(self.interval)
            self.wake.clear()


def run_cohort(cases: Sequence[CohortCase], segment_case: Callable[[CohortCase], dict | None],
               info: D.DistInfo | None = None, overwrite: bool = False, csv_path: str | os.PathLike | None = None,
               progress=None, interval: float = 2.0) -> CohortReport:
    """Segment this rank's share of `cases`; a collective under torchrun (every rank calls it, same arguments).

    `segment_case(case)`: segments one case and writes its outputs (atomically), returning a dict that may give
    "seconds", "slices", "device", "batch_size" (the engine's `SegmentationResult.stats`); one of CASE_ERRORS fails
    that case only (reported, the others go on), any other exception stops the run (torchrun then ends every rank;
    a rerun resumes). `info`: this process's rank and world (default: one process). `csv_path`: rank 0 writes one
    row per case there (CSV_FIELDS; status done, skipped or failed), replacing the last run's. `progress`: a
    `meddinov3.progress.Progress` (None: silent): rank 0 reports the whole cohort as JSON progress events, or else
    one line on stderr per change.
    """
    info = info or D.DistInfo()
    cases, mine, skipped, sizes = plan_cohort(list(cases), info, overwrite)
    todo = set(range(len(cases))) - set(skipped)
    lock = threading.Lock()

    def report(values: list) -> None:
        processed, total, n_skipped, failed, elapsed, eta = values
        if progress is None:
            return
        with lock:
            if progress.json_lines:
                progress.event("progress", stage="cohort", done=processed, total=total, skipped=n_skipped,
                               failed=failed, fraction=processed / total if total else 1.0,
                               eta_s=None if eta is None else round(eta, 1), processes=info.world_size)
            else:
                left = "" if eta is None or processed == total else f", about {eta:.0f} s left"
                print(f"cohort: {processed}/{total} cases ({n_skipped} skipped, {failed} failed) on "
                      f"{info.world_size} process(es), {elapsed:.0f} s{left}", file=sys.stderr, flush=True)

    counter = _Counter(info, len(cases), len(skipped), sum(sizes[i] for i in todo), report, interval)
    counter.start()
    rows = {i: _row(cases[i], "skipped") for i in skipped} if info.is_main else {}
    try:
        for i in mine:
            rows[i] = row = _segment_one(cases[i], segment_case, info, sizes[i], lock, progress)
            counter.add(row["status"] == "done", row["status"] == "failed", sizes[i])
    except BaseException:
        counter.abandon()
        raise
    counter.finish()
    gathered: dict = {}
    for part in D.all_gather_object(rows, info):
        gathered.update(part)
    report_rows = [gathered[i] for i in sorted(gathered)]
    if info.is_main and csv_path is not None:
        _write_csv(Path(csv_path), report_rows)
    return CohortReport(report_rows, Path(csv_path) if csv_path is not None and info.is_main else None)


def _row(case: CohortCase, status: str, **fields) -> dict:
    return {**dict.fromkeys(CSV_FIELDS, ""), "input": str(case.input), "output": str(case.output), "status": status,
            **fields}


def _segment_one(case: CohortCase, segment_case, info: D.DistInfo, voxels: int, lock, progress) -> dict:
    """Redo one case from scratch (a killed run's temporary files removed first); its CSV row."""
    remove_partial_outputs(case)
    t0 = time.perf_counter()
    where = {"rank": info.rank, "host": socket.gethostname(), "voxels": voxels}
    try:
        stats = segment_case(case) or {}
    except CASE_ERRORS as e:
        prefix = f"[rank {info.rank}] " if info.enabled else ""
        print(f"{prefix}meddinov3 segment: error: {e}", file=sys.stderr, flush=True)
        if progress is not None and not info.enabled:
            with lock:
                progress.event("failed", input=str(case.input), message=str(e))
        return _row(case, "failed", seconds=round(time.perf_counter() - t0, 2), message=str(e), **where)
    seconds = round(time.perf_counter() - t0, 2)
    if progress is not None and not info.enabled:  # one process: every case's event (as for one input)
        with lock:
            progress.event("finished", input=str(case.input), output=str(case.output), seconds=seconds,
                           extras=[str(p) for p in case.extras],
                           **{k: stats[k] for k in ("device", "slices", "batch_size", "dicom_seg_omitted",
                                                     "slice_confidence") if k in stats})
    return _row(case, "done", seconds=seconds, slices=stats.get("slices", ""), device=stats.get("device", ""),
                **where)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)


def segment_cohort(inputs: Sequence[str | os.PathLike], output_folder: str | os.PathLike, model,
                   options: SegmentOptions | None = None, *, output_format: str = "nii.gz",
                   probabilities_folder: str | os.PathLike | None = None, overwrite: bool = False,
                   csv_path: str | os.PathLike | None = None, progress=None, info: D.DistInfo | None = None,
                   **option_fields) -> CohortReport:
    """Segment a cohort into `output_folder` (NAME.<output_format>, NAME.npz in `probabilities_folder`), by this
    process alone or, under torchrun, shared out over every rank (each calls it with the same arguments).

    `inputs`: image files, DICOM series folders and folders of them (as `meddinov3 segment` takes them). `model`: a
    reference (path, hf:, name) or a `LoadedModel` (on this rank's device). `info`: rank and world; default: join
    the torchrun job from its environment (`join_cohort`: cuda:LOCAL_RANK per rank), else one process.
    Finished cases (all outputs present) are skipped unless `overwrite`. `csv_path`: default
    `output_folder/cohort.csv`. `options` / `option_fields`: as `segment_image`'s (device, folds, fast, tta,
    batch_size, roi, postprocess, ...). Returns the CohortReport (a row per case; the CSV's).
    Raises InputError / ValueError for unusable inputs or names before any work.
    """
    from ..checkpoints import load_model
    from ..options import SegmentOptions
    from ..volumes import list_inputs
    from .outputs import check_not_input, input_files
    from .pipeline import resolve_device, segment_file

    options = SegmentOptions.merged(options, **option_fields)
    created = info is None and not dist.is_initialized()
    if info is None:
        try:
            info, dev = join_cohort(options.device)
        except D.DeviceError as e:
            raise ValueError(str(e)) from None
    else:
        dev = resolve_device(options.device)
    cases = cohort_cases(list_inputs(inputs), output_folder, output_format,
                         [(probabilities_folder, "npz")] if probabilities_folder else [])
    sources = input_files([c.input for c in cases]) if any(c.output.exists() for c in cases) else []
    for case in cases:
        check_not_input(case.output, sources)  # an output that is its input is never "finished"
    loaded = load_model(model, device=dev, folds=options.folds)
    options = options.replace(device=str(dev))

    def segment_case(case: CohortCase) -> dict:
        return segment_file(case.input, case.output, loaded, options, overwrite=overwrite,
                            probabilities_path=case.extras[0] if case.extras else None).stats

    report = run_cohort(cases, segment_case, info, overwrite,
                        Path(output_folder) / CSV_NAME if csv_path is None else csv_path, progress)
    if created:
        D.cleanup(info)
    return report
