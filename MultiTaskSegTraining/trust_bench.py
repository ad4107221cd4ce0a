"""The trust benchmark's work list and runner: which images, which family, one cached record each.

Families (everything from ../shared; test cases are only ever scored, never fitted on):

- ``fit`` / ``fit_shift``: train + validation cases of the bundle's split, clean and with one
  seeded artefact each — with ``fit_fov`` the only records the detector, threshold and quality model see;
- ``id``: the bundle's test split (in distribution); ``id_unseen``: cases added to the datasets
  after the bundle was trained (never seen by it; further in-distribution held-out cases);
- ``fit_fov`` / ``id_fov``: a fit case / a test case with a seeded other field of view
  (``ood_baselines.field_of_view_variant``): in-distribution references of the detector / in-distribution
  cases that should not be flagged (no labels: only the signature and the context head are used);
- ``shift``: test cases with every artefact type at the chosen severities;
- ``ood_near`` / ``ood_far``: ood-dev volumes (near = trained anatomy in another sequence or
  a brain template, see NEAR_OOD).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from MultiTaskSegLib.bundle import Bundle
from MultiTaskSegLib.predictor import Predictor
from MultiTaskSegLib.volume_io import read_volume

from .evaluate_data import EvalDataset, match_datasets, ood_volumes, pick_even
from .ood_baselines import field_of_view_variant
from .trust_corruptions import SEVERITIES, corrupt
from .trust_records import cached_record, image_record, record_settings

REFRAME = ("field_of_view", 0)  # a Job's "corruption" that only changes the field of view (ood_baselines)
NEAR_OOD = ("tcgalgg_", "pyradiomics_brain", "nilearn_mni", "nimare_mni")  # name prefixes in ood-dev


@dataclass
class Plan:
    fit_cases: int | None = 4  # clean train+val cases per context (None = all); each also gets one artefact
    shift_cases: int | None = 1  # test cases per context that get every artefact
    severities: tuple[int, ...] = (2, 3)
    kinds: tuple[str, ...] = tuple(SEVERITIES)
    unseen_cases: int | None = 4  # per context
    id_cases: int | None = None  # test cases per context
    ood: bool = True
    fit_only: bool = False  # only the fit families (what `mtseg finalise` needs)
    # one seeded field-of-view variant of every fit case (in-distribution references of the detector: fit_fov)
    # and of every test case (in-distribution cases that must not be flagged: id_fov)
    field_of_view: bool = True


CI_PLAN = Plan(fit_cases=2, shift_cases=1, severities=(3,), kinds=("noise", "anisotropy"), unseen_cases=0, id_cases=2)


@dataclass
class Job:
    family: str
    key: str
    path: Path
    dataset: EvalDataset | None = None
    label: Path | None = None
    corruption: tuple[str, int] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.key.encode())


def physical_volume(path: Path) -> float:
    """Field of view in mm³ from the header: the canonical grid's size (the cost of a pass) is proportional."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return float(np.prod(np.asarray(reader.GetSize()) * np.asarray(reader.GetSpacing())))


def _patient(case_id: str) -> str:
    return case_id.split("_frame")[0]  # ACDC: both frames of one patient belong together


def _unseen(ds: EvalDataset) -> list:
    listed = {c for part in ds.split.values() for c in part}
    seen_patients = {_patient(c) for c in listed}
    return [c for c in ds.spec.cases if c.case_id not in listed and _patient(c.case_id) not in seen_patients]


