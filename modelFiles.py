"""The files of the face models: Basel Face Model 2017 with AlbedoMM (HDF5), and ICT-FaceKit
(OBJs in its original layout), read into ``MorphableModel``s (and cached: see ``morphableModel``).
A missing or damaged file stops with a ``ModelFileError`` that says where to get a good one.
"""
import codecs
import glob
import json
import os
import pickle

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import scipy.spatial
import torch

import utils
from config import Config
from morphableModel import (HEAD_PARTS, ModelFileError, MorphableModel, cached, canonical_model, face_uv_map,
                            landmark_points, vertex_landmarks)

BFM_FILE = 'model2017-1_face12_nomouth.h5'
ALBEDO_FILE = 'albedoModel2020_face12_albedoPart.h5'
BFM_URL = 'https://faces.dmi.unibas.ch/bfm/bfm2017.html'
ALBEDO_URL = 'https://github.com/waps101/AlbedoMM/releases/tag/v1.0'
ICT_URL = 'https://github.com/ICT-VGL/ICT-FaceKit'

# iBUG-68 indices of the named landmarks in the BFM 2017 file (`metadata/landmarks/json`).
# "right"/"left" are the subject's sides; iBUG 36 is the subject's right outer eye corner.
BFM_NAMED_LANDMARKS = {
    'center.chin.tip': 8,
    'right.eyebrow.bend.lower': 19, 'right.eyebrow.inner_lower': 21,
    'left.eyebrow.inner_lower': 22, 'left.eyebrow.bend.lower': 24,
    'center.nose.tip': 30, 'right.nose.wing.tip': 31, 'left.nose.wing.tip': 35,
    'right.eye.corner_outer': 36, 'right.eye.corner_inner': 39,
    'left.eye.corner_inner': 42, 'left.eye.corner_outer': 45,
    'right.lips.corner': 48, 'center.lips.upper.outer': 51, 'left.lips.corner': 54,
    'center.lips.lower.outer': 57, 'center.lips.upper.inner': 62, 'center.lips.lower.inner': 66,
}

# ICT-FaceKit: the "narrow face area" (vertices [0, 6706), polygons [0, 6560)). The fit uses the
# face skin only: eyeballs, teeth, mouth socket and the back of the head have no albedo prior
# and are mostly hidden or hair-covered in photos, so they would only add wrong pixels to the
# photometric loss. All 68 ICT landmark vertices lie inside this area. The whole head is the
# model's ``head`` (exported with the fitted coefficients).
ICT_FACE_VERTICES = 6706
ICT_FACE_POLYGONS = 6560
# Models without an albedo model (ICT-FaceKit, FLAME without a texture space) fit one skin
# reflectance (linear RGB) about these values (see ``global_skin``).
SKIN_MEAN_DIFFUSE = (0.45, 0.30, 0.23)
SKIN_DIFFUSE_STD = 0.12
SKIN_MEAN_SPECULAR = 0.04
SKIN_SPECULAR_STD = 0.03
# ICT-FaceKit's materials (``usemtl`` of its OBJ) -> parts.
ICT_MATERIAL_PARTS = {
    'M_Face': 'face', 'M_BackHead': 'back_of_head', 'M_GumsTongue': 'mouth', 'M_Teeth': 'teeth',
    'M_ScleraLeft': 'sclera', 'M_ScleraRight': 'sclera', 'M_IrisLeft': 'iris', 'M_IrisRight': 'iris',
    'M_LacrimalFluid': 'lacrimal_fluid', 'M_EyeBlend': 'eye_blend', 'M_EyeOcclusion': 'eye_occlusion',
    'M_EyeLashes': 'eyelashes'}


# ------------------------------------------------------------------------------ Basel 2017

def _require_file(path: str, what: str, where: str) -> None:
    if not os.path.isfile(path):
        raise ModelFileError(
            f"{what} not found at '{path}'. Download it from {where} and put it in that folder "
            f"(or set the config key 'path' to the folder that holds it).")


def _read_pca(group, name: str, path: str):
    """An h5py group with ``model/mean`` [3N], ``model/pcaBasis`` [3N, K], ``model/pcaVariance`` [K]
    -> mean [N, 3], σ-scaled basis [K, N, 3]."""
    try:
        mean = np.asarray(group['model/mean'], dtype=np.float32)
        basis = np.asarray(group['model/pcaBasis'], dtype=np.float32)
        variance = np.asarray(group['model/pcaVariance'], dtype=np.float32)
    except KeyError as error:
        raise ModelFileError(f"'{path}' has no {name}/model/{{mean,pcaBasis,pcaVariance}} ({error}); "
                             f"it is not the expected model file: download it again") from None
    if basis.ndim != 2 or basis.shape[0] != mean.shape[0] or basis.shape[1] != variance.shape[0]:
        raise ModelFileError(f"'{path}': {name} has inconsistent sizes mean {mean.shape}, "
                             f"pcaBasis {basis.shape}, pcaVariance {variance.shape}")
    scaled = basis * np.sqrt(np.maximum(variance, 0.0))[None, :]
    return mean.reshape(-1, 3), scaled.T.reshape(len(variance), -1, 3)


