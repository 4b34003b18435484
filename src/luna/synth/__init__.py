"""Synthetic LUNA16-format data set: chest-CT-like scans, CAD-style candidates and nodule annotations.

Writes ``<root>/subsetK/<seriesuid>.mhd + .raw`` and ``candidates.csv``, ``annotations.csv``,
``annotations_excluded.csv``, ``seriesuids.csv`` in exactly LUNA16's formats (same headers, CRLF line ends,
numbers formatted as the official tables), so the rest of the pipeline cannot tell it from the real thing.

Why synthetic: LUNA16 is 120 GB behind a registration wall; the default workflow and the tests need a data
set that is small, fast, free and deterministic, yet has the properties that make the task learnable and
not trivial: nodules of realistic size and density inside lungs with vessels, and hard negatives on
vessels, branchings, the chest wall and the parenchyma.

Modules: ``config`` (SynthConfig, number formats, samplers, the plan), ``anatomy`` (the chest, lung texture,
vessels), ``lesions`` (nodules and excluded findings), ``rendering`` (voxels; one scan and its candidates),
``dataset`` (the files on disk), ``app`` (the ``luna-synth`` command line). The names other code uses are
imported here, so ``from luna.synth import ...`` is the interface.
"""

from __future__ import annotations

from luna.synth.app import SynthApp, build_parser, main
from luna.synth.config import (
    ANNOTATIONS_HEADER,
    CANDIDATES_HEADER,
    FULL_EXTENT_Z_MM,
    FULL_SIZE_XY,
    MIN_FOV_MM,
    NEGATIVE_KINDS,
    NODULE_KINDS,
    ScanPlan,
    SynthConfig,
    SynthError,
    format_annotation_mm,
    format_candidate_mm,
    plan_dataset,
    sample_diameters_mm,
    truncated_lognormal_cdf,
)
from luna.synth.dataset import MARKER_NAME, synthesize
from luna.synth.rendering import AIR_HU, OUTSIDE_FOV_HU, SynthScan, synthesize_scan

# package-private names that the tests reach through luna.synth
from luna.synth.anatomy import _Anatomy  # noqa: F401
from luna.synth.lesions import _make_blob  # noqa: F401
from luna.synth.rendering import _blob_fields, _box  # noqa: F401

__all__ = [
    "AIR_HU", "ANNOTATIONS_HEADER", "CANDIDATES_HEADER", "FULL_EXTENT_Z_MM", "FULL_SIZE_XY", "MARKER_NAME",
    "MIN_FOV_MM", "NEGATIVE_KINDS", "NODULE_KINDS", "OUTSIDE_FOV_HU", "ScanPlan", "SynthApp", "SynthConfig",
    "SynthError", "SynthScan", "build_parser", "format_annotation_mm", "format_candidate_mm", "main",
    "plan_dataset", "sample_diameters_mm", "synthesize", "synthesize_scan", "truncated_lognormal_cdf",
]