def work_list(bundle: Bundle, data_dirs: Sequence, ood_dirs: Sequence, plan: Plan) -> list[Job]:
    datasets = match_datasets(bundle, data_dirs)
    jobs: list[Job] = []

    def labelled(family: str, ds: EvalDataset, case, corruption=None) -> Job:
        suffix = f"__{corruption[0]}{corruption[1]}" if corruption else ""
        return Job(family, f"{family}/{ds.spec.name}__{case.case_id}{suffix}", case.image, ds, case.label, corruption)

    def reframed(family: str, ds: EvalDataset, case) -> Job:  # no label: only its signature and head are used
        return Job(family, f"{family}/{ds.spec.name}__{case.case_id}", case.image, ds, None, REFRAME)

    if not plan.fit_only:
        for ds in datasets:
            tests = pick_even(ds.cases("test"), plan.id_cases)
            jobs += [labelled("id", ds, c) for c in tests]
            jobs += [reframed("id_fov", ds, c) for c in tests] if plan.field_of_view else []
        for name, path in ood_volumes(ood_dirs) if plan.ood else []:
            family = "ood_near" if name.startswith(NEAR_OOD) else "ood_far"
            jobs.append(Job(family, f"{family}/{name}", path))
    kinds = list(plan.kinds)
    for ds in datasets:
        every = ds.cases("train") + ds.cases("val")
        fit = pick_even(every, plan.fit_cases)
        jobs += [labelled("fit", ds, c) for c in fit]
        jobs += [reframed("fit_fov", ds, c) for c in fit] if plan.field_of_view else []
        # one artefact each: types in turn, severities alternating, by the case's place among all fit cases,
        # so a 12-case plan (the end of `mtseg train`) and --fit-cases all give a case the same variant and
        # share its cached record
        place = {c.case_id: i for i, c in enumerate(every)}
        for c in fit:
            i = place[c.case_id]
            jobs.append(
                labelled("fit_shift", ds, c, (kinds[i % len(kinds)], plan.severities[i % len(plan.severities)]))
            )
    if plan.fit_only:
        return jobs
    shifted = [(ds, c) for ds in datasets for c in pick_even(ds.cases("test"), plan.shift_cases)]
    shifted.sort(key=lambda dc: physical_volume(dc[1].image))  # cheap images first: a cut-short run has most
    for s in sorted(plan.severities, reverse=True):  # severe first
        jobs += [labelled("shift", ds, c, (k, s)) for ds, c in shifted for k in kinds]
    for ds in datasets:
        jobs += [labelled("id_unseen", ds, c) for c in pick_even(_unseen(ds), plan.unseen_cases)]
    return jobs


def run_job(predictor: Predictor, job: Job) -> dict:
    image = read_volume(job.path)
    if job.corruption == REFRAME:
        image = field_of_view_variant(image, job.seed)
    elif job.corruption:
        image = corrupt(image, job.corruption[0], job.corruption[1], job.seed)
    label = structures = None
    if job.label is not None:
        label = job.dataset.lut[sitk.GetArrayFromImage(sitk.ReadImage(str(job.label)))]
        structures = job.dataset.structures
    rec = image_record(predictor, image, label, structures)
    rec.update(
        {
            "family": job.family,
            "key": job.key,
            "dataset": job.dataset.spec.name if job.dataset else None,
            "context": job.dataset.context if job.dataset else None,
            "corruption": list(job.corruption) if job.corruption else None,
        }
    )
    return rec


def run_all(predictor: Predictor, jobs: list[Job], records_dir: Path, log=print) -> list[dict]:
    """Every job's record, from the cache when present."""
    out = []
    t0 = time.perf_counter()
    settings = record_settings(predictor)
    for i, job in enumerate(jobs):
        path = records_dir / f"{job.key}.json"
        fresh = not path.is_file()
        rec = cached_record(path, lambda job=job: run_job(predictor, job), settings)
        out.append(rec)
        if fresh:
            d = rec.get("dice") or {}
            mean = np.mean([v for v in d.values() if v is not None]) if any(v is not None for v in d.values()) else None
            log(
                f"[{i + 1}/{len(jobs)}] {job.key}: {rec['seconds']['total']:.1f} s; shipped OOD score "
                f"{rec['shipped_score']:.4f}; Dice {'n/a' if mean is None else f'{mean:.3f}'} "
                f"(elapsed {(time.perf_counter() - t0) / 60:.1f} min)"
            )
    return out
