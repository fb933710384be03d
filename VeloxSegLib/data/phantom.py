"""Synthetic PET/CT and brain MRI phantoms, written as nnU-Net raw datasets.

Every case is drawn from analytic shapes defined in physical space (mm), so the same anatomy
can be sampled on grids that differ, as real PET and CT grids do. A case depends only on
``(seed, index)``: ``numpy.random.default_rng(SeedSequence([seed, index]))`` drives it, so
datasets are reproducible and case ``i`` is the same whatever ``n`` is.

PET/CT (``kind="petct"``): channel 0 CT in HU (int16), channel 1 PET in SUV (float32) on its own
coarser grid with a different field of view and origin; label 1 = lesions on the CT grid.
MRI (``kind="mri"``): T1, T1ce, T2, FLAIR of a head on one grid (air exactly 0), labels
1 necrotic core, 2 edema, 3 enhancing tumour (BraTS nesting: ET inside TC = 1+3 inside
WT = 1+2+3). With ``anatomy="mni152"`` the brain is the MNI152 template read from an installed
``nilearn`` (optional), moved by a random similarity per case, skull-stripped as BraTS is.

These are phantoms, not patient data; models trained on them say so.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError

KINDS = ("petct", "mri")
PHANTOM_VERSION = 1

# Field of view of the default grids (mm); --size changes the number of voxels, not the FOV.
PETCT_FOV_MM = (384.0, 384.0, 336.0)
PETCT_DEFAULT_SIZE = (128, 128, 96)  # -> CT spacing 3.0 x 3.0 x 3.5 mm
MRI_FOV_MM = (192.0, 192.0, 192.0)
MRI_DEFAULT_SIZE = (96, 96, 96)  # -> 2 mm isotropic

# PET grid relative to CT: coarser voxels, wider transaxial and shorter axial FOV, shifted origin.
PET_SPACING_FACTOR = (4.0728 / 3.0, 4.0728 / 3.0, 1.25)
PET_FOV_FACTOR_XY = 1.12
PET_AXIAL_MARGIN_MM = 12.0
PET_CENTRE_SHIFT_MM = (2.3, -3.1, 1.7)
PET_PSF_FWHM_MM = 7.0

#: Lesion diameters (mm) are drawn log-uniformly in this range unless ``lesion_diameter_mm`` says
#: otherwise; a lesion keeps a radius of at least 3 mm (or half the coarsest voxel), so 6 mm is
#: the smallest that can be asked for. Lymph nodes stay at 28 mm or less.
LESION_DIAMETER_MM = (6.0, 45.0)
LESION_DIAMETER_LIMITS_MM = (6.0, 80.0)


@dataclass(frozen=True)
class Scanner:
    """How a PET/CT scanner and protocol image the phantom: PET voxel size (relative to the CT
    grid), PET resolution (PSF FWHM, then a post-reconstruction Gaussian of ``pet_post_sigma``
    PET voxels), PET noise (standard deviation ``pet_noise * sqrt(SUV)``) and CT quantum noise.
    The anatomy, the lesions and the labels of a case do not depend on the scanner: the same
    ``(seed, index)`` gives the same patient on every scanner."""

    name: str
    description: str
    pet_spacing_factor: Tuple[float, float, float] = PET_SPACING_FACTOR
    pet_psf_fwhm_mm: float = PET_PSF_FWHM_MM
    pet_post_sigma: float = 0.6
    pet_noise: float = 0.3
    ct_noise_hu: float = 14.0


#: ``veloxseg phantom --scanner``: the default is the scanner every shipped model was trained on.
SCANNERS: Dict[str, Scanner] = {s.name: s for s in (
    Scanner("default", "analog PET/CT: 4.07 mm PET voxels, 7 mm PSF, post-filter 0.6 voxel, CT noise 14 HU"),
    Scanner("digital", "digital (SiPM) PET/CT: PET voxels as fine as the CT's, 4 mm PSF, light post-filter "
                       "(0.3 voxel), two thirds of the PET noise",
            pet_spacing_factor=(1.0, 1.0, 1.0), pet_psf_fwhm_mm=4.0, pet_post_sigma=0.3, pet_noise=0.2),
    Scanner("low-dose", "low-dose protocol on the default scanner: half the PET counts (noise x1.41) and a "
                        "low-dose CT (noise 40 HU)",
            pet_noise=0.3 * math.sqrt(2.0), ct_noise_hu=40.0),
    Scanner("legacy", "older non-TOF BGO PET/CT: 5.47 x 5.47 x 3.27 mm PET voxels (a 128 matrix over 70 cm), "
                      "9.5 mm PSF, post-filter 0.8 voxel, 1.5 times the PET noise, CT noise 20 HU",
            pet_spacing_factor=(5.47 / 3.0, 5.47 / 3.0, 3.27 / 3.5), pet_psf_fwhm_mm=9.5, pet_post_sigma=0.8,
            pet_noise=0.45, ct_noise_hu=20.0),
)}


def scanner_named(name) -> Scanner:
    if isinstance(name, Scanner):
        return name
    if name not in SCANNERS:
        raise ConfigError(f"unknown scanner {name!r}; choose one of {', '.join(SCANNERS)}")
    return SCANNERS[name]


PETCT_CHANNELS = ("CT", "PET")
PETCT_LABELS = {"background": 0, "lesion": 1}
MRI_CHANNELS = ("T1", "T1ce", "T2", "FLAIR")
MRI_LABELS = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 3}


def default_size(kind: str) -> Tuple[int, int, int]:
    _check_kind(kind)
    return PETCT_DEFAULT_SIZE if kind == "petct" else MRI_DEFAULT_SIZE


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown phantom kind {kind!r} (choose from {', '.join(KINDS)})")


def _check_size(size, kind: str) -> Tuple[int, int, int]:
    size = tuple(int(s) for s in (size or default_size(kind)))
    if len(size) != 3 or min(size) < 24 or max(size) > 1024:
        raise ConfigError(f"phantom size must be three integers between 24 and 1024, got {list(size)}")
    return size


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of case ``index`` of a dataset with ``seed``."""
    if seed < 0 or index < 0:
        raise ConfigError("phantom seed and case index must be non-negative")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


# --------------------------------------------------------------------------- grids and shapes


