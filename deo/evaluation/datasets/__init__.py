"""Readers of the downstream benchmarks, one class per benchmark family, with one constructor
``(root, split="train", partition="default", download=False, ...)`` and model-ready samples."""

from deo.evaluation.datasets.base import IGNORE_INDEX, SPLITS, BenchmarkDataset
from deo.evaluation.datasets.geobench import GeoBenchClassification, GeoBenchSegmentation
from deo.evaluation.datasets.levircd import LEVIRCD
from deo.evaluation.datasets.oscd import OSCD
from deo.evaluation.datasets.pastis import PASTIS
from deo.evaluation.datasets.sen1floods11 import Sen1Floods11
from deo.evaluation.datasets.spacenet import SpaceNet1

__all__ = [
    "IGNORE_INDEX",
    "LEVIRCD",
    "OSCD",
    "PASTIS",
    "SPLITS",
    "BenchmarkDataset",
    "GeoBenchClassification",
    "GeoBenchSegmentation",
    "Sen1Floods11",
    "SpaceNet1",
]
