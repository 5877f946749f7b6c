"""Statistical face models as plain tensors: Basel Face Model 2017 + AlbedoMM, and ICT-FaceKit.

Every model is brought into one canonical frame, the camera frame of the fit with the identity
pose: x right, y down, z forward (away from the camera), millimetres, centred on the mean face.
The face looks toward the camera (-z). A model is

    vertices = mean_shape + Σ_k shape_coeff_k · shape_basis_k + Σ_k expr_coeff_k · expression_basis_k

with every basis already scaled by its standard deviation, so coefficients have prior N(0, 1).
Reflectance is linear RGB: diffuse and specular albedo per vertex, each mean + basis · coeff.
"""
import dataclasses
import glob
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

import utils
from config import Config

BFM_FILE = 'model2017-1_face12_nomouth.h5'
ALBEDO_FILE = 'albedoModel2020_face12_albedoPart.h5'
BFM_URL = 'https://faces.dmi.unibas.ch/bfm/bfm2017.html'
ALBEDO_URL = 'https://github.com/waps101/AlbedoMM/releases/tag/v1.0'
ICT_URL = 'https://github.com/ICT-VGL/ICT-FaceKit'

# BFM/ICT frame (y up, face toward +z) -> canonical camera frame (y down, face toward -z):
# a 180° turn about x, a proper rotation.
TO_CAMERA_FRAME = np.array([1.0, -1.0, -1.0], dtype=np.float32)

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
# photometric loss. All 68 ICT landmark vertices lie inside this area.
ICT_FACE_VERTICES = 6706
ICT_FACE_POLYGONS = 6560
# ICT has no albedo model: a global skin reflectance is fitted (linear RGB).
ICT_MEAN_DIFFUSE = (0.45, 0.30, 0.23)
ICT_DIFFUSE_STD = 0.12
ICT_MEAN_SPECULAR = 0.04
ICT_SPECULAR_STD = 0.03


class ModelFileError(RuntimeError):
    """A model file is missing or unreadable; the message says where to get a good one."""


@dataclass
class MorphableModel:
    """A linear face model in the canonical camera frame (see module docstring)."""
    name: str
    mean_shape: torch.Tensor        # [verts, 3] mm
    shape_basis: torch.Tensor       # [n_shape, verts, 3] σ-scaled
    expression_basis: torch.Tensor  # [n_expr, verts, 3] σ-scaled
    faces: torch.Tensor             # [tris, 3] int64, counter-clockwise seen from the camera
    uvs: torch.Tensor               # [uv_verts, 2] in [0, 1], v up (OBJ convention)
    uv_faces: torch.Tensor          # [tris, 3] int64 indices into uvs
    landmark_vertices: torch.Tensor  # [68] int64, -1 where an iBUG point has no vertex
    diffuse_mean: torch.Tensor      # [verts, 3] linear RGB
    diffuse_basis: torch.Tensor     # [n_albedo, verts, 3]
    specular_mean: torch.Tensor     # [verts, 3]
    specular_basis: torch.Tensor    # [n_albedo, verts, 3]

    @property
    def n_shape(self) -> int:
        return self.shape_basis.shape[0]

    @property
    def n_expression(self) -> int:
        return self.expression_basis.shape[0]

    @property
    def n_albedo(self) -> int:
        return self.diffuse_basis.shape[0]

    @property
    def has_albedo_model(self) -> bool:
        """Whether the diffuse albedo varies over the face statistically (AlbedoMM), rather than
        as one skin colour (ICT-FaceKit's global modes)."""
        return bool((self.diffuse_basis.std(dim=1) > 1e-6).any())

    def vertices(self, shape_coeffs: torch.Tensor, expression_coeffs: torch.Tensor) -> torch.Tensor:
        """[n, n_shape], [n, n_expr] -> vertices [n, verts, 3] in the canonical frame."""
        return (self.mean_shape
                + torch.einsum('nk,kvc->nvc', shape_coeffs, self.shape_basis)
                + torch.einsum('nk,kvc->nvc', expression_coeffs, self.expression_basis))

    def diffuse_albedo(self, albedo_coeffs: torch.Tensor) -> torch.Tensor:
        """[n, n_albedo] -> per-vertex diffuse albedo [n, verts, 3]."""
        return self.diffuse_mean + torch.einsum('nk,kvc->nvc', albedo_coeffs, self.diffuse_basis)

    def specular_albedo(self, albedo_coeffs: torch.Tensor) -> torch.Tensor:
        """[n, n_albedo] -> per-vertex specular albedo [n, verts, 3]."""
        return self.specular_mean + torch.einsum('nk,kvc->nvc', albedo_coeffs, self.specular_basis)

    def trimmed(self, n_shape: int, n_albedo: int) -> 'MorphableModel':
        """Keep the first components only (NextFace's ``trimPca``)."""
        return dataclasses.replace(
            self, shape_basis=self.shape_basis[:n_shape],
            diffuse_basis=self.diffuse_basis[:n_albedo], specular_basis=self.specular_basis[:n_albedo])

    def to(self, device) -> 'MorphableModel':
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})