@dataclass(frozen=True)
class Grid:
    """An axis-aligned voxel grid: ``size``/``spacing``/``origin`` in x, y, z (ITK order).
    Arrays on it are indexed ``[z, y, x]`` (SimpleITK's numpy convention)."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]

    @classmethod
    def centred(cls, size, spacing, centre=(0.0, 0.0, 0.0)) -> "Grid":
        origin = tuple(float(c - (n - 1) / 2.0 * s) for c, n, s in zip(centre, size, spacing))
        return cls(tuple(int(n) for n in size), tuple(float(s) for s in spacing), origin)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.size[::-1])

    def axis(self, a: int, lo: int = 0, hi: Optional[int] = None) -> np.ndarray:
        hi = self.size[a] if hi is None else hi
        return (self.origin[a] + np.arange(lo, hi) * self.spacing[a]).astype(np.float32)

    def coords(self, box=None):
        """Broadcastable world coordinates (x, y, z) of the grid or of a box of slices."""
        if box is None:
            box = (slice(0, self.size[2]), slice(0, self.size[1]), slice(0, self.size[0]))
        z = self.axis(2, box[0].start, box[0].stop)[:, None, None]
        y = self.axis(1, box[1].start, box[1].stop)[None, :, None]
        x = self.axis(0, box[2].start, box[2].stop)[None, None, :]
        return x, y, z

    def box(self, centre, radius) -> Optional[Tuple[slice, slice, slice]]:
        """Index slices ([z, y, x]) covering a sphere of ``radius`` mm around ``centre``."""
        out = []
        for a in (2, 1, 0):
            lo = math.floor((centre[a] - radius - self.origin[a]) / self.spacing[a])
            hi = math.ceil((centre[a] + radius - self.origin[a]) / self.spacing[a]) + 1
            lo, hi = max(lo, 0), min(hi, self.size[a])
            if lo >= hi:
                return None
            out.append(slice(lo, hi))
        return tuple(out)

    def index_of(self, point) -> Tuple[int, int, int]:
        """Nearest voxel ([z, y, x] index, clipped to the grid) of a world point."""
        idx = [int(round((point[a] - self.origin[a]) / self.spacing[a])) for a in (2, 1, 0)]
        return tuple(min(max(i, 0), n - 1) for i, n in zip(idx, self.shape))

    def image(self, array: np.ndarray):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(array)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        return img


@dataclass
class Shape:
    """A star-shaped solid: an ellipsoid (``semi`` axes in mm, rotated by ``rot``) whose radius
    is modulated along directions by ``lobes`` (rows: unit direction, amplitude, frequency,
    phase). ``level(grid)`` returns f with f <= 1 inside, f = t on the surface scaled by t."""

    centre: np.ndarray
    semi: np.ndarray
    rot: np.ndarray
    lobes: Optional[np.ndarray] = None

    @property
    def bound(self) -> float:
        amp = 0.0 if self.lobes is None else float(np.abs(self.lobes[:, 3]).sum())
        return float(np.max(self.semi)) * (1.0 + amp)

    def level(self, grid: Grid, scale: float = 1.0):
        """``(box, f)`` over the box holding the shape grown by ``scale``; None if off-grid."""
        box = grid.box(self.centre, self.bound * scale + max(grid.spacing))
        if box is None:
            return None
        x, y, z = grid.coords(box)
        d = (x - self.centre[0], y - self.centre[1], z - self.centre[2])
        r = self.rot  # columns are the shape's axes in world coordinates
        q = [(d[0] * r[0, k] + d[1] * r[1, k] + d[2] * r[2, k]) / self.semi[k] for k in range(3)]
        rho = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
        if self.lobes is not None:
            inv = 1.0 / np.maximum(rho, 1e-6)
            radius = np.ones_like(rho)
            for dx, dy, dz, amp, freq, phase in self.lobes:
                cos = np.clip((q[0] * dx + q[1] * dy + q[2] * dz) * inv, -1.0, 1.0)
                radius = radius + amp * np.cos(freq * np.arccos(cos) + phase)
            rho = rho / radius
        return box, rho.astype(np.float32)


def random_rotation(rng: np.random.Generator, max_angle: Optional[float] = None) -> np.ndarray:
    """A random rotation matrix; uniform over SO(3), or about a random axis by at most
    ``max_angle`` radians."""
    if max_angle is None:
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        return q
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def random_lobes(rng: np.random.Generator, n: int, max_amp: float) -> np.ndarray:
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    amp = rng.uniform(0.3, 1.0, size=(n, 1)) * max_amp
    freq = rng.integers(2, 5, size=(n, 1)).astype(float)
    phase = rng.uniform(0, 2 * math.pi, size=(n, 1))
    return np.hstack([dirs, amp, freq, phase])


def _ellipsoid(centre, semi, rot=None) -> Shape:
    return Shape(np.asarray(centre, float), np.asarray(semi, float), np.eye(3) if rot is None else rot)


def _paint(volume: np.ndarray, grid: Grid, shape: Shape, value, inner: float = 0.0, outer: float = 1.0, where=None):
    """Set ``volume`` to ``value`` where ``inner <= f <= outer`` (a shell when inner > 0)."""
    res = shape.level(grid, outer)
    if res is None:
        return
    box, f = res
    m = f <= outer
    if inner > 0:
        m &= f >= inner
    if where is not None:
        m &= where[box]
    volume[box][m] = value


def _mask(grid: Grid, shape: Shape, outer: float = 1.0, inner: float = 0.0) -> np.ndarray:
    out = np.zeros(grid.shape, bool)
    _paint(out, grid, shape, True, inner, outer)
    return out


def _smooth(array: np.ndarray, grid: Grid, sigma_mm: float) -> np.ndarray:
    import SimpleITK as sitk

    img = grid.image(np.ascontiguousarray(array, dtype=np.float32))
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, float(sigma_mm)))


def _noise_field(rng, grid: Grid, sigma_mm: float) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation (correlation length ~ sigma)."""
    field = _smooth(rng.standard_normal(grid.shape, dtype=np.float32), grid, sigma_mm)
    sd = float(field.std())
    return field / sd if sd > 0 else field


def _bias_field(rng, grid: Grid, strength: float) -> np.ndarray:
    """A smooth multiplicative field exp(strength * sum of 3 slow random plane waves)."""
    x, y, z = grid.coords()
    field = np.zeros(grid.shape, np.float32)
    for _ in range(3):
        k = rng.normal(size=3)
        k *= 2 * math.pi / (np.linalg.norm(k) * rng.uniform(200.0, 400.0))
        field += np.cos(k[0] * x + k[1] * y + k[2] * z + rng.uniform(0, 2 * math.pi)).astype(np.float32)
    return np.exp(strength / math.sqrt(1.5) * field)


def _sample_point(rng, grid: Grid, mask: np.ndarray) -> Optional[np.ndarray]:
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return None
    z, y, x = np.unravel_index(int(idx[rng.integers(idx.size)]), mask.shape)
    jitter = rng.uniform(-0.5, 0.5, size=3) * np.asarray(grid.spacing)
    return np.array([grid.origin[0] + x * grid.spacing[0], grid.origin[1] + y * grid.spacing[1],
                     grid.origin[2] + z * grid.spacing[2]]) + jitter


