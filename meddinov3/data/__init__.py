"""Training data: dataset formats and checks, the slice cache, the resumable sampler, batched augmentation."""

from .augment import AugmentConfig, augment
from .cache import SliceCache, build_cache
from .dataset import Case, Dataset, DatasetError, check_dataset, load_dataset
from .sampler import PatchSampler

__all__ = ["AugmentConfig", "Case", "Dataset", "DatasetError", "PatchSampler", "SliceCache", "augment",
           "build_cache", "check_dataset", "load_dataset"]