# --------------------------------------------------------------------------- the UV map

def boundary_loops(faces: np.ndarray) -> list:
    """Closed boundary loops of a triangle mesh, each an ordered array of vertex indices."""
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    unique, counts = np.unique(np.sort(edges, axis=1), axis=0, return_counts=True)
    boundary = {tuple(e) for e in unique[counts == 1]}
    following = {a: b for a, b in edges if (min(a, b), max(a, b)) in boundary}  # keeps mesh winding
    loops, seen = [], set()
    for start in following:
        if start in seen:
            continue
        loop, vertex = [], start
        while vertex not in seen:
            seen.add(vertex)
            loop.append(vertex)
            vertex = following[vertex]
        loops.append(np.array(loop))
    return loops


def _mean_value_weights(vertices: np.ndarray, faces: np.ndarray) -> scipy.sparse.csr_matrix:
    """Floater's mean-value weights w_ij = (tan(α/2) + tan(β/2)) / |v_i - v_j|, always positive."""
    rows, cols, values = [], [], []
    for k in range(3):
        i, j, l = faces[:, k], faces[:, (k + 1) % 3], faces[:, (k + 2) % 3]
        e_ij, e_il = vertices[j] - vertices[i], vertices[l] - vertices[i]
        len_ij, len_il = np.linalg.norm(e_ij, axis=1), np.linalg.norm(e_il, axis=1)
        cos_angle = np.einsum('tc,tc->t', e_ij, e_il) / np.maximum(len_ij * len_il, 1e-20)
        tan_half = np.tan(np.arccos(np.clip(cos_angle, -1.0, 1.0)) / 2)
        rows += [i, i]
        cols += [j, l]
        values += [tan_half / np.maximum(len_ij, 1e-20), tan_half / np.maximum(len_il, 1e-20)]
    n = len(vertices)
    return scipy.sparse.coo_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                                   shape=(n, n)).tocsr()