# --------------------------------------------------------------------------- PET/CT

# tissue index -> (name, HU, HU texture sd, default SUV)
_PETCT_TISSUES = [
    ("air", -1000.0, 0.0, 0.0),
    ("soft_tissue", 40.0, 12.0, 0.7),
    ("fat", -100.0, 10.0, 0.25),
    ("lung", -830.0, 35.0, 0.3),
    ("blood", 42.0, 6.0, 1.6),
    ("myocardium", 45.0, 6.0, 3.0),
    ("liver", 58.0, 8.0, 2.2),
    ("spleen", 48.0, 8.0, 1.8),
    ("kidney", 32.0, 8.0, 3.5),
    ("urine", 8.0, 4.0, 10.0),
    ("bone", 700.0, 120.0, 1.1),
    ("disc", 90.0, 15.0, 0.6),
    ("brain", 35.0, 6.0, 8.0),
    ("skull", 1000.0, 150.0, 0.5),
    ("canal", 20.0, 5.0, 0.4),
]
_T = {name: i for i, (name, *_rest) in enumerate(_PETCT_TISSUES)}


def petct_grids(size=None, scanner="default") -> Tuple[Grid, Grid]:
    """The CT grid and the PET grid of PET/CT phantoms of ``size`` (CT voxels, x y z)."""
    size = _check_size(size, "petct")
    ct_spacing = tuple(f / n for f, n in zip(PETCT_FOV_MM, size))
    ct = Grid.centred(size, ct_spacing)
    pet_spacing = tuple(s * k for s, k in zip(ct_spacing, scanner_named(scanner).pet_spacing_factor))
    pet_fov = (PETCT_FOV_MM[0] * PET_FOV_FACTOR_XY, PETCT_FOV_MM[1] * PET_FOV_FACTOR_XY,
               PETCT_FOV_MM[2] - 2 * PET_AXIAL_MARGIN_MM)
    pet_size = tuple(max(8, int(math.floor(f / s))) for f, s in zip(pet_fov, pet_spacing))
    pet = Grid.centred(pet_size, pet_spacing, PET_CENTRE_SHIFT_MM)
    return ct, pet


def _petct_anatomy(rng, grid: Grid):
    """``(tissue, body, organs, suv, shift, build)``: tissue index volume, body mask, masks
    for lesion placement, this case's organ SUVs, body shift (mm) and build factor."""
    s = rng.uniform(0.9, 1.06)  # body build
    shift = np.array([rng.uniform(-8, 8), rng.uniform(-6, 6), rng.uniform(-5, 5)])

    def j(value, spread):  # jitter a size
        return value * (1 + rng.uniform(-spread, spread))

    tissue = np.zeros(grid.shape, np.uint8)
    x, y, z = grid.coords()
    xs, ys, zs = x - shift[0], y - shift[1], z - shift[2]
    # torso: elliptic cross-section, flat-ish ends (superellipsoid in z)
    a, b, c, zc = 150 * s, 100 * s, 125.0, -50.0
    r2 = (xs / a) ** 2 + (ys / b) ** 2
    torso_f = r2 + np.abs((zs - zc) / c) ** 8
    body = torso_f <= 1
    neck = ((xs / (46 * s)) ** 2 + ((ys - 5) / (44 * s)) ** 2 <= 1) & (zs > 50) & (zs < 90)
    body |= neck
    head = _ellipsoid(shift + [0, -5, 118], [62 * s, 76 * s, 48])
    body |= _mask(grid, head)
    tissue[body] = _T["soft_tissue"]
    # subcutaneous fat: outer layer of the torso
    fat_level = rng.uniform(0.72, 0.86)
    tissue[(torso_f <= 1) & (torso_f > fat_level)] = _T["fat"]
    # visceral fat pockets in the abdomen
    for _ in range(int(rng.integers(3, 7))):
        ctr = shift + [rng.uniform(-80, 80) * s, rng.uniform(-50, 30) * s, rng.uniform(-150, -60)]
        _paint(tissue, grid, _ellipsoid(ctr, rng.uniform(12, 30, size=3), random_rotation(rng)), _T["fat"],
               where=tissue == _T["soft_tissue"])
    del r2
    organs: Dict[str, np.ndarray] = {}
    # aorta
    aorta = (((xs - 12) / 11) ** 2 + ((ys - 30 * s) / 11) ** 2 <= 1) & (zs > -115) & (zs < 40)
    tissue[aorta] = _T["blood"]
    # lungs (right lung = -x in LPS, slightly larger)
    lungs = np.zeros(grid.shape, bool)
    for side, width in ((-1, 56), (1, 50)):
        lung = _ellipsoid(shift + [side * 72 * s, 5, 20], [j(width, 0.08) * s, j(62, 0.08) * s, j(45, 0.08)],
                          random_rotation(rng, 0.1))
        lungs |= _mask(grid, lung)
    tissue[lungs] = _T["lung"]
    organs["lung"] = lungs
    # heart: myocardium shell around the blood pool
    heart = _ellipsoid(shift + [18, -30 * s, 0], [j(48, 0.1), j(42, 0.1), j(36, 0.1)], random_rotation(rng, 0.3))
    _paint(tissue, grid, heart, _T["myocardium"])
    _paint(tissue, grid, heart, _T["blood"], outer=rng.uniform(0.6, 0.75))
    # liver, spleen, kidneys, bladder
    liver = _ellipsoid(shift + [-55 * s, -5, -50], [j(75, 0.1) * s, j(65, 0.1) * s, j(35, 0.1)],
                       random_rotation(rng, 0.25))
    _paint(tissue, grid, liver, _T["liver"])
    organs["liver"] = tissue == _T["liver"]
    _paint(tissue, grid, _ellipsoid(shift + [72 * s, 40 * s, -40], [j(28, 0.15), j(42, 0.15), j(28, 0.15)],
                                    random_rotation(rng, 0.3)), _T["spleen"])
    for side in (-1, 1):
        kidney = _ellipsoid(shift + [side * 62 * s, 55 * s, -85], [j(24, 0.1), j(28, 0.1), j(32, 0.1)],
                            random_rotation(rng, 0.3))
        _paint(tissue, grid, kidney, _T["kidney"])
    _paint(tissue, grid, _ellipsoid(shift + [0, -35 * s, -140], [j(40, 0.25), j(32, 0.25), j(24, 0.25)]),
           _T["urine"])
    # spine: vertebral bodies with discs, spinal canal; ribs; iliac wings
    vert = (((xs / (18 * s)) ** 2 + ((ys - 62 * s) / (16 * s)) ** 2) <= 1) & (zs > -165) & (zs < 90)
    phase = rng.uniform(0, 26)
    disc = np.mod(zs + phase, 26.0) < 5.0
    tissue[vert & ~disc] = _T["bone"]
    tissue[vert & disc] = _T["disc"]
    organs["spine"] = vert & ~disc
    canal = ((xs / 7) ** 2 + ((ys - 62 * s - 24) / 7) ** 2 <= 1) & (zs > -150) & (zs < 90)
    tissue[canal] = _T["canal"]
    ring = (torso_f > 0.78) & (torso_f < 0.86) & (zs > -45) & (zs < 62) & (ys > -60 * s)
    ring &= np.mod(zs + rng.uniform(0, 24), 24.0) < 7.0
    tissue[ring] = _T["bone"]
    for side in (-1, 1):
        ilium = _ellipsoid(shift + [side * 85 * s, 30 * s, -128], [40 * s, 24 * s, 32], random_rotation(rng, 0.2))
        _paint(tissue, grid, ilium, _T["bone"], inner=0.78)
    # head: skull shell, brain
    _paint(tissue, grid, head, _T["skull"], inner=0.88)
    _paint(tissue, grid, head, _T["brain"], outer=0.88)
    del torso_f
    suv = {
        "myocardium": float(rng.choice([rng.uniform(1.3, 2.5), rng.uniform(3.0, 10.0)])),
        "liver": float(rng.uniform(1.8, 2.8)),
        "kidney": float(rng.uniform(2.5, 6.0)),
        "urine": float(rng.uniform(3.0, 30.0)),
        "brain": float(rng.uniform(6.0, 11.0)),
        "blood": float(rng.uniform(1.2, 2.0)),
    }
    organs["soft"] = (tissue == _T["soft_tissue"]) | (tissue == _T["fat"])
    return tissue, body, organs, suv, shift, s


