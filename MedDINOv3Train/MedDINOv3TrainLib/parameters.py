"""The Train panel's parameter node (saved with the scene) and the choices its combo boxes offer.

Here rather than in the module file so that the Logic (`logic.getParameterNode`) and the Widget both import it
from the Lib: imports then point one way, module file -> Lib -> core.
"""

from __future__ import annotations

from typing import Annotated

from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

#: The mode selector's labels -> (job mode, pretraining stage).
MODES = {"Fine-tune": ("finetune", None), "Pretrain stage 1": ("pretrain", 1), "Pretrain stage 2": ("pretrain", 2),
         "Pretrain stage 3": ("pretrain", 3)}
#: The data source selector's labels, in the order the Widget's index checks use (0: scene pairs).
SOURCES = ("Volumes and segmentations in the scene", "Dataset folder", "Folder of unlabelled volumes")


@parameterNodeWrapper
class MedDINOv3TrainParameterNode:
    """Settings of the Train panel, saved with the scene (combo boxes store their text).

    The defaults here are the panel's, and the only defaults the Slicer module has: a job gets its training options
    from these fields (`MedDINOv3TrainWidget._options`), the CLI's own defaults apply to every option not given.

    dataFolder, outputFolder, baseModel and device are not bound in the .ui (connectGui binds a ctkPathLineEdit
    only to a pathlib.Path field and a QComboBox to a str only through a fixed Choice list): the Widget syncs them.
    """

    dataSource: Annotated[str, Choice(list(SOURCES))] = SOURCES[0]
    dataFolder: str = ""
    mode: Annotated[str, Choice(list(MODES))] = "Fine-tune"
    baseModel: str = ""
    modelSize: Annotated[str, Choice(["small", "base", "large"])] = "base"
    epochs: Annotated[int, WithinRange(1, 100000)] = 100
    steps: Annotated[int, WithinRange(1, 1000000)] = 250  # steps per epoch
    learningRate: Annotated[float, WithinRange(1e-6, 1.0)] = 3e-4  # decoder; backbone gets a tenth (3e-5)
    batchSize: Annotated[int, WithinRange(1, 4096)] = 8
    outputFolder: str = ""
    device: str = "Auto"