def face_uv_map(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """A bijective, low-distortion UV map of a disk-like face mesh into the unit square [verts, 2].

    Tutte embedding with mean-value weights (Floater 2003): the outer boundary goes to a circle by
    arc length, every inner vertex to the weighted mean of its neighbours. With a convex boundary
    and positive weights no triangle flips. Holes (eyes, mouth) are closed by a virtual centre
    vertex first. The boundary starts at the top of the face midline and u grows with x, v with -y
    (OBJ convention), so a mirror-symmetric face gets a map symmetric about u = 0.5.
    """
    vertices = np.asarray(vertices, np.float64)
    loops = sorted(boundary_loops(faces), key=len)
    if not loops:
        raise ValueError('the mesh has no boundary: a UV map needs a disk-like face mesh')
    outer, holes = loops[-1], loops[:-1]
    all_vertices, all_faces = [vertices], [faces]
    for hole in holes:  # fan-fill each hole around a new vertex at its centroid
        centre = len(np.concatenate(all_vertices))
        all_vertices.append(vertices[hole].mean(axis=0, keepdims=True))
        all_faces.append(np.stack([np.roll(hole, -1), hole, np.full(len(hole), centre)], axis=1))
    points, triangles = np.concatenate(all_vertices), np.concatenate(all_faces)
    n = len(points)

    start = np.argmin(points[outer, 1] + 1e-3 * np.abs(points[outer, 0]))  # top of the midline
    outer = np.roll(outer, -start)
    segment = np.linalg.norm(points[np.roll(outer, -1)] - points[outer], axis=1)
    arc = np.concatenate([[0.0], np.cumsum(segment)[:-1]]) / segment.sum()
    angle = np.pi / 2 + 2 * np.pi * arc
    uv = np.zeros((n, 2))
    uv[outer] = np.stack([np.cos(angle), np.sin(angle)], axis=1)

    weights = _mean_value_weights(points, triangles)
    inner = np.setdiff1d(np.unique(triangles), outer)  # vertices in no triangle stay at the centre
    laplacian = scipy.sparse.diags(np.asarray(weights.sum(axis=1)).ravel()) - weights
    lhs = laplacian[inner][:, inner].tocsc()
    rhs = -laplacian[inner][:, outer] @ uv[outer]
    uv[inner] = np.stack([scipy.sparse.linalg.spsolve(lhs, rhs[:, c]) for c in range(2)], axis=1)

    uv = uv[:len(vertices)]
    if np.corrcoef(uv[:, 0], vertices[:, 0])[0, 1] < 0:  # boundary ran the mirrored way round
        uv[:, 0] = -uv[:, 0]
    return (0.5 + 0.49 * uv).astype(np.float32)


def uv_area_distortion(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, uv_faces: np.ndarray):
    """Signed UV areas [tris] and each triangle's area ratio (UV share / 3D share) [tris]."""
    area_3d = np.linalg.norm(utils.face_normals_np(vertices, faces), axis=1) / 2
    a, b, c = (uvs[uv_faces[:, k]] for k in range(3))
    signed_uv = ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])) / 2
    ratio = (np.abs(signed_uv) / np.abs(signed_uv).sum()) / (area_3d / area_3d.sum())
    return signed_uv, ratio


# ---------------------------------------------------------------------------------- the cache