# lymph-node stations (mm, before the case's shift and build)
_NODE_STATIONS = [(-8, -25, 48), (10, -22, 52), (-105, 10, 45), (105, 10, 45), (-20, 15, 5), (25, 10, 20),
                  (25, 15, -70), (-20, 15, -100), (-60, -10, -140), (60, -10, -140), (-35, 0, 70), (35, 0, 70)]
_SITES = ("lung", "liver", "node", "bone")
_SITE_P = (0.3, 0.25, 0.35, 0.1)


def check_lesion_diameter(value) -> Tuple[float, float]:
    """``(min, max)`` lesion diameters in mm, checked (ConfigError) against
    :data:`LESION_DIAMETER_LIMITS_MM`; ``None`` gives :data:`LESION_DIAMETER_MM`."""
    if value is None:
        return LESION_DIAMETER_MM
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"lesion diameter range must be two numbers (min max, mm), got {value!r}") from None
    a, b = LESION_DIAMETER_LIMITS_MM
    if not (math.isfinite(lo) and math.isfinite(hi) and a <= lo <= hi <= b):
        raise ConfigError(f"lesion diameter range must satisfy {a:g} <= min <= max <= {b:g} mm, got {lo:g} {hi:g}")
    return lo, hi


def _petct_lesions(rng, grid: Grid, tissue, body, organs, shift, build, z_limit, diameter_mm=LESION_DIAMETER_MM):
    """Draw 1-5 lesions: label mask, CT HU values and SUVs on the CT grid, their records, and which
    record drew each lesion voxel (``owner``: record index + 1, the last one where they overlap).
    ``diameter_mm``: the (min, max) of the log-uniform diameter draw."""
    label = np.zeros(grid.shape, bool)
    owner = np.zeros(grid.shape, np.uint8)
    ct_value = np.zeros(grid.shape, np.float32)
    suv_value = np.zeros(grid.shape, np.float32)
    records = []
    min_r = max(3.0, 0.5 * max(grid.spacing))  # smaller ones keep at least their nearest voxel
    _, _, zc = grid.coords()
    z_ok = np.abs(zc) < z_limit
    for _ in range(int(rng.integers(1, 6))):
        site = str(rng.choice(_SITES, p=_SITE_P))
        diameter = float(math.exp(rng.uniform(math.log(diameter_mm[0]), math.log(diameter_mm[1]))))
        if site == "node":
            diameter = min(diameter, 28.0)
            station = np.asarray(_NODE_STATIONS[int(rng.integers(len(_NODE_STATIONS)))], float)
            centre = shift + station * [build, build, 1.0] + rng.uniform(-6, 6, size=3)
            host = "soft_tissue"
        else:
            pool = organs["lung" if site == "lung" else "liver" if site == "liver" else "spine"] & z_ok
            centre = _sample_point(rng, grid, pool)
            if centre is None:
                continue
            host = {"lung": "lung", "liver": "liver", "bone": "bone"}[site]
        radius = max(diameter / 2.0, min_r)
        semi = radius * rng.uniform(0.75, 1.25, size=3)
        lobulated = bool(rng.random() < 0.5)
        lobes = random_lobes(rng, 3, 0.12) if lobulated else None
        shape = Shape(np.asarray(centre, float), semi, random_rotation(rng), lobes)
        res = shape.level(grid)
        if res is None:
            continue
        box, f = res
        inside = (f <= 1.0) & body[box]
        if not inside.any():  # tiny lesion between voxel centres: keep its nearest voxel
            zi, yi, xi = grid.index_of(centre)
            if not body[zi, yi, xi]:
                continue
            inside = np.zeros_like(inside)
            inside[zi - box[0].start, yi - box[1].start, xi - box[2].start] = True
        # CT appearance: lung nodules are soft tissue; liver lesions mostly hypodense, some
        # invisible; nodes are soft tissue (visible in fat, not in muscle); bone lytic/sclerotic.
        if site == "lung":
            hu = float(rng.uniform(10, 50))
        elif site == "liver":
            hu = 58.0 + float(rng.uniform(-40, 8))
        elif site == "node":
            hu = float(rng.uniform(30, 50))
        else:
            hu = 700.0 + float(rng.uniform(-450, 250))
        host_suv = {"lung": 0.3, "liver": 2.2, "soft_tissue": 0.7, "bone": 1.1}[host]
        suv = float(max(host_suv * math.exp(rng.uniform(math.log(1.6), math.log(9.0))), rng.uniform(1.5, 3.0)))
        if rng.random() < 0.2:
            suv = float(rng.uniform(8, 25))
        sub_suv = np.full(f.shape, suv, np.float32)
        necrotic = radius > 12 and rng.random() < 0.5
        if necrotic:
            sub_suv[f < 0.5] = suv * 0.35
        lab = label[box]
        lab |= inside
        owner[box][inside] = len(records) + 1
        ct_value[box][inside] = hu
        suv_value[box][inside] = np.maximum(suv_value[box][inside], sub_suv[inside])
        records.append({
            "site": site,
            "centre_mm": [round(float(v), 2) for v in centre],
            "diameter_mm": round(2 * radius, 2),
            "lobulated": lobulated,
            "necrotic_core": bool(necrotic),
            "suv": round(suv, 3),
            "ct_hu": round(hu, 1),
            "ct_contrast_hu": round(hu - _PETCT_TISSUES[_T[host]][1], 1),
            "voxels": int(inside.sum()),
        })
    return label, ct_value, suv_value, records, owner