def _open_h5(path: str):
    import h5py  # here, not at the top: it maps about 12 MB of HDF5's libraries, which a fit from the cache never needs
    try:
        return h5py.File(path, 'r')
    except OSError as error:
        raise ModelFileError(f"'{path}' is not a readable HDF5 file ({error}); it may be truncated: "
                             f"download it again") from None


def _bfm_landmarks(h5file, mean_shape_bfm: np.ndarray, association_file: str) -> np.ndarray:
    """[68] vertex indices: from a NextFace association file, else the named landmarks in the file."""
    if association_file:
        return read_landmark_association(association_file, len(mean_shape_bfm))
    landmarks = np.full(68, -1, dtype=np.int64)
    if 'metadata/landmarks/json' not in h5file:
        return landmarks
    raw = h5file['metadata/landmarks/json'][()]
    points = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    for point in points:
        ibug = BFM_NAMED_LANDMARKS.get(point.get('id'))
        if ibug is not None:
            distances = np.linalg.norm(mean_shape_bfm - np.asarray(point['coordinates'], np.float32), axis=1)
            landmarks[ibug] = int(np.argmin(distances))
    return landmarks


def read_landmark_association(path: str, n_vertices: int) -> np.ndarray:
    """NextFace format: one ``iBUGindex<TAB><TAB>vertexIndex`` line per point -> [68] (-1: none)."""
    if not os.path.isfile(path):
        raise ModelFileError(f"landmark association file '{path}' not found (config key landmarksAssociation)")
    landmarks = np.full(68, -1, dtype=np.int64)
    with open(path, encoding='utf-8') as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                ibug, vertex = (int(part) for part in line.split())
            except ValueError:
                raise ModelFileError(f"{path}:{number}: expected 'iBUGindex<TAB><TAB>vertexIndex'") from None
            if not (0 <= ibug < 68 and 0 <= vertex < n_vertices):
                raise ModelFileError(f'{path}:{number}: index out of range (iBUG 0..67, vertex 0..{n_vertices - 1})')
            landmarks[ibug] = vertex
    return landmarks


def _build_bfm(folder: str, association_file: str) -> MorphableModel:
    shape_path, albedo_path = os.path.join(folder, BFM_FILE), os.path.join(folder, ALBEDO_FILE)
    with _open_h5(shape_path) as h5:
        mean_shape, shape_basis = _read_pca(h5['shape'] if 'shape' in h5 else h5, 'shape', shape_path)
        expression_mean, expression_basis = _read_pca(
            h5['expression'] if 'expression' in h5 else h5, 'expression', shape_path)
        try:
            faces = np.asarray(h5['shape/representer/cells'], dtype=np.int64).T
        except KeyError:
            raise ModelFileError(f"'{shape_path}' has no shape/representer/cells: not a BFM 2017 file") from None
        landmarks = _bfm_landmarks(h5, mean_shape, association_file)
    with _open_h5(albedo_path) as h5:
        diffuse_mean, diffuse_basis = _read_pca(h5['diffuseAlbedo'], 'diffuseAlbedo', albedo_path)
        specular_mean, specular_basis = _read_pca(h5['specularAlbedo'], 'specularAlbedo', albedo_path)
    if len(diffuse_mean) != len(mean_shape) or len(expression_mean) != len(mean_shape):
        raise ModelFileError(f'vertex counts differ: shape {len(mean_shape)}, expression '
                             f'{len(expression_mean)}, albedo {len(diffuse_mean)}: use the face12 files of both')
    return canonical_model('bfm2017', mean_shape + expression_mean, shape_basis, expression_basis,
                            faces, None, None, vertex_landmarks(landmarks), diffuse_mean, diffuse_basis,
                            specular_mean, specular_basis)


def load_bfm2017(folder: str, association_file: str = '') -> MorphableModel:
    """Basel Face Model 2017 (face12, no mouth) with the AlbedoMM albedo model, from ``folder``."""
    shape_path, albedo_path = os.path.join(folder, BFM_FILE), os.path.join(folder, ALBEDO_FILE)
    _require_file(shape_path, 'Basel Face Model 2017 file ' + BFM_FILE, BFM_URL + ' (after a license form)')
    _require_file(albedo_path, 'AlbedoMM file ' + ALBEDO_FILE, ALBEDO_URL)
    sources = [shape_path, albedo_path] + _association_sources(association_file)
    return cached(sources, 'bfm2017', lambda: _build_bfm(folder, association_file),
                   f"the Basel model files in '{folder}'", 'download them again')


