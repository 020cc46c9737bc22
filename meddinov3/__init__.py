"""MedDINOv3 for CT/MRI segmentation: network, checkpoints, engine, fine-tuning, pretraining.

Importable without 3D Slicer; the Slicer modules are thin layers over this package.
"""

__version__ = "0.1.0"