@dataclass
class PetctScene:
    """A PET/CT phantom case before the scanner's noise: its grids, tissue map, lesions (``label``,
    their HU ``les_hu`` and SUV ``les_suv`` on the CT grid, the ``records`` and the ``owner`` map of
    :func:`_petct_lesions`), organ SUVs and the anatomical ``texture`` field (unit sd)."""

    scanner: Scanner
    ct_grid: Grid
    pet_grid: Grid
    tissue: np.ndarray
    suv: Dict[str, float]
    label: np.ndarray
    les_hu: np.ndarray
    les_suv: np.ndarray
    records: list
    owner: np.ndarray
    texture: np.ndarray

    def lut(self, column: str) -> np.ndarray:
        """Per-tissue values (index: the tissue map's): ``"hu"``, ``"texture_hu"`` (the texture's sd
        in HU) or ``"suv"`` (this patient's organ uptake where it has its own)."""
        values = np.array([t[{"hu": 1, "texture_hu": 2, "suv": 3}[column]] for t in _PETCT_TISSUES], np.float32)
        if column == "suv":
            for name, value in self.suv.items():
                values[_T[name]] = value
        return values

    def ct_mean(self, label: Optional[np.ndarray] = None, texture: Optional[np.ndarray] = None) -> np.ndarray:
        """Noise-free CT (float HU, before noise and rounding) with the lesions of ``label`` (default:
        all) and ``texture`` (default: the case's): tissue HU + texture, lesions, partial-volume blur."""
        label = self.label if label is None else label
        texture = self.texture if texture is None else texture
        ct = self.lut("hu")[self.tissue]
        ct[label] = self.les_hu[label]
        ct += self.lut("texture_hu")[self.tissue] * texture
        return self.ct_blur(ct)

    def ct_blur(self, ct: np.ndarray) -> np.ndarray:
        """The CT's partial-volume blur (linear)."""
        return _smooth(ct, self.ct_grid, 0.45 * min(self.ct_grid.spacing))

    def activity(self, label: Optional[np.ndarray] = None, texture: Optional[np.ndarray] = None) -> np.ndarray:
        """Activity (SUV) on the CT grid with the lesions of ``label`` and ``texture`` (defaults: the case's)."""
        label = self.label if label is None else label
        texture = self.texture if texture is None else texture
        activity = self.lut("suv")[self.tissue] * (1.0 + 0.08 * texture)
        activity[label] = self.les_suv[label]
        return np.maximum(activity, 0)

    def pet_acquire(self, activity: np.ndarray) -> np.ndarray:
        """Activity on the CT grid -> the PET grid before noise: the PSF blur, then linear
        resampling (both linear)."""
        import SimpleITK as sitk

        blurred = _smooth(activity, self.ct_grid, self.scanner.pet_psf_fwhm_mm / 2.3548)
        resampled = sitk.Resample(
            self.ct_grid.image(blurred), self.pet_grid.size, sitk.Transform(), sitk.sitkLinear, self.pet_grid.origin,
            self.pet_grid.spacing, (1, 0, 0, 0, 1, 0, 0, 0, 1), 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(resampled)

    def pet_post(self, pet: np.ndarray) -> np.ndarray:
        """The PET's post-reconstruction Gaussian filter (linear)."""
        return _smooth(pet, self.pet_grid, self.scanner.pet_post_sigma * min(self.pet_grid.spacing))


def petct_scene(seed: int, index: int, size=None, scanner="default", rng=None,
                lesion_diameter_mm=None) -> PetctScene:
    """The noise-free part of PET/CT phantom case ``(seed, index)``. ``rng``: the case's random
    generator (default: a new one); after the call it is where the scanner's noise is drawn.
    ``lesion_diameter_mm``: (min, max) of the lesions' diameters (default :data:`LESION_DIAMETER_MM`);
    the anatomy and the organs' uptake do not depend on it; the lesions and the noise are drawn anew."""
    scanner = scanner_named(scanner)
    diameter_mm = check_lesion_diameter(lesion_diameter_mm)
    rng = case_rng(seed, index) if rng is None else rng
    ct_grid, pet_grid = petct_grids(size, scanner)
    tissue, body, organs, suv, shift, build = _petct_anatomy(rng, ct_grid)
    z_limit = PETCT_FOV_MM[2] / 2 - PET_AXIAL_MARGIN_MM - 8.0
    label, les_hu, les_suv, lesions, owner = _petct_lesions(rng, ct_grid, tissue, body, organs, shift, build,
                                                            z_limit, diameter_mm)
    if not lesions:  # every case has at least one lesion: retry with a derived stream
        for attempt in range(1, 20):
            label, les_hu, les_suv, lesions, owner = _petct_lesions(
                np.random.default_rng(np.random.SeedSequence([seed, index, attempt])), ct_grid, tissue, body,
                organs, shift, build, z_limit, diameter_mm)
            if lesions:
                break
    texture = _noise_field(rng, ct_grid, 4.0)
    return PetctScene(scanner, ct_grid, pet_grid, tissue, suv, label, les_hu, les_suv, lesions, owner, texture)


def generate_petct_case(seed: int, index: int, size=None, scanner="default", lesion_diameter_mm=None):
    """One PET/CT phantom case: ``(ct, pet, label, info)``; images are SimpleITK images
    (CT int16 HU on the CT grid, PET float32 SUV on the PET grid, label uint8 on the CT grid).
    ``scanner`` (a name in :data:`SCANNERS` or a :class:`Scanner`) sets how it is imaged,
    ``lesion_diameter_mm`` the (min, max) of its lesions' diameters (default 6-45 mm)."""
    rng = case_rng(seed, index)
    scene = petct_scene(seed, index, size, scanner, rng=rng, lesion_diameter_mm=lesion_diameter_mm)
    scanner, ct_grid, pet_grid = scene.scanner, scene.ct_grid, scene.pet_grid

    # CT: tissue HU + texture, lesions, partial-volume blur, quantum noise
    ct = scene.ct_mean()
    ct += rng.normal(0.0, scanner.ct_noise_hu, size=ct.shape).astype(np.float32)
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)

    # PET: activity (SUV) on the CT grid, PSF blur, resampled onto the PET grid, noise, post-filter
    pet = scene.pet_acquire(scene.activity())
    pet = pet + rng.normal(0.0, 1.0, size=pet.shape).astype(np.float32) * scanner.pet_noise * np.sqrt(np.maximum(pet, 0))
    pet = np.maximum(scene.pet_post(pet), 0.0).astype(np.float32)

    info = {
        "lesions": scene.records,
        "organ_suv": {k: round(v, 3) for k, v in scene.suv.items()},
        "lesion_voxels": int(scene.label.sum()),
    }
    return ct_grid.image(ct), pet_grid.image(pet), ct_grid.image(scene.label.astype(np.uint8)), info