def _association_sources(association_file: str) -> list:
    """[the landmark association file] if one is configured (it must exist), else []."""
    if association_file and not os.path.isfile(association_file):
        raise ModelFileError(f"landmark association file '{association_file}' not found (config key "
                             f"landmarksAssociation): give the path of an existing file, or leave the key empty")
    return [association_file] if association_file else []


# ---------------------------------------------------------------------------------- ICT-FaceKit

def read_obj(path: str):
    """A Wavefront OBJ -> positions [V, 3], uvs [U, 2] (or empty), faces as lists of (v, vt)
    pairs, and the material (``usemtl``) of each face."""
    positions, uvs, faces, materials, material = [], [], [], [], ''
    with open(path, encoding='utf-8') as file:
        for line in file:
            if line.startswith('v '):
                positions.append(line[2:])
            elif line.startswith('vt '):
                uvs.append(line[3:])
            elif line.startswith('f '):
                corners = [corner.split('/') for corner in line.split()[1:]]
                faces.append([(int(c[0]) - 1, int(c[1]) - 1 if len(c) > 1 and c[1] else -1) for c in corners])
                materials.append(material)
            elif line.startswith('usemtl '):
                material = line.split()[1]
    as_array = lambda rows, width: (np.array(' '.join(rows).split(), dtype=np.float32).reshape(-1, width)
                                    if rows else np.zeros((0, width), np.float32))
    return as_array(positions, 3), as_array([' '.join(r.split()[:2]) for r in uvs], 2), faces, materials


def _read_obj_positions(path: str, n_vertices: int) -> np.ndarray:
    """The positions of an OBJ [n_vertices, 3] that must have ``n_vertices`` (fast path for blendshapes)."""
    with open(path, encoding='utf-8') as file:
        rows = [line[2:] for line in file if line.startswith('v ')]
    if len(rows) != n_vertices:
        raise ModelFileError(f"'{path}' has {len(rows)} vertices, expected {n_vertices}: "
                             f"download ICT-FaceKit again from {ICT_URL}")
    return np.array(' '.join(rows).split(), dtype=np.float32).reshape(n_vertices, 3)


def _triangulate(polygons: list) -> tuple:
    """Fan-triangulate polygons -> faces [T, 3], uv_faces [T, 3], the polygon of each triangle [T]."""
    faces, uv_faces, polygon_of = [], [], []
    for index, polygon in enumerate(polygons):
        for k in range(1, len(polygon) - 1):
            corners = (polygon[0], polygon[k], polygon[k + 1])
            faces.append([c[0] for c in corners])
            uv_faces.append([c[1] for c in corners])
            polygon_of.append(index)
    return np.array(faces, np.int64), np.array(uv_faces, np.int64), np.array(polygon_of, np.int64)


def _build_ict(model_folder: str, association_file: str) -> MorphableModel:
    with open(os.path.join(model_folder, 'vertex_indices.json'), encoding='utf-8') as file:
        indices = json.load(file)
    neutral, uvs, polygons, materials = read_obj(os.path.join(model_folder, 'generic_neutral_mesh.obj'))
    head_faces, head_uv_faces, polygon_of = _triangulate(polygons)
    in_face = polygon_of < ICT_FACE_POLYGONS  # the narrow face area that is fitted
    faces, uv_faces = head_faces[in_face], head_uv_faces[in_face]
    if faces.max() >= ICT_FACE_VERTICES or (head_uv_faces < 0).any():
        raise ModelFileError(f"'{model_folder}' does not have the ICT-FaceKit topology ({ICT_URL})")
    used_uvs = np.unique(uv_faces)  # keep only the face area's UVs
    uv_faces = np.searchsorted(used_uvs, uv_faces)
    identity_files = sorted(glob.glob(os.path.join(model_folder, 'identity[0-9][0-9][0-9].obj')))
    if not identity_files:
        raise ModelFileError(f"no identityNNN.obj in '{model_folder}': download ICT-FaceKit from {ICT_URL}")
    read_delta = lambda path: _read_obj_positions(path, len(neutral)) - neutral
    head_shape_basis = np.stack([read_delta(path) for path in identity_files])
    head_expression_basis = np.stack([read_delta(os.path.join(model_folder, name + '.obj'))
                                      for name in indices['fitting_expressions']])
    parts = np.array([HEAD_PARTS.index(ICT_MATERIAL_PARTS.get(materials[p], 'face')) for p in polygon_of])
    to_mm = 10.0  # ICT is in centimetres
    head = dict(mean_shape=neutral * to_mm, shape_basis=head_shape_basis * to_mm,
                expression_basis=head_expression_basis * to_mm, faces=head_faces, uvs=uvs,
                uv_faces=head_uv_faces, parts=parts)
    n = ICT_FACE_VERTICES
    neutral, shape_basis, expression_basis = neutral[:n], head_shape_basis[:, :n], head_expression_basis[:, :n]
    if association_file:
        landmarks = read_landmark_association(association_file, ICT_FACE_VERTICES)
    else:
        landmarks = np.asarray(indices['idx_to_landmark_verts'], np.int64)
    return canonical_model(
        'ict', neutral * to_mm, shape_basis * to_mm, expression_basis * to_mm, faces,
        uvs[used_uvs], uv_faces, vertex_landmarks(landmarks), *global_skin(n), head, indices['fitting_expressions'])


