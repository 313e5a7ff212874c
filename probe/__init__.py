"""probe: transfer learning on small image datasets with frozen ImageNet backbones,
an HDF5 feature cache and heads that train in seconds."""

from .backbones import BackboneSpec, get as get_backbone, list_backbones
from .features.cache import FeatureCache, SourceChanges, Split, list_caches, list_unsealed
from .data import Dataset, Sample, discover, load_image
from .errors import (
    BackboneError,
    CacheError,
    CacheMismatchError,
    DatasetError,
    NotFittedError,
    ProbeError,
    RunError,
    SourceChangedError,
    UnsealedCacheError,
    WeightsError,
)
from .features.engines.ray import RayOptions
from .features.extract import ExtractionReport, ExtractionStatus, extract, extract_with_report
from .settings import ExtractionSettings, SplitSettings, Weights
from .finetune import finetune
from .heads import list_heads, load_head, make_head
from .inference import Prediction, export, load_images, predict
from .runs import Run, fit
from .compare import Comparison, compare; from .demo import run_demo, write_digits  # noqa: E702
from .curve import curve
from .duplicates import DuplicateGroup, DuplicateImage, DuplicatePair, Duplicates, find_duplicates
from .html import write_report
from .features.store import reseal as reseal_cache


def __getattr__(name: str):
    # head classes import scikit-learn (seconds); `import probe` stays fast without them
    if name in ("LogisticHead", "DenseHead", "KNNHead"):
        from . import heads

        return getattr(heads, name)
    raise AttributeError(f"module 'probe' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "BackboneSpec", "get_backbone", "list_backbones",
    "FeatureCache", "SourceChanges", "Split", "list_caches", "list_unsealed", "reseal_cache",
    "Dataset", "Sample", "discover", "load_image",
    "ProbeError", "BackboneError", "WeightsError", "DatasetError", "CacheError",
    "CacheMismatchError", "SourceChangedError", "UnsealedCacheError", "NotFittedError",
    "RunError",
    "extract", "extract_with_report", "ExtractionReport", "ExtractionStatus", "RayOptions",
    "ExtractionSettings", "SplitSettings", "Weights", "fit", "predict", "export", "load_images",
    "Run", "Prediction",
    "LogisticHead", "DenseHead", "KNNHead", "make_head", "load_head", "list_heads", "curve",
    "finetune",
    "compare", "Comparison", "run_demo", "write_digits",
    "write_report", "find_duplicates", "Duplicates", "DuplicatePair", "DuplicateGroup",
    "DuplicateImage",
]