# --------------------------------------------------------------------------- MRI

# tissue index -> name and relative intensity in T1, T1ce, T2, FLAIR
_MRI_TISSUES = [
    ("air", (0.0, 0.0, 0.0, 0.0)),
    ("scalp", (0.95, 0.95, 0.65, 0.60)),
    ("skull", (0.12, 0.12, 0.08, 0.06)),
    ("csf", (0.22, 0.22, 1.00, 0.12)),
    ("gm", (0.52, 0.54, 0.62, 0.60)),
    ("wm", (0.72, 0.72, 0.42, 0.45)),
    ("edema", (0.45, 0.46, 0.85, 0.95)),
    ("necrosis", (0.28, 0.28, 0.95, 0.50)),
    ("enhancing", (0.55, 1.15, 0.70, 0.75)),
]
_M = {name: i for i, (name, _v) in enumerate(_MRI_TISSUES)}


def mri_grid(size=None) -> Grid:
    size = _check_size(size, "mri")
    return Grid.centred(size, tuple(f / n for f, n in zip(MRI_FOV_MM, size)))


#: MRI phantom anatomies: shapes, or the MNI152 template of an installed nilearn.
MRI_ANATOMIES = ("analytic", "mni152")
#: nilearn's copy of the ICBM 2009a nonlinear symmetric MNI152 template (1 mm; uint8): the
#: skull-stripped T1 and the grey- and white-matter probability maps (0-255).
MNI152_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}


def mni152_files() -> Dict[str, Path]:
    """The MNI152 template files inside the installed ``nilearn`` package (found, not imported:
    nilearn's own import is slow and nothing of it runs here). ConfigError if it is missing."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("MRI phantoms with --anatomy mni152 read the MNI152 template shipped in the nilearn "
                          "package, which is not installed: pip install nilearn (or pip install 'veloxseg[mni]')")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    files = {k: folder / name for k, name in MNI152_FILES.items()}
    for path in files.values():
        if not path.is_file():
            raise ConfigError(f"{path}: the MNI152 template file is missing from the installed nilearn package "
                              "(a nilearn without its bundled templates?); reinstall nilearn")
    return files


@functools.lru_cache(maxsize=1)
def _mni152_template():
    """``(fractions, centre, extent)``: the brain mask, grey and white matter as float32 SimpleITK
    images (0..1, MNI space in LPS mm), and the centre and size (mm, x y z) of the brain's bounding
    box; read once per process."""
    import SimpleITK as sitk

    out = {}
    for key, path in mni152_files().items():
        try:
            out[key] = sitk.ReadImage(str(path), sitk.sitkFloat32)
        except RuntimeError as e:
            raise ConfigError(f"{path}: cannot read the MNI152 template file: {str(e).strip().splitlines()[-1]}")
    brain = sitk.Cast(out.pop("t1") > 0, sitk.sitkFloat32)
    fractions = {"brain": brain, "gm": out["gm"] / 255.0, "wm": out["wm"] / 255.0}
    idx = np.argwhere(sitk.GetArrayFromImage(brain) > 0)[:, ::-1]  # (x, y, z) indices
    lo = np.array(brain.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx.min(0)]))
    hi = np.array(brain.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx.max(0)]))
    return fractions, (lo + hi) / 2, np.abs(hi - lo) + 1


def _generate_mni_case(seed: int, index: int, size=None):
    """An MRI case on the MNI152 brain: the template moved by a random similarity (scale 0.88-1.0
    with up to 3% more per axis, rotation up to about 5 degrees, shift up to 4 mm), partial-volume
    tissue fractions (CSF = the brain mask less grey and white matter), a tumour centred in white
    matter, and the contrasts of the analytic phantoms."""
    import SimpleITK as sitk

    fractions, brain_centre, extent = _mni152_template()
    rng = case_rng(seed, index)
    grid = mri_grid(size)
    fov = np.array(MRI_FOV_MM)
    scale = rng.uniform(0.88, 1.0) * rng.uniform(0.97, 1.03, size=3)
    scale = np.minimum(scale, (fov - 8.0) / extent)  # the brain stays inside the field of view
    rot = random_rotation(rng, 0.08)
    shift = rng.uniform(-4.0, 4.0, size=3)
    # grid point p -> template point diag(1 / scale) rot^T p + brain centre + shift: the brain is
    # scaled by `scale` along the template's axes, rotated by `rot` and centred in the field of view
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((np.diag(1.0 / scale) @ rot.T).ravel().tolist())
    transform.SetTranslation((brain_centre + shift).tolist())
    ref = grid.image(np.zeros(grid.shape, np.float32))
    f = {k: sitk.GetArrayFromImage(sitk.Resample(img, ref, transform, sitk.sitkLinear, 0.0))
         for k, img in fractions.items()}
    brain = f["brain"] >= 0.5
    gm = np.where(brain, f["gm"], 0.0)
    wm = np.where(brain, f["wm"], 0.0)
    over = np.maximum(gm + wm, 1.0)
    gm, wm = gm / over, wm / over
    csf = np.where(brain, 1.0 - gm - wm, 0.0)

    depth = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(  # mm to the brain's surface
        grid.image(brain.astype(np.uint8)), insideIsPositive=True, squaredDistance=False, useImageSpacing=True))
    deepest = float(depth.max())

    def place(reach):
        ok = (depth >= reach) & (wm >= 0.5)  # gliomas grow in white matter
        if not ok.any():
            ok = depth >= min(reach, deepest)
        k = np.argwhere(ok)[rng.integers(int(ok.sum()))][::-1] + rng.uniform(-0.5, 0.5, size=3)  # x, y, z
        return np.array(grid.origin) + k * np.array(grid.spacing)

    label, centre = _mri_tumour(rng, grid, 0.75 * deepest, place, brain)
    tumour = label > 0
    frac = np.zeros((len(_MRI_TISSUES),) + grid.shape, np.float32)
    frac[_M["gm"]], frac[_M["wm"]], frac[_M["csf"]] = gm, wm, csf
    frac[:, tumour] = 0.0
    for value, name in ((1, "necrosis"), (2, "edema"), (3, "enhancing")):
        frac[_M[name]][label == value] = 1.0
    images = _mri_contrasts(rng, grid, lambda lut: np.tensordot(lut, frac, axes=1), brain)
    info = {"anatomy": "mni152", "scale": [round(float(v), 4) for v in scale], **_tumour_info(label, centre)}
    return images, grid.image(label), info


def _mri_tumour(rng, grid: Grid, allowed: float, place, brain: np.ndarray):
    """The BraTS regions of one tumour: ``(label, centre)``, label 1 NCR, 2 edema, 3 ET inside
    ``brain``. A tumour core (TC) star shape, its enhancing rim (ET) around a necrotic core (NCR),
    edema (WT) grown from TC by at least a margin. ``allowed`` bounds the reach of the core plus
    its margin (mm); ``place(reach)`` draws a centre whose ball of radius ``reach`` lies in the
    brain."""
    h = max(grid.spacing)
    rim = max(4.0, 2.5 * h)
    margin = max(4.0, 3.0 * h)
    r_tc = rng.uniform(max(8.0, rim / 0.45), max(22.0, rim / 0.45 + 4))
    r_tc = min(r_tc, (allowed - margin) / (1.15 * 1.25))
    tc_semi = r_tc * rng.uniform(0.85, 1.15, size=3)
    tc_lobes = random_lobes(rng, 3, 0.07)
    r_wt = r_tc * rng.uniform(1.3, 2.0) + margin
    wt_stretch = rng.uniform(0.8, 1.2, size=3)
    wt_lobes = random_lobes(rng, 3, 0.1)
    wt_offset = rng.uniform(-0.3, 0.3, size=3)
    tc_reach = float(np.max(tc_semi)) * 1.25 + margin

    def wt_reach(r):
        return float(np.max(r * wt_stretch)) * (1 + float(np.abs(wt_lobes[:, 3]).sum())) + 0.52 * (r - r_tc)

    while wt_reach(r_wt) > allowed and r_wt > r_tc:
        r_wt *= 0.95
    wt_semi = r_wt * wt_stretch
    centre = place(tc_reach)  # edema may be cut by the brain surface; the core and its margin may not
    tc = Shape(centre, tc_semi, random_rotation(rng), tc_lobes)
    rmin_tc = float(np.min(tc_semi)) * (1 - float(np.abs(tc_lobes[:, 3]).sum()))
    ncr_level = min(1.0 - rim / rmin_tc, rng.uniform(0.3, 0.75))
    wt = Shape(centre + wt_offset * (r_wt - r_tc), wt_semi, random_rotation(rng), wt_lobes)
    label = np.zeros(grid.shape, np.uint8)
    _paint(label, grid, wt, 2)
    _paint(label, grid, tc, 2, outer=1.0 + margin / rmin_tc)
    label[~brain] = 0
    _paint(label, grid, tc, 3)
    _paint(label, grid, tc, 1, outer=ncr_level)
    return label, centre


def _tumour_info(label: np.ndarray, centre) -> dict:
    """A case's record of its tumour: centre (mm) and voxels per region."""
    return {"tumour_centre_mm": [round(float(v), 2) for v in centre],
            "voxels": {"NCR": int((label == 1).sum()), "edema": int((label == 2).sum()), "ET": int((label == 3).sum())}}