def global_skin(n: int) -> tuple:
    """The reflectance of a model without an albedo model, for ``n`` vertices: one skin colour
    (a mode per channel) and one specular level (on the first mode) -> (diffuse mean [n, 3],
    diffuse basis [3, n, 3], specular mean [n, 3], specular basis [3, n, 3])."""
    diffuse_basis = np.zeros((3, n, 3), np.float32)
    for channel in range(3):
        diffuse_basis[channel, :, channel] = SKIN_DIFFUSE_STD
    specular_basis = np.zeros((3, n, 3), np.float32)
    specular_basis[0] = SKIN_SPECULAR_STD
    return (np.tile(np.float32(SKIN_MEAN_DIFFUSE), (n, 1)), diffuse_basis,
            np.full((n, 3), SKIN_MEAN_SPECULAR, np.float32), specular_basis)


def find_ict_folder(path: str) -> str:
    """The ``FaceXModel`` folder under ``path`` (or ``path`` itself)."""
    for candidate in (os.path.join(path, 'FaceXModel'), path):
        if os.path.isfile(os.path.join(candidate, 'generic_neutral_mesh.obj')):
            return candidate
    raise ModelFileError(
        f"ICT-FaceKit not found in '{path}': clone {ICT_URL} and set the config key 'path' to the "
        f"folder that holds FaceXModel/ (run ./setup.sh to fetch it)")


def load_ict(path: str, association_file: str = '') -> MorphableModel:
    """ICT-FaceKit from its original layout (``path``/FaceXModel/*.obj, vertex_indices.json)."""
    model_folder = find_ict_folder(path)
    # every file the model is built from: a changed identity or expression shape is read again
    sources = sorted(glob.glob(os.path.join(model_folder, '*.obj'))) + [os.path.join(model_folder, 'vertex_indices.json')]
    for source in sources:
        _require_file(source, 'ICT-FaceKit file ' + os.path.basename(source), ICT_URL)
    sources += _association_sources(association_file)
    return cached(sources, 'ict', lambda: _build_ict(model_folder, association_file),
                   f"ICT-FaceKit in '{model_folder}'", f'download it again from {ICT_URL}')


# NextFace's trimPca keeps this many shape and albedo components.
TRIM_SHAPE, TRIM_ALBEDO = 80, 80


def load_model(config: Config) -> MorphableModel:
    """The model named by ``config.model`` from ``config.path``, trimmed if ``config.trimPca``."""
    if config.model == 'flame':
        model = load_flame(config.path)
    else:
        loader = {'bfm2017': load_bfm2017, 'ict': load_ict}[config.model]
        model = loader(config.path, config.landmarksAssociation)
    return model.trimmed(TRIM_SHAPE, TRIM_ALBEDO) if config.trimPca else model


# ----------------------------------------------------------------------------------------- FLAME

FLAME_URL = 'https://flame.is.tue.mpg.de (register, then Downloads)'
FLAME_EDITIONS = ("FLAME 2023 (flame2023.pkl, flame2023_no_jaw.pkl: CC-BY 4.0 for the Open edition, "
                  "otherwise FLAME's non-commercial licence) or FLAME 2020 (generic_model.pkl, non-commercial)")
# The model files in the order they are preferred when a folder holds several.
FLAME_MODEL_FILES = ('flame2023.pkl', 'flame2023_Open.pkl', 'flame2023_open.pkl', 'generic_model.pkl',
                     'flame2023_no_jaw.pkl')
FLAME_EMBEDDINGS = ('landmark_embedding.npy', 'flame_static_embedding.pkl')
FLAME_JOINTS = ('global', 'neck', 'jaw', 'left_eye', 'right_eye')  # FLAME's order of its pose
FLAME_FITTED_JOINTS = ('jaw',)  # the neck turns with the head pose; the eyes stay at rest
# The prior σ of a fitted joint angle (radians): the fit's pose coefficients are in its units, as
# all coefficients are in units of their σ (a wide-open mouth is about 0.4 rad, 1.6σ). With σ = 1 rad
# Adam's steps of stage 2 (0.1 a step) threw a synthetic jaw from 0.24 to 0.30 rad (true 0.25) in 20
# steps; with 0.15 the prior held the landmark fit at 0.205; with 0.25: 0.225, then 0.235.
FLAME_POSE_SIGMA = 0.25
FLAME_SHAPE, FLAME_EXPRESSION = 300, 100  # shapedirs' columns: identity first, then expression
# The texture spaces, in the order they are preferred: BFM-derived (AlbedoMM's, linear), FLAME's own.
FLAME_TEXTURE_FILES = ('FLAME_albedo_from_BFM.npz', 'FLAME_texture.npz')
# Without FLAME_masks.pkl the fitted face region is the front-facing surface inside the jaw line
# and the brows raised by this share of the brow-to-chin height (the forehead).
FLAME_FOREHEAD_SHARE = 0.3


