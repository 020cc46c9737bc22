"""MedDINOv3TrainLogic: scene -> dataset export, detached training jobs, jobs on disk, chart nodes. No widgets.

From Slicer's Python console::

    logic = MedDINOv3TrainLogic()
    print(logic.classPreview([(ct1, seg1), (ct2, seg2)]))
    folder = logic.exportDataset([(ct1, seg1), (ct2, seg2)], "/data/liver_dataset")
    job = logic.startJob("finetune", folder, "/runs/liver", size="small", options={"steps": 2000})
    job.status()       # {"state": "running", "step": 120, "total": 2000, "eta_s": 900, "metrics": {...}}
    job.stop(); job.resume(); job.wait()
    logic.jobs()       # every job on disk (a new Slicer session reattaches)
    logic.updatePlotNodes(job)   # loss / Dice chart node

A finished fine-tune job's model package is registered, so the Segment module lists it as "trained".
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from meddinov3.files import write_json

from . import export
from .jobs import _CHILDREN, MODES, TrainJob, TrainJobError, findJobs, jobsRoot, remember, resumeCommand

#: Option keys given to the CLI as arguments; every other key goes to the --config JSON file.
CLI_OPTIONS = ("stage", "steps", "epochs", "device")


try:
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic as _LogicBase
except ImportError:  # plain Python (no Slicer): the Logic still exports nothing but runs jobs
    _LogicBase = object


class MedDINOv3TrainLogic(_LogicBase):
    """Export training data from the scene, run training jobs in detached processes, follow and chart them."""

    def __init__(self, parent=None):
        if _LogicBase is not object:
            _LogicBase.__init__(self, parent)
        #: Override the child's Python (tests, custom installs); None = PythonSlicer in Slicer, else sys.executable.
        self.pythonExecutable: str | None = None
        #: Extra environment variables for the child (e.g. OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES).
        self.childEnvironment: dict = {}
        self._jobs: dict[str, TrainJob] = {}
        self._plotNodes: dict[str, dict] = {}
        self._plottedRecords: dict[str, int] = {}  # metrics records each job's plot tables were built from

    def getParameterNode(self):
        """The scene's Train parameter node, wrapped (`MedDINOv3TrainParameterNode`: typed fields, saved with the
        scene). A new wrapper each call, over the same MRML node."""
        from .parameters import MedDINOv3TrainParameterNode

        return MedDINOv3TrainParameterNode(super().getParameterNode())

    # -- data -------------------------------------------------------------------------------------

    def classPreview(self, pairs) -> dict:
        """What an export of `pairs` would train on, shown before anything is written (see `export.classPreview`).

        Args:
            pairs: [(vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode), ...], one per case.

        Returns:
            {"classes": {name: [case, ...]}, "labels": {name: label value}, "cases": [case, ...],
            "warnings": [message, ...]} (a class missing from a case is trained as background there).
        """
        return export.classPreview(pairs)

    def exportDataset(self, pairs, outputFolder, modality: str = "CT") -> str:
        """Write (volume, segmentation) node pairs as an nnU-Net v2 raw dataset: what `meddinov3 train --data` reads.

        Args:
            pairs: [(volume node, segmentation node), ...]; classes are matched across cases by segment name or
                terminology (see `export`).
            outputFolder: the dataset folder; written beside it and moved into place (atomic), replacing only an
                earlier export.
            modality: the channel name written to dataset.json ("CT", "MR"), which training reads as the images'
                modality.

        Returns:
            The absolute dataset folder (imagesTr/, labelsTr/, dataset.json).
        """
        return export.exportDataset(pairs, outputFolder, modality=modality)

    # -- jobs -------------------------------------------------------------------------------------

    def _python(self) -> str:
        """The training process's Python: the Segment module's worker finds PythonSlicer inside Slicer; without the
        Segment module (plain Python) the core's helper runs the interpreter that runs this."""
        try:
            from MedDINOv3SegmentLib.worker import python_executable
        except ImportError:  # the Segment module is not on sys.path (plain Python use)
            from meddinov3.processes import python_executable
        return self.pythonExecutable or python_executable()

    def _environment(self) -> dict:
        from meddinov3.processes import child_environment

        return {**child_environment(), **{k: str(v) for k, v in self.childEnvironment.items()}}

    def _track(self, job: TrainJob) -> TrainJob:
        known = self._jobs.get(str(job.runDir))
        if known is not None:
            return known
        job.onFinished = self._onFinished
        self._jobs[str(job.runDir)] = job
        return job

    def job(self, runDir) -> TrainJob:
        """The job of run folder `runDir` (one object per folder: a running job is followed, not restarted).

        Raises TrainJobError when the folder holds no job.json (not started by this module)."""
        job = TrainJob(runDir)
        if not job.jobFile.is_file():
            raise TrainJobError(f"{runDir} is not a MedDINOv3 job folder (no job.json).")
        return self._track(job)

    @staticmethod
    def _runFolder(mode: str, outputFolder) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if not outputFolder:
            folder = jobsRoot() / f"{mode}-{stamp}"
        else:
            folder = Path(outputFolder).expanduser().resolve()
            if (folder / "job.json").exists() or (folder / "config.json").exists():
                raise TrainJobError(f"{folder} already holds a training job: resume it, or choose another folder.")
            if folder.is_dir() and any(folder.iterdir()):
                folder = folder / f"{mode}-{stamp}"  # a parent folder of runs: one sub-folder per job
        n = 2
        base = folder
        while folder.exists() and any(folder.iterdir()):
            folder, n = base.with_name(f"{base.name}-{n}"), n + 1
        return folder

    def buildCommand(self, mode: str, data, runDir, base=None, size: str | None = "base", options=None,
                     configPath=None) -> list[str]:
        """The child's command line: `PYTHON -m meddinov3.cli train|pretrain --data ... --out ... --json-progress`.

        Args:
            mode: "finetune" (`train`) or "pretrain".
            data: dataset folder / JSON / CSV (fine-tune) or folder of volumes (pretrain).
            runDir: the run folder (`--out`).
            base: a model reference to start from (`--base`); else `size` picks a new backbone (`--size`).
            options: `stage` (pretrain), `steps`, or `epochs` (fine-tune only: pretraining counts steps), `device`;
                other keys go to the `configPath` JSON (`--config`), not to the command line.

        Returns:
            The argument list (the Python is PythonSlicer inside Slicer, or `pythonExecutable`).
        """
        options = dict(options or {})
        verb = "train" if mode == "finetune" else "pretrain"
        command = [self._python(), "-m", "meddinov3.cli", verb, "--data", str(data), "--out", str(runDir)]
        if base:
            command += ["--base", str(base)]
        elif size:
            command += ["--size", str(size)]
        if configPath is not None:
            command += ["--config", str(configPath)]
        if mode == "pretrain" and options.get("stage") is not None:
            command += ["--stage", str(int(options["stage"]))]
        if options.get("steps") is not None:
            command += ["--steps", str(int(options["steps"]))]
        elif options.get("epochs") is not None:
            if mode == "pretrain":
                raise TrainJobError("Pretraining counts optimiser steps: give `steps`, not `epochs`.")
            command += ["--epochs", str(int(options["epochs"]))]
        if options.get("device"):
            command += ["--device", str(options["device"])]
        return command + ["--json-progress"]

    def startJob(self, mode: str, data, outputFolder=None, base=None, size: str | None = "base",
                 options: dict | None = None) -> TrainJob:
        """Launch a detached `meddinov3 train` ("finetune") or `pretrain` job and return at once: training runs in
        its own process group, writing to its run folder, so closing the module or Slicer does not stop it.

        Args:
            mode: "finetune" or "pretrain".
            data: a dataset folder / JSON / CSV (fine-tune), a folder of volumes (pretrain), or a list of
                (volume, segmentation) node pairs (exported into RUN_DIR/dataset first).
            outputFolder: the run folder; an existing non-empty folder gets a `MODE-TIMESTAMP` sub-folder, None a
                new folder under the jobs root (`MEDDINOV3_HOME/jobs`).
            base, size: the model to start from, or the size of a new one (see `buildCommand`).
            options: `stage`, `steps`, `epochs`, `device`, and any training-config key (written to
                RUN_DIR/job_config.json, passed as --config).

        Returns:
            The TrainJob (follow it with `status()`, `metrics()`, `logTail()`; `stop()`, `resumeJob`).

        Raises:
            TrainJobError: unknown mode, a folder that already holds a job, missing data, a process that cannot
                start. Nothing half-made stays behind unless the process runs.
        """
        if mode not in MODES:
            raise TrainJobError(f"Unknown mode {mode!r}: use one of {', '.join(MODES)}.")
        options = dict(options or {})
        try:
            runDir = self._runFolder(mode, outputFolder)
            created = not runDir.exists()
            runDir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainJobError(f"Cannot create the output folder {outputFolder}: {e.strerror or e}") from e
        try:
            job = self._launch(mode, data, runDir, base, size, options)
        except BaseException as e:
            spawned = _CHILDREN.get(str(runDir))
            if spawned is not None and spawned.poll() is None:
                raise  # the process runs (a later step failed): its folder stays
            # nothing half-made stays behind: the folder (empty before, see _runFolder) is free for a new start
            if created:
                shutil.rmtree(runDir, ignore_errors=True)
            else:
                for path in runDir.iterdir():
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
            if isinstance(e, OSError):
                where = f": {e.filename}" if e.filename else ""
                raise TrainJobError(f"Could not start the training process: {e.strerror or e}{where}") from e
            raise
        remember(runDir)
        return self._track(job)

    def _launch(self, mode: str, data, runDir: Path, base, size, options: dict) -> TrainJob:
        if isinstance(data, (list, tuple)):
            data = self.exportDataset(data, runDir / "dataset")
        if not data:
            raise TrainJobError("No training data given.")
        data = str(Path(data).expanduser().resolve()) if Path(str(data)).expanduser().exists() else str(data)
        if not Path(data).exists():
            raise TrainJobError(f"Training data not found: {data}")
        config = {k: v for k, v in options.items() if k not in CLI_OPTIONS}
        configPath = None
        if config:
            configPath = runDir / "job_config.json"
            write_json(configPath, config)
        command = self.buildCommand(mode, data, runDir, base=base, size=size, options=options, configPath=configPath)
        info = {"mode": mode, "data": data, "base": str(base) if base else None, "size": None if base else size,
                "stage": options.get("stage"), "device": options.get("device"), "options": options}
        logging.info("MedDINOv3 Train: %s", " ".join(command))
        return TrainJob.launch(runDir, command, info, env=self._environment())

    def resumeJob(self, job) -> TrainJob:
        """Relaunch a stopped, killed or failed job with `--resume`: it continues from its last checkpoint with its
        saved configuration (see `TrainJob.resume`).

        Args:
            job: a TrainJob or its run folder.

        Returns:
            The job, running again. TrainJobError while it still runs or when it never wrote its configuration.
        """
        job = self._track(job if isinstance(job, TrainJob) else TrainJob(job))
        return job.resume(python=self._python() if self.pythonExecutable else None, env=self._environment())

    def jobs(self, root=None) -> list[TrainJob]:
        """Every job on disk, so that a new Slicer session reattaches to jobs that outlived the last one.

        Args:
            root: a folder of run folders; None: the jobs root and every output folder a job was started in.

        Returns:
            TrainJobs (running, finished, stopped, killed, failed), newest first. Reading their status registers the
            models of finished fine-tune jobs (listed by the Segment module as "trained").
        """
        found = [self._track(job) for job in findJobs(root)]
        for job in found:
            try:
                job.status()
            except Exception:  # noqa: BLE001 - one broken folder must not hide the others
                logging.exception("MedDINOv3 Train: reading %s failed", job.runDir)
        return found

    def _onFinished(self, job: TrainJob, status: dict) -> None:
        if job.mode != "finetune":
            return
        try:
            self.registerJobModel(job)
        except Exception as e:  # noqa: BLE001 - the job itself succeeded; say why the model is not listed
            logging.warning("MedDINOv3 Train: the model of %s could not be registered: %s", job.runDir, e)

    def registerJobModel(self, job: TrainJob) -> str | None:
        """Register a finished fine-tune job's model package, so that the Segment module lists it as "trained".

        Args:
            job: the TrainJob.

        Returns:
            The model reference to segment with (also recorded in job.json, so it is registered once), or None
            while the job has no model package yet.
        """
        info = job.info()
        if info.get("registered"):
            return info["registered"]
        path = Path(job.modelPath())
        if not (path / "model.json").is_file():
            return None
        try:
            from MedDINOv3SegmentLib.models import registerModel
        except ImportError:
            from meddinov3.checkpoints import register_model as registerModel
        reference = str(registerModel(path))
        info["registered"] = reference
        write_json(job.jobFile, info)
        return reference

    # -- charts -----------------------------------------------------------------------------------

    @staticmethod
    def plotData(metrics: list[dict]) -> dict:
        """The chart's table columns from metrics.jsonl records (`TrainJob.metrics()`): no Slicer needed.

        Args:
            metrics: records with `kind` "step" (step, loss) or "validation" (step, mean_dice, dice per class).

        Returns:
            {"loss": {"step": [...], "loss": [...]}, "validation": {"step": [...], "mean Dice": [...],
            "<class>": [...]}}: floats, one column a class seen in any validation (NaN where a record lacks it).
        """
        loss = {"step": [], "loss": []}
        steps = [r for r in metrics if r.get("kind") == "step" and r.get("loss") is not None]
        for r in steps:
            loss["step"].append(float(r["step"]))
            loss["loss"].append(float(r["loss"]))
        validation = {"step": [], "mean Dice": []}
        records = [r for r in metrics if r.get("kind") == "validation"]
        classes = []
        for r in records:
            for name in (r.get("dice") or {}):
                if name not in classes:
                    classes.append(name)
        for name in classes:
            validation[name] = []
        for r in records:
            validation["step"].append(float(r.get("step", 0)))
            validation["mean Dice"].append(float(r.get("mean_dice") or 0.0))
            for name in classes:
                value = (r.get("dice") or {}).get(name)
                validation[name].append(float("nan") if value is None else float(value))
        return {"loss": loss, "validation": validation}

    def updatePlotNodes(self, job, chartNode=None, scene=None):
        """Create or update the table, plot series and chart nodes of the job's loss and validation Dice per class.

        Called every second by the Widget: records already charted are not charted again, and nodes are found by
        their attributes (a scene close reuses node IDs for other nodes).

        Args:
            job: a TrainJob or its run folder.
            chartNode: a vtkMRMLPlotChartNode to use (else one is made for the job).
            scene: the MRML scene (default slicer.mrmlScene).

        Returns:
            The vtkMRMLPlotChartNode (show it in a qMRMLPlotWidget).
        """
        import slicer

        job = job if isinstance(job, TrainJob) else TrainJob(job)
        scene = scene or slicer.mrmlScene
        records = job.metrics()
        key = str(job.runDir)
        ids = self._plotNodes.setdefault(key, {})
        shown = scene.GetNodeByID(ids["chart"]) if "chart" in ids else None
        if (chartNode is None and shown is not None and self._ownsPlotNode(shown, key, "chart")
                and self._plottedRecords.get(key) == len(records)):
            return shown  # nothing new since the last call: keep the tables as they are
        data = self.plotData(records)
        if chartNode is not None:
            chartNode.SetAttribute("MedDINOv3Train.job", key)
            chartNode.SetAttribute("MedDINOv3Train.role", "chart")
            ids["chart"] = chartNode.GetID()
        chart = self._plotNode(scene, key, "chart", "vtkMRMLPlotChartNode", f"{job.name} training")
        chart.SetTitle(f"{job.name}: loss and validation Dice")
        chart.SetXAxisTitle("step")
        chart.SetYAxisTitle("loss / Dice")
        chart.SetLegendVisibility(True)
        wanted = []
        for tableRole, columns in (("lossTable", data["loss"]), ("validationTable", data["validation"])):
            table = self._plotNode(scene, key, tableRole, "vtkMRMLTableNode", f"{job.name} {tableRole[:-5]}")
            table.SetAndObserveTable(self._vtkTable(columns))
            wanted += [self._plotSeries(scene, key, job.name, table, tableRole, column).GetID()
                       for column in columns if column != "step"]
        present = [chart.GetNthPlotSeriesNodeID(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
        for seriesId in wanted:
            if seriesId not in present:
                chart.AddAndObservePlotSeriesNodeID(seriesId)
        self._plottedRecords[key] = len(records)
        return chart

    def _plotNode(self, scene, key: str, role: str, className: str, name: str):
        """The node of job `key` in `role`, made (and marked with the job and role) if it is not in the scene."""
        ids = self._plotNodes.setdefault(key, {})
        existing = scene.GetNodeByID(ids[role]) if role in ids else None
        if existing is not None and not self._ownsPlotNode(existing, key, role):
            existing = None  # node IDs restart after a scene close: this ID now names another node
        if existing is None:
            existing = scene.AddNewNodeByClass(className, name)
            existing.SetAttribute("MedDINOv3Train.job", key)
            existing.SetAttribute("MedDINOv3Train.role", role)
            ids[role] = existing.GetID()
        return existing

    @staticmethod
    def _vtkTable(columns: dict):
        """A vtkTable with one vtkDoubleArray per column (`plotData`'s {name: values})."""
        import vtk

        vtable = vtk.vtkTable()
        for name, values in columns.items():
            array = vtk.vtkDoubleArray()
            array.SetName(name)
            array.SetNumberOfValues(len(values))
            for i, value in enumerate(values):
                array.SetValue(i, value)
            vtable.AddColumn(array)
        return vtable

    def _plotSeries(self, scene, key: str, jobName: str, table, tableRole: str, column: str):
        """The scatter series of `column` against step in `table`: loss as a line, Dice with markers, mean dashed."""
        import slicer

        label = "loss" if column == "loss" else (column if column == "mean Dice" else f"Dice {column}")
        series = self._plotNode(scene, key, f"series:{tableRole}:{column}", "vtkMRMLPlotSeriesNode",
                                f"{jobName} {label}")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName(column)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone if column == "loss"
                              else slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        if column == "mean Dice":
            series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
        return series

    def removePlotNodes(self, job) -> None:
        """Remove the job's chart, table and series nodes from the scene (before its folder is deleted); nodes that
        now carry the same IDs but belong to something else stay.

        Args:
            job: a TrainJob or its run folder.
        """
        import slicer

        key = str(job.runDir if isinstance(job, TrainJob) else Path(job).resolve())
        self._plottedRecords.pop(key, None)
        for role, nodeId in self._plotNodes.pop(key, {}).items():
            existing = slicer.mrmlScene.GetNodeByID(nodeId)
            if existing is not None and self._ownsPlotNode(existing, key, role):
                slicer.mrmlScene.RemoveNode(existing)

    @staticmethod
    def _ownsPlotNode(node, key: str, role: str) -> bool:
        """True if `node` is the plot node made for job `key` in `role` (not a later node given the same ID)."""
        return node.GetAttribute("MedDINOv3Train.job") == key and node.GetAttribute("MedDINOv3Train.role") == role


__all__ = ["MedDINOv3TrainLogic", "TrainJob", "TrainJobError", "resumeCommand"]