def _mri_contrasts(rng, grid: Grid, mix, inside: np.ndarray):
    """T1, T1ce, T2 and FLAIR images: ``mix(lut)`` gives the noise-free image for a per-tissue
    intensity table (indices of ``_MRI_TISSUES``); then a texture shared by the contrasts, a slight
    blur, a bias field, Rician noise and a scanner scale per contrast; 0 outside ``inside``."""
    h = max(grid.spacing)
    texture = 1.0 + 0.03 * _noise_field(rng, grid, 3.0)  # tissue texture, shared by the contrasts
    images = []
    for c, _name in enumerate(MRI_CHANNELS):
        lut = np.array([v[c] for _n, v in _MRI_TISSUES], np.float32) * rng.uniform(0.95, 1.05, len(_MRI_TISSUES))
        img = mix(lut) * texture
        img = _smooth(img, grid, 0.5 * h)
        bias = _bias_field(rng, grid, 0.12)
        sigma = 0.02 * float(lut[_M["wm"]])
        n1 = rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
        n2 = rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
        img = np.sqrt((img * bias + n1) ** 2 + n2 ** 2) * rng.uniform(300, 1500)
        img[~inside] = 0.0
        images.append(grid.image(img.astype(np.float32)))
    return images


def generate_mri_case(seed: int, index: int, size=None, anatomy: str = "analytic"):
    """One brain MRI phantom case: ``([t1, t1ce, t2, flair], label, info)`` as SimpleITK images
    on one grid (float32; air exactly 0), label uint8 with 1 NCR, 2 edema, 3 ET. ``anatomy``
    ``"analytic"`` draws a head (scalp, skull, CSF, grey and white matter) from shapes;
    ``"mni152"`` takes a skull-stripped brain from the MNI152 template (:func:`mni152_files`)."""
    if anatomy not in MRI_ANATOMIES:
        raise ConfigError(f"MRI anatomy must be one of {', '.join(MRI_ANATOMIES)}, got {anatomy!r}")
    if anatomy == "mni152":
        return _generate_mni_case(seed, index, size)
    rng = case_rng(seed, index)
    grid = mri_grid(size)
    h = max(grid.spacing)
    s = rng.uniform(0.93, 1.05)
    head_c = np.array([rng.uniform(-3, 3), 5 + rng.uniform(-3, 3), -5 + rng.uniform(-3, 3)])
    head_semi = np.array([70 * s, 86 * s, 75 * s])
    head = _ellipsoid(head_c, head_semi, random_rotation(rng, 0.08))
    tissue = np.zeros(grid.shape, np.uint8)
    _paint(tissue, grid, head, _M["scalp"])
    _paint(tissue, grid, head, _M["skull"], outer=0.94)
    _paint(tissue, grid, head, _M["csf"], outer=0.86)
    brain_level = 0.82
    # cortex / white matter boundary perturbed by a smooth field (gyri-ish)
    _box, f_head = head.level(grid)
    f = np.full(grid.shape, 9.0, np.float32)
    f[_box] = f_head
    folds = _noise_field(rng, grid, 4.0)
    brain = f <= brain_level
    tissue[brain] = _M["gm"]
    tissue[f <= 0.70 + 0.045 * folds] = _M["wm"]
    for side in (-1, 1):  # deep grey matter, ventricles
        _paint(tissue, grid, _ellipsoid(head_c + [side * 20 * s, 0, 0], [12, 18, 11], random_rotation(rng, 0.2)),
               _M["gm"])
        _paint(tissue, grid, _ellipsoid(head_c + [side * 9 * s, -2, 12], [6, 26 * s, 10], random_rotation(rng, 0.15)),
               _M["csf"])
    x, _y, z = grid.coords()
    falx = (np.abs(x - head_c[0]) < 0.6 * h) & (z > head_c[2] - 10) & brain
    tissue[falx] = _M["csf"]

    # the tumour core plus its edema margin must fit in the brain: with E the brain's semi-axes,
    # a centre c with |c|_E <= 1 - reach / min(E) keeps the ball of radius `reach` around c inside
    e = head_semi * brain_level * 0.97

    def place(reach):
        u = rng.normal(size=3)
        u = u / np.linalg.norm(u) * rng.uniform(0.1, 1.0) ** (1 / 3)
        u[0] = abs(u[0]) * (1 if rng.random() < 0.5 else -1)
        return head_c + head.rot @ (u * e * max(0.0, 1.0 - reach / float(np.min(e))))

    label, centre = _mri_tumour(rng, grid, 0.75 * float(np.min(e)), place, brain)
    tissue[label == 2] = _M["edema"]
    tissue[label == 3] = _M["enhancing"]
    tissue[label == 1] = _M["necrosis"]
    images = _mri_contrasts(rng, grid, lambda lut: lut[tissue], tissue > 0)
    return images, grid.image(label), _tumour_info(label, centre)


