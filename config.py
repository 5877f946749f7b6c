"""INI configuration, compatible with the original NextFace ``optimConfig.ini``.

A config file is a flat list of ``key = value`` lines with ``#`` comments (also inline).
Values are Python-like literals: ``'cuda'``, ``True``, ``512``, ``0.001``. Every key of the
NextFace file is accepted with its meaning; a few keys of our own are added (``model``,
``landmarksAssociation``, ``integrator``, ``seed``, ...). Unknown keys and bad values raise
``ConfigError`` naming the key and what is accepted.
"""
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says how to fix it."""


def _between(low, high) -> dict:
    """Field metadata: a number in [low, high] (finite)."""
    return dict(range=(low, high))


def _number(value) -> str:
    return str(int(value)) if float(value).is_integer() else f'{value:g}'


MAX_ITERATIONS = 1_000_000
MAX_WEIGHT = 1e9


@dataclass
class Config:
    # compute device: 'cpu' (Mitsuba llvm_ad_rgb) or 'cuda' (Mitsuba cuda_ad_rgb)
    device: str = field(default='cpu', metadata=dict(choices=('cpu', 'cuda')))
    # 2D landmark detector
    lamdmarksDetectorType: str = field(default='mediapipe', metadata=dict(choices=('mediapipe', 'fan')))
    # which face where a photo shows several: 0 the largest, K the K-th from the left
    face: int = field(default=0, metadata=_between(0, 100))
    # morphable model: 'bfm2017' (Basel 2017 + AlbedoMM), 'ict' (ICT-FaceKit) or 'flame' (FLAME 2020/2023)
    model: str = field(default='bfm2017', metadata=dict(choices=('bfm2017', 'ict', 'flame')))
    path: str = field(default='./baselMorphableModel',
                      metadata=dict(check=lambda v: v.strip() != '', accepts='the folder of the model files'))
    # optional NextFace-format landmark association file (iBUG index, vertex index per line)
    landmarksAssociation: str = ''
    textureResolution: int = field(default=512, metadata=dict(choices=(256, 512, 1024, 2048)))
    trimPca: bool = False
    # spherical harmonics
    bands: int = field(default=9, metadata=_between(1, 16))
    envMapRes: int = field(default=64, metadata=_between(8, 1024))
    smoothSh: bool = False
    saveExr: bool = False
    # the base colour of head{i}.glb and map_Kd of mesh{i}.mtl: the fitted 'diffuse' map, or the 'photo' projected into UV space
    exportTexture: str = field(default='diffuse', metadata=dict(choices=('diffuse', 'photo')))
    # image
    maxResolution: int = field(default=256, metadata=_between(64, 4096))
    # camera: focal length in pixels of the fitted image
    camFocalLength: float = field(default=3000.0, metadata=_between(1.0, 1e6))
    optimizeFocalLength: bool = True
    # optimization
    iterStep1: int = field(default=2000, metadata=_between(0, MAX_ITERATIONS))
    iterStep2: int = field(default=400, metadata=_between(0, MAX_ITERATIONS))
    iterStep3: int = field(default=100, metadata=_between(0, MAX_ITERATIONS))
    weightLandmarksLossStep2: float = field(default=0.001, metadata=_between(0.0, MAX_WEIGHT))
    weightLandmarksLossStep3: float = field(default=0.001, metadata=_between(0.0, MAX_WEIGHT))
    weightShapeReg: float = field(default=0.001, metadata=_between(0.0, MAX_WEIGHT))
    weightExpressionReg: float = field(default=0.001, metadata=_between(0.0, MAX_WEIGHT))
    weightAlbedoReg: float = field(default=0.001, metadata=_between(0.0, MAX_WEIGHT))
    weightDiffuseSymmetryReg: float = field(default=3.0, metadata=_between(0.0, MAX_WEIGHT))
    weightDiffuseConsistencyReg: float = field(default=100.0, metadata=_between(0.0, MAX_WEIGHT))
    weightDiffuseSmoothnessReg: float = field(default=0.001, metadata=_between(0.0, MAX_WEIGHT))
    weightSpecularSymmetryReg: float = field(default=2.0, metadata=_between(0.0, MAX_WEIGHT))
    weightSpecularConsistencyReg: float = field(default=2.0, metadata=_between(0.0, MAX_WEIGHT))
    weightSpecularSmoothnessReg: float = field(default=0.001, metadata=_between(0.0, MAX_WEIGHT))
    weightRoughnessSymmetryReg: float = field(default=200.0, metadata=_between(0.0, MAX_WEIGHT))
    weightRoughnessConsistencyReg: float = field(default=0.0, metadata=_between(0.0, MAX_WEIGHT))
    weightRoughnessSmoothnessReg: float = field(default=0.002, metadata=_between(0.0, MAX_WEIGHT))
    # pixels whose residual after the least-squares start and after stage 2 exceeds this many times
    # the face's median residual, in large connected regions, are left out of the fit (0: none)
    outlierThreshold: float = field(default=4.0, metadata=_between(0.0, 1000.0))
    # debug
    debugFrequency: int = field(default=0, metadata=_between(0, MAX_ITERATIONS))
    saveIntermediateStage: bool = False
    verbose: bool = False
    # ray tracing
    rtSamples: int = field(default=500, metadata=_between(1, 65536))
    rtTrainingSamples: int = field(default=8, metadata=_between(1, 4096))
    # samples per pixel of stages 2 and 3 (0: rtTrainingSamples, as in NextFace)
    rtTrainingSamplesStep2: int = field(default=0, metadata=_between(0, 4096))
    rtTrainingSamplesStep3: int = field(default=0, metadata=_between(0, 4096))
    # 'prb' (no silhouette gradients) or 'prb_projective' (silhouette gradients, ~4x slower;
    # see renderer.INTEGRATORS)
    integrator: str = field(default='prb', metadata=dict(choices=('prb', 'prb_projective')))
    seed: int = field(default=0, metadata=_between(0, 2 ** 31 - 1))
    # video: photometric steps per frame after the landmark fit, on a square of the face this many px
    videoPhotometricSteps: int = field(default=2, metadata=_between(0, 1000))
    videoResolution: int = field(default=128, metadata=_between(32, 1024))
    # a Ray cluster's worker (--ray) takes this many CPUs (with device = 'cuda': one GPU instead)
    clusterCpus: int = field(default=2, metadata=_between(1, 256))

    def replace(self, **overrides) -> 'Config':
        """A copy with ``overrides`` applied and validated."""
        config = dataclasses.replace(self)
        for key, value in overrides.items():
            setattr(config, key, _validated(key, value))
        return config


# NextFace config files use these names for the same keys.
ALIASES = {'tracker': 'lamdmarksDetectorType'}

_FIELDS = {f.name: f for f in fields(Config)}


def _strip_comment(line: str) -> str:
    """Drop a ``#`` comment that is not inside quotes."""
    quote = None
    for i, char in enumerate(line):
        if char in '\'"':
            quote = None if quote == char else (quote or char)
        elif char == '#' and quote is None:
            return line[:i]
    return line


