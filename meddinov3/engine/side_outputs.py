"""The files `segment_file` writes beside a label map: probabilities, structure statistics, uncertainty map.

Each is checked before the inference (a bad path fails in a second, not after minutes), computed from the
segmentation result, and written before the label map replaces an older one; if one fails, those already written
by this call are removed, so an input has all its requested outputs or none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from .outputs import check_probabilities_output, write_probabilities
from .statistics import check_statistics_output, structure_statistics, write_statistics
from .uncertainty import check_uncertainty_output, slice_confidence, uncertainty_map, write_uncertainty


@dataclass
class SideOutputs:
    """Paths of the optional outputs of one input (None: not asked for)."""

    probabilities: str | os.PathLike | None = None  # .npz, `write_probabilities`
    statistics: str | os.PathLike | None = None  # .json / .csv, `statistics.structure_statistics`
    uncertainty: str | os.PathLike | None = None  # image, `uncertainty.uncertainty_map` (percent)
    uncertainty_map: object = field(default=None, repr=False)  # uint8 (z, y, x), set by `analyse`

    def check(self, overwrite: bool = False) -> None:
        """ValueError / FileExistsError naming the path, before any work."""
        for path, check in ((self.probabilities, check_probabilities_output),
                            (self.statistics, check_statistics_output), (self.uncertainty, check_uncertainty_output)):
            if path is not None:
                check(path, overwrite)

    @property
    def files(self) -> tuple[Path, ...]:
        """The asked-for files (probabilities, statistics, uncertainty), e.g. a cohort case's extras."""
        return tuple(Path(p) for p in (self.probabilities, self.statistics, self.uncertainty) if p is not None)

    @property
    def needs_probabilities(self) -> bool:
        return self.probabilities is not None or self.uncertainty is not None

    def analyse(self, image: sitk.Image, result) -> None:
        """Compute what the files hold: `uncertainty_map` and `result.stats["slice_confidence"]` when an uncertainty
        map is asked for, `result.stats["structures"]` when statistics are. Probabilities only needed for the
        uncertainty are dropped afterwards."""
        if self.uncertainty is not None:
            background = next((i for i, c in enumerate(result.classes) if c.value == 0), None)
            self.uncertainty_map, structure = uncertainty_map(result.probabilities, background)
            result.stats["slice_confidence"] = slice_confidence(self.uncertainty_map, structure, image)
            if self.probabilities is None:
                result.probabilities = None
        if self.statistics is not None:
            result.stats["structures"] = structure_statistics(image, result.labels, result.classes)

    def write(self, result, overwrite: bool = False, source: str = "") -> None:
        """Write the asked-for files (after `analyse`); on failure remove the ones this call wrote."""
        written: list[Path] = []
        try:
            if self.probabilities is not None:
                written.append(write_probabilities(self.probabilities, result.probabilities, result.classes,
                                                   overwrite=overwrite, postprocessing=result.stats["postprocessing"]))
            if self.uncertainty is not None:
                written.append(write_uncertainty(self.uncertainty, self.uncertainty_map, result.labels,
                                                 overwrite=overwrite))
            if self.statistics is not None:
                extra = {"input": str(source)}
                if "slice_confidence" in result.stats:
                    extra["slice_confidence"] = result.stats["slice_confidence"]
                written.append(write_statistics(self.statistics, result.stats["structures"], extra,
                                                overwrite=overwrite))
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
