"""The files of the face models: Basel Face Model 2017 with AlbedoMM (HDF5), and ICT-FaceKit
(OBJs in its original layout), read into ``MorphableModel``s (and cached: see ``morphableModel``).
A missing or damaged file stops with a ``ModelFileError`` that says where to get a good one.
"""
import glob
import json
import os

import h5py
import numpy as np

from config import Config
from morphableModel import HEAD_PARTS, ModelFileError, MorphableModel, cached, canonical_model

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
# ICT has no albedo model: a global skin reflectance is fitted (linear RGB).
ICT_MEAN_DIFFUSE = (0.45, 0.30, 0.23)
ICT_DIFFUSE_STD = 0.12
ICT_MEAN_SPECULAR = 0.04
ICT_SPECULAR_STD = 0.03
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
                            faces, None, None, landmarks, diffuse_mean, diffuse_basis,
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
    diffuse_basis = np.zeros((3, n, 3), np.float32)
    for channel in range(3):  # a global skin colour: one mode per channel
        diffuse_basis[channel, :, channel] = ICT_DIFFUSE_STD
    specular_basis = np.zeros((3, n, 3), np.float32)
    specular_basis[0] = ICT_SPECULAR_STD  # a global specular level, on the first albedo mode
    return canonical_model(
        'ict', neutral * to_mm, shape_basis * to_mm, expression_basis * to_mm, faces,
        uvs[used_uvs], uv_faces, landmarks,
        np.tile(np.float32(ICT_MEAN_DIFFUSE), (n, 1)), diffuse_basis,
        np.full((n, 3), ICT_MEAN_SPECULAR, np.float32), specular_basis, head, indices['fitting_expressions'])


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
    loader = {'bfm2017': load_bfm2017, 'ict': load_ict}[config.model]
    model = loader(config.path, config.landmarksAssociation)
    return model.trimmed(TRIM_SHAPE, TRIM_ALBEDO) if config.trimPca else model