def _parse_literal(text: str):
    """``'cuda'`` -> str, ``True`` -> bool, ``3`` -> int, ``0.5`` -> float, bare words -> str."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"':
        return text[1:-1]
    if text in ('True', 'true'):
        return True
    if text in ('False', 'false'):
        return False
    for number_type in (int, float):
        try:
            return number_type(text)
        except ValueError:
            pass
    return text


def _validated(key: str, value):
    """Coerce ``value`` to the type of ``key`` and check its range; raise ``ConfigError`` if bad."""
    key = ALIASES.get(key, key)
    if key not in _FIELDS:
        raise ConfigError(f"unknown config key '{key}'; known keys: {', '.join(sorted(_FIELDS))}")
    spec = _FIELDS[key]
    expected = spec.type
    meta = spec.metadata
    if isinstance(value, str):
        value = _parse_literal(value)
    accepts = meta.get('accepts') or (
        f"one of {', '.join(repr(c) for c in meta['choices'])}" if 'choices' in meta else
        f"{'an integer' if expected is int else 'a number'} from {_number(meta['range'][0])} to {_number(meta['range'][1])}"
        if 'range' in meta else 'True or False' if expected is bool else f'a {expected.__name__}')
    try:
        if expected is bool:
            if not isinstance(value, bool):
                raise TypeError
        elif expected is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            value = int(value)
        elif expected is float:
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
        elif expected is str:
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' = {value!r} is not valid: expected {accepts}") from None
    if 'choices' in meta and value not in meta['choices']:
        raise ConfigError(f"config key '{key}' = {value!r} is not valid: expected {accepts}")
    if 'check' in meta and not meta['check'](value):
        raise ConfigError(f"config key '{key}' = {value!r} is not valid: expected {accepts}")
    if 'range' in meta and not (math.isfinite(value) and meta['range'][0] <= value <= meta['range'][1]):
        raise ConfigError(f"config key '{key}' = {value!r} is not valid: expected {accepts}")
    return value


def parse_config_text(text: str, source: str = '<config>') -> Config:
    """Parse the text of an INI config into a ``Config``; keys left out keep their defaults."""
    values = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw_line).strip()
        if not line or line.startswith('['):  # allow an optional [section] header
            continue
        if '=' not in line:
            raise ConfigError(f"{source}:{number}: expected 'key = value', got {raw_line.strip()!r}")
        key, value = (part.strip() for part in line.split('=', 1))
        try:
            values[ALIASES.get(key, key)] = _validated(key, value)
        except ConfigError as error:
            raise ConfigError(f'{source}:{number}: {error}') from None
    return Config(**values)


def parse_overrides(items: list) -> dict:
    """``KEY=VALUE`` strings (``--set``) -> {key: value text}, validated by ``Config.replace``."""
    overrides = {}
    for item in items:
        if '=' not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set textureResolution=1024")
        key, value = item.split('=', 1)
        overrides[key.strip()] = value.strip()
    return overrides


def load_config(path: str | None = None) -> Config:
    """Read the config file at ``path`` (``None``: the built-in defaults)."""
    if path is None:
        return Config()
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found; pass an existing file to --config")
    try:
        with open(path, encoding='utf-8') as file:
            text = file.read()
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not a text file of 'key = value' lines: pass an .ini config "
                          f"(like optimConfig.ini) to --config") from None
    except OSError as error:
        raise ConfigError(f"config file '{path}' cannot be read ({error.strerror})") from None
    if '\x00' in text:
        raise ConfigError(f"config file '{path}' is not a text file of 'key = value' lines: pass an .ini config "
                          f"(like optimConfig.ini) to --config")
    return parse_config_text(text, source=path)