# --------------------------------------------------------------------------- datasets


def _write_case(job) -> Tuple[str, dict]:
    """Generate and write case ``index`` into the dataset folder being built (a process-pool job)."""
    from .nnunet import IMAGES_DIR, LABELS_DIR, image_file_name, write_image

    tmp, kind, seed, index, size, scanner, anatomy, diameter = job
    case = f"{kind}_{index:04d}"
    if kind == "petct":
        ct, pet, label, info = generate_petct_case(seed, index, size, scanner_named(scanner), diameter)
        images = [ct, pet]
    else:
        images, label, info = generate_mri_case(seed, index, size, anatomy)
    for c, img in enumerate(images):
        write_image(img, tmp / IMAGES_DIR / image_file_name(case, c))
    write_image(label, tmp / LABELS_DIR / f"{case}.nii.gz")
    return case, info


def write_phantom_dataset(
    output,
    kind: str,
    n: int,
    seed: int = 0,
    size: Optional[Sequence[int]] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    scanner: str = "default",
    workers: int = 1,
    anatomy: str = "analytic",
    lesion_diameter_mm: Optional[Sequence[float]] = None,
) -> dict:
    """Write ``n`` phantom cases of ``kind`` as an nnU-Net raw dataset at ``output``
    (atomically: a temporary folder renamed at the end). Returns the dataset.json written.
    ``scanner`` (PET/CT only, a name in :data:`SCANNERS`) sets how the cases are imaged,
    ``anatomy`` (MRI only, one of :data:`MRI_ANATOMIES`) what they show,
    ``lesion_diameter_mm`` (PET/CT only, (min, max) in mm) how large the lesions are drawn.
    ``workers`` > 1 generates cases in that many processes; a case depends only on
    ``(seed, index)``, so the files are the same bytes whatever the number of workers."""
    from .nnunet import IMAGES_DIR, LABELS_DIR, atomic_directory, make_dataset_json, write_dataset_json

    _check_kind(kind)
    size = _check_size(size, kind)
    if kind != "petct" and scanner != "default":
        raise ConfigError(f"scanner profiles are for PET/CT phantoms; {kind} phantoms have none")
    if anatomy not in MRI_ANATOMIES:
        raise ConfigError(f"MRI anatomy must be one of {', '.join(MRI_ANATOMIES)}, got {anatomy!r}")
    if kind != "mri" and anatomy != "analytic":
        raise ConfigError(f"--anatomy {anatomy} is for MRI phantoms; {kind} phantoms are analytic")
    if lesion_diameter_mm is not None and kind != "petct":
        raise ConfigError(f"a lesion diameter range is for PET/CT phantoms; {kind} phantoms draw their tumour "
                          f"to fit the brain")
    diameter = check_lesion_diameter(lesion_diameter_mm)
    if anatomy == "mni152":
        mni152_files()  # a missing nilearn is refused before any folder is made
    scanner = scanner_named(scanner)
    if n < 1:
        raise ConfigError(f"number of cases must be at least 1, got {n}")
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    channels = PETCT_CHANNELS if kind == "petct" else MRI_CHANNELS
    labels = PETCT_LABELS if kind == "petct" else MRI_LABELS
    if int(workers) < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    workers = min(int(workers), n)
    cases = {}
    with atomic_directory(output, overwrite=overwrite) as tmp:
        (tmp / IMAGES_DIR).mkdir()
        (tmp / LABELS_DIR).mkdir()
        jobs = [(tmp, kind, seed, i, size, scanner.name, anatomy, diameter) for i in range(n)]
        if workers == 1:
            results = map(_write_case, jobs)
            pool = None
        else:
            import concurrent.futures as cf
            import multiprocessing as mp

            # spawn: a forked copy of a process that already runs torch threads can deadlock
            pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
            results = pool.map(_write_case, jobs)  # in index order, computed ahead
        try:
            for i, (case, info) in enumerate(results):
                cases[case] = info
                if progress is not None:
                    progress(i + 1, n)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        data = make_dataset_json(
            list(channels), labels, n,
            name=f"VeloxSeg {kind} phantoms",
            description=("Synthetic phantoms generated by `veloxseg phantom` (analytic anatomy, "
                         "not patient data)." if anatomy == "analytic" else
                         "Synthetic phantoms generated by `veloxseg phantom` on the MNI152 2009a brain template "
                         "(from nilearn) with synthetic tumours, not patient data."),
            veloxseg_phantom={"kind": kind, "seed": int(seed), "size": list(size), "version": PHANTOM_VERSION,
                              **({"scanner": scanner.name, "scanner_description": scanner.description}
                                 if kind == "petct" else {}),
                              **({"anatomy": anatomy} if anatomy != "analytic" else {}),
                              **({"lesion_diameter_mm": list(diameter)} if diameter != LESION_DIAMETER_MM else {}),
                              "cases": cases},
        )
        write_dataset_json(tmp, data)
    return data