class _PickledChumpy:
    """What a chumpy object (``chumpy.ch.Ch``) in a FLAME pickle becomes: its state, of which
    only its array ``x`` is used."""

    def __setstate__(self, state):
        self.state = state


class _PickledSparse:
    """What a scipy sparse matrix (FLAME's ``J_regressor``) becomes: its state (shape, data,
    indices, indptr); the subclass says its format (newer scipy keeps it in the class only)."""
    matrix = None

    def __setstate__(self, state):
        self.state = state


class _PickledCsc(_PickledSparse):
    matrix = scipy.sparse.csc_matrix


class _PickledCsr(_PickledSparse):
    matrix = scipy.sparse.csr_matrix


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` for the stand-ins above only (protocol 0/1 pickles)."""
    if cls not in (_PickledChumpy, _PickledCsc, _PickledCsr) or base is not object or state is not None:
        raise pickle.UnpicklingError('a pickled object of an unexpected kind')
    return object.__new__(cls)


_ARRAY_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's own, under numpy 1 and 2
_SAFE_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): _ARRAY_RECONSTRUCT,
    ('numpy._core.multiarray', '_reconstruct'): _ARRAY_RECONSTRUCT,
    ('numpy.core.multiarray', 'scalar'): np.float64(0).__reduce__()[0],
    ('numpy._core.multiarray', 'scalar'): np.float64(0).__reduce__()[0],
    ('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
    ('_codecs', 'encode'): codecs.encode,  # how Python 3 writes bytes at protocol 2
    ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset,
    ('copyreg', '_reconstructor'): _reconstructor,
}
for (_module, _name), _value in list(_SAFE_GLOBALS.items()):  # Python 2's names of the same
    _SAFE_GLOBALS[{'builtins': '__builtin__', 'copyreg': 'copy_reg'}.get(_module, _module), _name] = _value


class SafeUnpickler(pickle.Unpickler):
    """Reads the pickles of FLAME and of the tools around it (Python 2 ones too) without running
    anything they hold: numpy arrays, scipy sparse matrices and chumpy arrays (as plain data,
    without chumpy installed) are rebuilt; every other class or function is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[module, name]
        if module.split('.')[0] == 'chumpy':
            return _PickledChumpy
        if module.startswith('scipy.sparse') and name in ('csc_matrix', 'csr_matrix'):
            return _PickledCsc if name == 'csc_matrix' else _PickledCsr
        raise pickle.UnpicklingError(f'refused to load {module}.{name}: a model file holds arrays only')


def _plain(value):
    """Stand-ins of ``SafeUnpickler`` -> numpy arrays and scipy matrices, inside dicts and lists too."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, _PickledChumpy):
        if not isinstance(value.state.get('x'), np.ndarray):
            raise pickle.UnpicklingError('a chumpy expression where an array was expected')
        return value.state['x']
    if isinstance(value, _PickledSparse):
        state = value.state
        return value.matrix((state['data'], state['indices'], state['indptr']), shape=state['_shape'])
    return value


def read_pickle(path: str, what: str):
    """The content of a pickle (``SafeUnpickler``), stand-ins turned into arrays."""
    try:
        with open(path, 'rb') as file:
            return _plain(SafeUnpickler(file, encoding='latin1').load())
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelFileError(f"'{path}' is not a usable {what} ({error}): download it again from {FLAME_URL}") from None


def read_npy(path: str, what: str):
    """An ``.npy`` file; one that holds Python objects (a dict saved by ``np.save``) is read by
    ``SafeUnpickler`` -> the array, or the object it holds."""
    try:
        with open(path, 'rb') as file:
            version = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _, _, dtype = read_header(file)
            if not dtype.hasobject:
                return np.load(path)
            array = SafeUnpickler(file, encoding='latin1').load()
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelFileError(f"'{path}' is not a usable {what} ({error}): download it again") from None
    return _plain(array.item()) if array.shape == () else array


def find_flame_file(path: str) -> str:
    """The FLAME model file: ``path`` itself if it is one, else the first of FLAME_MODEL_FILES in
    it, else another ``flame*.pkl`` there (an edition named otherwise) that is not FLAME's masks
    or landmark embedding."""
    if os.path.isfile(path):
        return path
    for name in FLAME_MODEL_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    others = [name for name in sorted(os.listdir(path)) if name.lower().startswith('flame') and name.endswith('.pkl')
              and name not in ('FLAME_masks.pkl', 'flame_static_embedding.pkl')] if os.path.isdir(path) else []
    if others:
        return os.path.join(path, others[0])
    raise ModelFileError(
        f"no FLAME model in '{path}' (looked for {', '.join(FLAME_MODEL_FILES)}). FLAME is downloaded "
        f"from {FLAME_URL}: {FLAME_EDITIONS}. Put the .pkl in that folder (or set 'path' to the file).")


def flame_landmarks(folder: str, faces: np.ndarray) -> tuple:
    """The 68 iBUG points as triangle corners [68, 3] and barycentric weights [68, 3], from the
    embedding as users have it: DECA's ``landmark_embedding.npy`` (its full 68, else its static 51
    and frontal contour), or RingNet's ``flame_static_embedding.pkl`` (51, iBUG 17-67) with
    ``flame_dynamic_embedding.npy`` (the contour, 0-16, per head turn: the frontal one)."""
    deca, static = (os.path.join(folder, name) for name in FLAME_EMBEDDINGS)
    if os.path.isfile(deca):
        data = read_npy(deca, 'FLAME landmark embedding')
        if 'full_lmk_faces_idx' in data:
            return _embedded(faces, data['full_lmk_faces_idx'], data['full_lmk_bary_coords'])
        inner = data['static_lmk_faces_idx'], data['static_lmk_bary_coords']
        contour = data['dynamic_lmk_faces_idx'], data['dynamic_lmk_bary_coords']
    elif os.path.isfile(static):
        data = read_pickle(static, 'FLAME landmark embedding')
        inner = data['lmk_face_idx'], data['lmk_b_coords']
        dynamic = os.path.join(folder, 'flame_dynamic_embedding.npy')
        contour = None
        if os.path.isfile(dynamic):
            data = read_npy(dynamic, 'FLAME contour embedding')
            contour = data['lmk_face_idx'], data['lmk_b_coords']
    else:
        raise ModelFileError(
            f"no FLAME landmark embedding in '{folder}' (looked for {' or '.join(FLAME_EMBEDDINGS)}): take "
            f"'landmark_embedding.npy' from DECA's data (github.com/yfeng95/DECA) or "
            f"'flame_static_embedding.pkl' and 'flame_dynamic_embedding.npy' from RingNet/TF_FLAME "
            f"(github.com/TimoBolkart/TF_FLAME, data/)")
    corners, weights = np.full((68, 3), -1, np.int64), np.zeros((68, 3), np.float32)
    corners[17:], weights[17:] = _embedded(faces, *inner)
    if contour is not None:  # rows per head turn, -39° .. 39°: the middle one faces the camera
        rows = np.asarray(contour[0])
        middle = len(rows) // 2
        corners[:17], weights[:17] = _embedded(faces, rows[middle], np.asarray(contour[1])[middle])
    return corners, weights


def _embedded(faces: np.ndarray, face_index, barycentric) -> tuple:
    """Landmarks as faces [k] and weights [k, 3] -> (corners [k, 3], weights [k, 3])."""
    face_index = np.asarray(face_index, np.int64).reshape(-1)
    barycentric = np.asarray(barycentric, np.float32).reshape(-1, 3)
    if len(face_index) != len(barycentric) or face_index.max() >= len(faces):
        raise ValueError(f'a landmark embedding of {len(face_index)} faces and {len(barycentric)} weights '
                         f'does not fit a mesh of {len(faces)} faces')
    return faces[face_index], barycentric


def _mesh_components(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    """The connected component of each vertex [verts] (0 the largest)."""
    graph = scipy.sparse.coo_matrix((np.ones(3 * len(faces)), (faces.reshape(-1), np.roll(faces, 1, 1).reshape(-1))),
                                    shape=(n_vertices, n_vertices))
    _, labels = scipy.sparse.csgraph.connected_components(graph, directed=False)
    order = np.argsort(-np.bincount(labels))
    return np.argsort(order)[labels]


def _inside_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Whether points [k, 2] lie inside a closed polygon [m, 2] (even-odd rule) [k]."""
    inside = np.zeros(len(points), bool)
    x, y = points[:, 0], points[:, 1]
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        at = x0 + (y - y0) * (x1 - x0) / np.where(y1 != y0, y1 - y0, 1e-12)
        inside ^= crosses & (x < at)
    return inside


def flame_face_region(folder: str, vertices: np.ndarray, faces: np.ndarray, landmarks: np.ndarray,
                      head: np.ndarray) -> np.ndarray:
    """The vertices [verts] bool the photometric fit sees: FLAME_masks.pkl's 'face' region where
    the file is there; else the front-facing skin of the head (``head`` [verts]: not the
    eyeballs) inside the jaw line and the raised brows (``landmarks`` [68, 3], model frame)."""
    masks_path = os.path.join(folder, 'FLAME_masks.pkl')
    if os.path.isfile(masks_path):
        masks = read_pickle(masks_path, 'FLAME mask file')
        region = np.zeros(len(vertices), bool)
        region[np.asarray(masks['face'], np.int64)] = True
        return region & head
    jaw, brows = landmarks[0:17, :2], landmarks[26:16:-1, :2]
    forehead = brows + [0.0, FLAME_FOREHEAD_SHARE * (brows[:, 1].mean() - landmarks[8, 1])]
    normals = utils.vertex_normals(torch.from_numpy(vertices)[None], torch.from_numpy(faces))[0].numpy()
    facing = normals[:, 2] > 0.3  # the face looks along +z
    return _inside_polygon(vertices[:, :2], np.concatenate([jaw, forehead])) & facing & head


def flame_texture_space(folder: str, n_vertices: int, vertex_uvs: np.ndarray):
    """The albedo of a FLAME texture space evaluated at the vertices (``vertex_uvs`` [verts, 2],
    v up): (diffuse mean [verts, 3], basis [k, verts, 3], specular mean, basis), linear RGB;
    None without one. ``FLAME_texture.npz`` (mean, tex_dir: 512² BGR in 0-255, from photos: sRGB,
    linearised about the mean) or ``FLAME_albedo_from_BFM.npz`` (MU, PC, specMU, specPC: BGR,
    AlbedoMM's linear albedo)."""
    path = flame_texture_file(folder)
    if path is None:
        return None
    with np.load(path) as data:
        def at_vertices(mean_key, basis_key, scale):
            mean = np.asarray(data[mean_key], np.float32).reshape(-1)
            basis = np.asarray(data[basis_key], np.float32).reshape(len(mean), -1)
            side = int(round(np.sqrt(len(mean) / 3)))
            texels = _bilinear_texels(vertex_uvs, side)  # [verts, 4] texel indices and [verts, 4] weights
            sample = lambda table: np.einsum('vk,vkc...->vc...', texels[1], table.reshape(side * side, 3, -1)[texels[0]])
            mean_rgb = sample(mean[:, None] * scale)[..., 0][:, ::-1]
            basis_rgb = sample(basis * scale)[:, ::-1].transpose(2, 0, 1)  # [k, verts, 3]
            return mean_rgb, basis_rgb
        if os.path.basename(path) == FLAME_TEXTURE_FILES[0]:
            diffuse_mean, diffuse_basis = at_vertices('MU', 'PC', 1.0)
            specular = at_vertices('specMU', 'specPC', 1.0) if 'specMU' in data else None
        else:
            srgb_mean, srgb_basis = at_vertices('mean', 'tex_dir', 1 / 255)
            srgb_mean = np.clip(srgb_mean, 1e-3, 1)
            diffuse_mean = utils.srgb_to_linear(srgb_mean)
            slope = utils.srgb_to_linear(srgb_mean + 1e-3) / 1e-3 - diffuse_mean / 1e-3  # d linear / d sRGB
            diffuse_basis = srgb_basis * slope[None]
            specular = None
    if specular is None:
        specular = (np.full((n_vertices, 3), SKIN_MEAN_SPECULAR, np.float32), np.zeros_like(diffuse_basis))
    return (diffuse_mean.astype(np.float32), diffuse_basis.astype(np.float32),
            specular[0].astype(np.float32), specular[1][:len(diffuse_basis)].astype(np.float32))


def flame_texture_file(folder: str):
    """The first of FLAME_TEXTURE_FILES in ``folder``, or None."""
    return next((os.path.join(folder, name) for name in FLAME_TEXTURE_FILES
                 if os.path.isfile(os.path.join(folder, name))), None)


def _bilinear_texels(uvs: np.ndarray, side: int) -> tuple:
    """Bilinear lookup of points ``uvs`` [k, 2] (v up) in a side² image (row 0 at v = 1) ->
    (texel indices [k, 4], weights [k, 4])."""
    column = np.clip(uvs[:, 0] * side - 0.5, 0, side - 1)
    row = np.clip((1 - uvs[:, 1]) * side - 0.5, 0, side - 1)
    c0, r0 = np.floor(column).astype(np.int64), np.floor(row).astype(np.int64)
    c1, r1 = np.minimum(c0 + 1, side - 1), np.minimum(r0 + 1, side - 1)
    fc, fr = column - c0, row - r0
    index = np.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], axis=1)
    weights = np.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], axis=1)
    return index, weights.astype(np.float32)


def flame_uvs(folder: str, faces: np.ndarray):
    """FLAME's UV map (uvs [uv_verts, 2] v up, uv_faces [tris, 3]) from the texture space or
    ``head_template_mesh.obj``; None without either."""
    path = flame_texture_file(folder)
    if path is not None:
        with np.load(path) as data:
            if 'vt' in data and 'ft' in data:
                return np.asarray(data['vt'], np.float32), np.asarray(data['ft'], np.int64)
    path = os.path.join(folder, 'head_template_mesh.obj')
    if os.path.isfile(path):
        _, uvs, polygons, _ = read_obj(path)
        _, uv_faces, _ = _triangulate(polygons)
        if len(uv_faces) == len(faces) and (uv_faces >= 0).all():
            return uvs, uv_faces
    return None


def _vertex_uvs(n_vertices: int, faces: np.ndarray, uvs: np.ndarray, uv_faces: np.ndarray) -> np.ndarray:
    """One UV per vertex [verts, 2] (at seams: the first corner's)."""
    result = np.zeros((n_vertices, 2), np.float32)
    result[faces[::-1].reshape(-1)] = uvs[uv_faces[::-1].reshape(-1)]  # the first write wins last
    return result


def _build_flame(model_file: str) -> MorphableModel:
    folder = os.path.dirname(model_file)
    data = read_pickle(model_file, 'FLAME model file')
    to_mm = 1000.0  # FLAME is in metres
    template = np.asarray(data['v_template'], np.float64) * to_mm
    faces = np.asarray(data['f'], np.int64)
    shapedirs = np.asarray(data['shapedirs'], np.float64) * to_mm  # [verts, 3, shape + expression]
    posedirs = np.asarray(data['posedirs'], np.float64) * to_mm  # [verts, 3, (joints - 1)·9]
    regressor = scipy.sparse.csr_matrix(data['J_regressor'])  # [joints, verts]
    parents = np.asarray(data['kintree_table'], np.int64)[0].copy()
    parents[0] = -1
    weights = np.asarray(data['weights'], np.float32)
    n, joints = len(template), len(parents)
    if shapedirs.shape[:2] != (n, 3) or shapedirs.shape[2] < FLAME_SHAPE + 1 or regressor.shape != (joints, n) \
            or posedirs.shape != (n, 3, (joints - 1) * 9) or weights.shape != (n, joints) or faces.max() >= n:
        raise ValueError(f'inconsistent FLAME arrays: v_template {template.shape}, shapedirs {shapedirs.shape}, '
                         f'posedirs {posedirs.shape}, J_regressor {regressor.shape}, weights {weights.shape}')
    shape_basis = shapedirs[:, :, :FLAME_SHAPE].transpose(2, 0, 1)
    expression_basis = shapedirs[:, :, FLAME_SHAPE:].transpose(2, 0, 1)
    regress = lambda basis: np.einsum('jv,kvc->kjc', regressor.toarray(), basis)

    landmarks = flame_landmarks(folder, faces)
    head_vertices = _mesh_components(faces, n) == 0  # the eyeballs are separate shells
    points = landmark_points(torch.from_numpy(template)[None], *map(torch.from_numpy, landmarks))[0].numpy()
    region = flame_face_region(folder, template, faces, points, head_vertices)
    in_face = region[faces].all(axis=1)
    eyeball = ~head_vertices[faces[:, 0]]
    parts = np.where(in_face, HEAD_PARTS.index('face'),
                     np.where(eyeball, HEAD_PARTS.index('sclera'), HEAD_PARTS.index('back_of_head')))
    uv_map = flame_uvs(folder, faces)
    if uv_map is None:  # a map of the face region, which the rest of the head borrows from its nearest vertex
        uvs = face_uv_map(template, faces[in_face])
        inside = np.unique(faces[in_face])
        nearest = inside[scipy.spatial.cKDTree(template[inside]).query(template)[1]]
        uvs, uv_faces = uvs[nearest], faces
    else:
        uvs, uv_faces = uv_map
    albedo = flame_texture_space(folder, n, _vertex_uvs(n, faces, uvs, uv_faces)) or global_skin(n)
    skinning = dict(parents=parents, joint_mean=regressor @ template, joint_shape_basis=regress(shape_basis),
                    joint_expression_basis=regress(expression_basis),
                    pose_basis=posedirs.transpose(2, 0, 1), weights=weights,
                    posed_joints=np.array([FLAME_JOINTS.index(name) for name in FLAME_FITTED_JOINTS]),
                    pose_sigma=FLAME_POSE_SIGMA)
    head = dict(mean_shape=template, shape_basis=shape_basis, expression_basis=expression_basis, faces=faces,
                uvs=uvs, uv_faces=uv_faces, parts=parts)
    return canonical_model('flame', template, shape_basis, expression_basis, faces[in_face], uvs, uv_faces[in_face],
                           landmarks, *albedo, head=head, skinning=skinning)


def load_flame(path: str) -> MorphableModel:
    """FLAME 2020 or 2023 from its downloaded files (see ``find_flame_file``), with the landmark
    embedding, and the masks and texture space where they are in the same folder."""
    model_file = find_flame_file(path)
    folder = os.path.dirname(model_file)
    optional = ('FLAME_masks.pkl', 'head_template_mesh.obj', 'flame_dynamic_embedding.npy') + FLAME_TEXTURE_FILES
    sources = [model_file] + [os.path.join(folder, name) for name in FLAME_EMBEDDINGS + optional
                              if os.path.isfile(os.path.join(folder, name))]
    return cached(sources, 'flame', lambda: _build_flame(model_file), f"the FLAME files in '{folder}'",
                  f'download them again from {FLAME_URL}')