def _cache_path(sources: list, kind: str) -> str:
    """A cache file named by the sources' paths, sizes and times (a changed file is re-read)."""
    digest = hashlib.sha1(kind.encode())
    for source in sources:
        stat = os.stat(source)
        digest.update(f'{os.path.abspath(source)}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
    folder = os.environ.get('FACE_MODEL_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'faceRecon'))
    return os.path.join(folder, f'{kind}-{digest.hexdigest()[:16]}.npz')


def _save_cache(path: str, model: MorphableModel) -> None:
    """Write atomically: a half-written cache must never be read back."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {f.name: getattr(model, f.name).numpy() for f in dataclasses.fields(model)
              if isinstance(getattr(model, f.name), torch.Tensor)}
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.npz')
    with os.fdopen(handle, 'wb') as file:
        np.savez(file, name=model.name, **arrays)
    os.replace(temporary, path)


def _load_cache(path: str):
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as data:
            return MorphableModel(**{key: (str(data[key]) if key == 'name' else torch.from_numpy(data[key]))
                                     for key in data.files})
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable cache is rebuilt


def _cached(sources: list, kind: str, build) -> MorphableModel:
    path = _cache_path(sources, kind)
    model = _load_cache(path)
    if model is None:
        model = build()
        try:
            _save_cache(path, model)
        except OSError:
            pass  # a read-only home only costs the speed-up
    return model


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
    import h5py
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
    return _canonical_model('bfm2017', mean_shape + expression_mean, shape_basis, expression_basis,
                            faces, None, None, landmarks, diffuse_mean, diffuse_basis,
                            specular_mean, specular_basis)


def _canonical_model(name, mean_shape, shape_basis, expression_basis, faces, uvs, uv_faces, landmarks,
                     diffuse_mean, diffuse_basis, specular_mean, specular_basis) -> MorphableModel:
    """Arrays in the model's own frame (y up, face toward +z, mm) -> a canonical ``MorphableModel``.

    Without ``uvs`` a low-distortion UV map is computed. Faces are re-oriented so that their
    normals point toward the camera."""
    mean_shape = (mean_shape - mean_shape.mean(axis=0)) * TO_CAMERA_FRAME
    shape_basis = shape_basis * TO_CAMERA_FRAME
    expression_basis = expression_basis * TO_CAMERA_FRAME
    if utils.face_normals_np(mean_shape, faces)[:, 2].sum() > 0:  # must face the camera (-z)
        faces = faces[:, ::-1]
        uv_faces = None if uv_faces is None else uv_faces[:, ::-1]
    if uvs is None:
        uvs, uv_faces = face_uv_map(mean_shape, faces), faces
    tensor = lambda a, dtype=torch.float32: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    return MorphableModel(
        name=name, mean_shape=tensor(mean_shape), shape_basis=tensor(shape_basis),
        expression_basis=tensor(expression_basis), faces=tensor(faces, torch.int64),
        uvs=tensor(uvs), uv_faces=tensor(uv_faces, torch.int64),
        landmark_vertices=tensor(landmarks, torch.int64),
        diffuse_mean=tensor(diffuse_mean), diffuse_basis=tensor(diffuse_basis),
        specular_mean=tensor(specular_mean), specular_basis=tensor(specular_basis))


def load_bfm2017(folder: str, association_file: str = '') -> MorphableModel:
    """Basel Face Model 2017 (face12, no mouth) with the AlbedoMM albedo model, from ``folder``."""
    shape_path, albedo_path = os.path.join(folder, BFM_FILE), os.path.join(folder, ALBEDO_FILE)
    _require_file(shape_path, 'Basel Face Model 2017 file ' + BFM_FILE, BFM_URL + ' (after a license form)')
    _require_file(albedo_path, 'AlbedoMM file ' + ALBEDO_FILE, ALBEDO_URL)
    sources = [shape_path, albedo_path] + ([association_file] if association_file else [])
    return _cached(sources, 'bfm2017', lambda: _build_bfm(folder, association_file))


# ---------------------------------------------------------------------------------- ICT-FaceKit

def read_obj(path: str):
    """A Wavefront OBJ -> positions [V, 3], uvs [U, 2] (or empty), faces as lists of (v, vt) pairs."""
    positions, uvs, faces = [], [], []
    with open(path, encoding='utf-8') as file:
        for line in file:
            if line.startswith('v '):
                positions.append(line[2:])
            elif line.startswith('vt '):
                uvs.append(line[3:])
            elif line.startswith('f '):
                corners = [corner.split('/') for corner in line.split()[1:]]
                faces.append([(int(c[0]) - 1, int(c[1]) - 1 if len(c) > 1 and c[1] else -1) for c in corners])
    as_array = lambda rows, width: (np.array(' '.join(rows).split(), dtype=np.float32).reshape(-1, width)
                                    if rows else np.zeros((0, width), np.float32))
    return as_array(positions, 3), as_array([' '.join(r.split()[:2]) for r in uvs], 2), faces


def _read_obj_positions(path: str, n_vertices: int) -> np.ndarray:
    """The first ``n_vertices`` positions of an OBJ [n_vertices, 3] (fast path for blendshapes)."""
    with open(path, encoding='utf-8') as file:
        rows = [line[2:] for line in file if line.startswith('v ')]
    if len(rows) < n_vertices:
        raise ModelFileError(f"'{path}' has {len(rows)} vertices, expected at least {n_vertices}: "
                             f"download ICT-FaceKit again from {ICT_URL}")
    return np.array(' '.join(rows[:n_vertices]).split(), dtype=np.float32).reshape(n_vertices, 3)


def _triangulate(polygons: list, n_faces: int):
    """Fan-triangulate the first ``n_faces`` polygons -> faces [T, 3], uv_faces [T, 3]."""
    faces, uv_faces = [], []
    for polygon in polygons[:n_faces]:
        for k in range(1, len(polygon) - 1):
            corners = (polygon[0], polygon[k], polygon[k + 1])
            faces.append([c[0] for c in corners])
            uv_faces.append([c[1] for c in corners])
    return np.array(faces, np.int64), np.array(uv_faces, np.int64)


def _build_ict(model_folder: str, association_file: str) -> MorphableModel:
    with open(os.path.join(model_folder, 'vertex_indices.json'), encoding='utf-8') as file:
        indices = json.load(file)
    neutral, uvs, polygons = read_obj(os.path.join(model_folder, 'generic_neutral_mesh.obj'))
    neutral = neutral[:ICT_FACE_VERTICES]
    faces, uv_faces = _triangulate(polygons, ICT_FACE_POLYGONS)
    if faces.max() >= ICT_FACE_VERTICES:
        raise ModelFileError(f"'{model_folder}' does not have the ICT-FaceKit topology ({ICT_URL})")
    used_uvs = np.unique(uv_faces)  # keep only the face area's UVs
    uv_faces = np.searchsorted(used_uvs, uv_faces)
    identity_files = sorted(glob.glob(os.path.join(model_folder, 'identity[0-9][0-9][0-9].obj')))
    if not identity_files:
        raise ModelFileError(f"no identityNNN.obj in '{model_folder}': download ICT-FaceKit from {ICT_URL}")
    read_delta = lambda path: _read_obj_positions(path, ICT_FACE_VERTICES) - neutral
    shape_basis = np.stack([read_delta(path) for path in identity_files])
    expression_basis = np.stack([read_delta(os.path.join(model_folder, name + '.obj'))
                                 for name in indices['fitting_expressions']])
    if association_file:
        landmarks = read_landmark_association(association_file, ICT_FACE_VERTICES)
    else:
        landmarks = np.asarray(indices['idx_to_landmark_verts'], np.int64)
    n = ICT_FACE_VERTICES
    diffuse_basis = np.zeros((3, n, 3), np.float32)
    for channel in range(3):  # a global skin colour: one mode per channel
        diffuse_basis[channel, :, channel] = ICT_DIFFUSE_STD
    specular_basis = np.zeros((3, n, 3), np.float32)
    specular_basis[0] = ICT_SPECULAR_STD  # a global specular level, on the first albedo mode
    to_mm = 10.0  # ICT is in centimetres
    return _canonical_model(
        'ict', neutral * to_mm, shape_basis * to_mm, expression_basis * to_mm, faces,
        uvs[used_uvs], uv_faces, landmarks,
        np.tile(np.float32(ICT_MEAN_DIFFUSE), (n, 1)), diffuse_basis,
        np.full((n, 3), ICT_MEAN_SPECULAR, np.float32), specular_basis)


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
    sources = [os.path.join(model_folder, 'generic_neutral_mesh.obj'),
               os.path.join(model_folder, 'vertex_indices.json')] + ([association_file] if association_file else [])
    return _cached(sources, 'ict', lambda: _build_ict(model_folder, association_file))


# NextFace's trimPca keeps this many shape and albedo components.
TRIM_SHAPE, TRIM_ALBEDO = 80, 80


def load_model(config: Config) -> MorphableModel:
    """The model named by ``config.model`` from ``config.path``, trimmed if ``config.trimPca``."""
    loader = {'bfm2017': load_bfm2017, 'ict': load_ict}[config.model]
    model = loader(config.path, config.landmarksAssociation)
    return model.trimmed(TRIM_SHAPE, TRIM_ALBEDO) if config.trimPca else model
