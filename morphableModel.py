"""Statistical face models as plain tensors, their canonical frame, UV map and cache (the files
of Basel Face Model 2017 + AlbedoMM and ICT-FaceKit are read by ``modelFiles``).

Every model is brought into one canonical frame, the camera frame of the fit with the identity
pose: x right, y down, z forward (away from the camera), millimetres, centred on the mean face.
The face looks toward the camera (-z). A model is

    vertices = mean_shape + Σ_k shape_coeff_k · shape_basis_k + Σ_k expr_coeff_k · expression_basis_k

with every basis already scaled by its standard deviation, so coefficients have prior N(0, 1).
Reflectance is linear RGB: diffuse and specular albedo per vertex, each mean + basis · coeff.
"""
import dataclasses
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

import utils
from skinning import Skinning

# BFM/ICT frame (y up, face toward +z) -> canonical camera frame (y down, face toward -z):
# a 180° turn about x, a proper rotation.
TO_CAMERA_FRAME = np.array([1.0, -1.0, -1.0], dtype=np.float32)

# Models whose expression coefficients are blendshape weights in [0, 1] (ICT-FaceKit's shapes
# follow Apple's ARKit blendshapes), not Gaussian coefficients.
BLENDSHAPE_MODELS = ('ict',)


# The parts of an exported head; ``HeadMesh.parts`` holds an index into this tuple per triangle.
HEAD_PARTS = ('face', 'back_of_head', 'mouth', 'teeth', 'sclera', 'iris', 'lacrimal_fluid', 'eye_blend',
              'eye_occlusion', 'eyelashes')


class ModelFileError(RuntimeError):
    """A model file is missing or unreadable; the message says where to get a good one."""


def linear_shape(mean_shape: torch.Tensor, shape_basis: torch.Tensor, expression_basis: torch.Tensor,
                 identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
    """mean [verts, 3] + identity [n, n_shape] · basis [n_shape, verts, 3] + expression [n, n_expr] ·
    basis [n_expr, verts, 3] -> vertices [n, verts, 3]."""
    return (mean_shape + torch.einsum('nk,kvc->nvc', identity, shape_basis)
            + torch.einsum('nk,kvc->nvc', expression, expression_basis))


def model_shape(mesh, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
    """Vertices [n, verts, 3] of a ``MorphableModel`` or ``HeadMesh`` for identity [n, n_shape]
    and expression [n, n_expr] coefficients: the linear model, and for a skinned model (FLAME)
    the blendshape coefficients followed by the joints' pose (``Skinning.pose``)."""
    blendshapes = mesh.expression_basis.shape[0]
    rest = linear_shape(mesh.mean_shape, mesh.shape_basis, mesh.expression_basis, identity, expression[:, :blendshapes])
    if mesh.skinning is None:
        return rest
    return mesh.skinning.pose(rest, identity, expression[:, :blendshapes], expression[:, blendshapes:])


@dataclass
class HeadMesh:
    """A model's whole mesh as it is exported, in the canonical frame of the model: vertices
    [0, n) are the fitted model's, in its order, and the rest of the head follows (ICT-FaceKit:
    back of the head, ears and neck, mouth socket, teeth, gums and tongue, eyes, eyelashes), moved
    by the same identity and expression coefficients."""
    mean_shape: torch.Tensor        # [verts, 3] mm
    shape_basis: torch.Tensor       # [n_shape, verts, 3]
    expression_basis: torch.Tensor  # [n_expr, verts, 3]
    faces: torch.Tensor             # [tris, 3] int64
    uvs: torch.Tensor               # [uv_verts, 2] v up; ICT's parts lie in tiles u in [k, k + 1]
    uv_faces: torch.Tensor          # [tris, 3] int64
    parts: torch.Tensor             # [tris] int64 index into HEAD_PARTS
    skinning: Skinning = None       # the joints of a skinned model (FLAME)

    @property
    def whole_head(self) -> bool:
        """Whether the mesh goes round the back of the head (else it is a face mask)."""
        return bool((self.parts == HEAD_PARTS.index('back_of_head')).any())

    def vertices(self, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """[n, n_shape], [n, n_expression] -> vertices [n, verts, 3] in the canonical frame."""
        return model_shape(self, identity, expression)

    def to(self, device) -> 'HeadMesh':
        """A copy with every tensor on ``device``."""
        return tensors_to(self, device)


def landmark_points(vertices: torch.Tensor, corners: torch.Tensor, barycentric: torch.Tensor) -> torch.Tensor:
    """Points on a mesh given by triangle corners [k, 3] (-1: none, read as vertex 0) and
    barycentric weights [k, 3], of vertices [n, verts, 3] -> [n, k, 3]."""
    return torch.einsum('nkjc,kj->nkc', vertices[:, corners.clamp_min(0)], barycentric.to(vertices.dtype))


def vertex_landmarks(indices) -> tuple:
    """Landmarks on vertices [k] (-1: none) -> (corners [k, 3], barycentric weights [k, 3])."""
    indices = np.asarray(indices, np.int64)
    barycentric = np.zeros((len(indices), 3), np.float32)
    barycentric[:, 0] = 1
    return np.repeat(indices[:, None], 3, axis=1), barycentric


def map_tensors(record, function):
    """A copy of the dataclass ``record`` with ``function`` applied to its tensor fields (and to
    those of its dataclass fields)."""
    def apply(value):
        if isinstance(value, torch.Tensor):
            return function(value)
        return map_tensors(value, function) if dataclasses.is_dataclass(value) else value
    return dataclasses.replace(record, **{f.name: apply(getattr(record, f.name)) for f in dataclasses.fields(record)})


def tensors_to(record, device):
    """A copy of the dataclass ``record`` with its tensors (nested ones too) on ``device``."""
    return map_tensors(record, lambda tensor: tensor.to(device))


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
    landmark_vertices: torch.Tensor  # [68, 3] int64 corners of the triangle holding each iBUG point
                                     # (a vertex landmark repeats its vertex), -1 where a point has none
    landmark_barycentric: torch.Tensor  # [68, 3] weights of those corners, summing to 1
    diffuse_mean: torch.Tensor      # [verts, 3] linear RGB
    diffuse_basis: torch.Tensor     # [n_albedo, verts, 3]
    specular_mean: torch.Tensor     # [verts, 3]
    specular_basis: torch.Tensor    # [n_albedo, verts, 3]
    head: HeadMesh = None           # the whole head where the model has one (ICT-FaceKit)
    expression_names: tuple = ()    # [n_expr] blendshape names (ICT-FaceKit: ARKit's, some split L/R)
    skinning: Skinning = None       # joints (FLAME): the expression coefficients end with their pose

    @property
    def n_shape(self) -> int:
        return self.shape_basis.shape[0]

    @property
    def n_expression(self) -> int:
        """Expression coefficients: the blendshapes', then a skinned model's joint pose."""
        return self.expression_basis.shape[0] + (self.skinning.n_pose if self.skinning is not None else 0)

    @property
    def n_albedo(self) -> int:
        return self.diffuse_basis.shape[0]

    @property
    def landmark_usable(self) -> torch.Tensor:
        """[68] bool: the iBUG points the model has."""
        return self.landmark_vertices[:, 0] >= 0

    def landmark_points(self, vertices: torch.Tensor) -> torch.Tensor:
        """The 68 landmarks of vertices [n, verts, 3] -> [n, 68, 3] (points the model lacks: vertex 0)."""
        return landmark_points(vertices, self.landmark_vertices, self.landmark_barycentric)

    @property
    def expression_bounds(self):
        """(low, high) of every expression coefficient for blendshape models, else None."""
        return (0.0, 1.0) if self.name in BLENDSHAPE_MODELS else None

    @property
    def has_albedo_model(self) -> bool:
        """Whether the diffuse albedo varies over the face statistically (AlbedoMM), rather than
        as one skin colour (ICT-FaceKit's global modes)."""
        return bool((self.diffuse_basis.std(dim=1) > 1e-6).any())

    def vertices(self, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """[n, n_shape], [n, n_expression] -> vertices [n, verts, 3] in the canonical frame."""
        return model_shape(self, identity, expression)

    def export_mesh(self) -> HeadMesh:
        """The mesh to export: the whole head where the model has one, else the face itself."""
        if self.head is not None:
            return self.head
        return HeadMesh(self.mean_shape, self.shape_basis, self.expression_basis, self.faces, self.uvs,
                        self.uv_faces, torch.zeros(len(self.faces), dtype=torch.int64), self.skinning)

    def landmark_model(self, identity: torch.Tensor = None) -> 'MorphableModel':
        """What a landmark fit evaluates, in float64: the model cut down to the vertices its
        landmarks lie on (the same landmarks, no triangles, no head). With a known ``identity``
        [n_shape] (a tracked clip's) that identity is folded into its mean, so that it has no
        identity coefficients left (``vertices`` takes identity [n, 0]); without, the identity
        basis stays and the fit finds the identity too."""
        used, corners = torch.unique(self.landmark_vertices.clamp_min(0), return_inverse=True)
        at = lambda basis: basis[:, used]
        mean_shape, shape_basis, skinning = self.mean_shape[used], at(self.shape_basis), self.skinning
        skinning = skinning and skinning.at_vertices(used)
        if identity is not None:
            identity = identity.to(self.mean_shape.dtype)
            mean_shape = mean_shape + torch.einsum('k,kvc->vc', identity, shape_basis)
            shape_basis = shape_basis[:0]
            skinning = skinning and dataclasses.replace(
                skinning, joint_shape_basis=skinning.joint_shape_basis[:0],
                joint_mean=skinning.joint_mean + torch.einsum('k,kjc->jc', identity, skinning.joint_shape_basis))
        small = dataclasses.replace(
            self, mean_shape=mean_shape, shape_basis=shape_basis, expression_basis=at(self.expression_basis),
            faces=self.faces[:0], uvs=self.uvs[:0], uv_faces=self.uv_faces[:0],
            landmark_vertices=torch.where(self.landmark_vertices >= 0, corners, -1),
            diffuse_mean=self.diffuse_mean[used], diffuse_basis=at(self.diffuse_basis),
            specular_mean=self.specular_mean[used], specular_basis=at(self.specular_basis), head=None,
            skinning=skinning)
        return map_tensors(small, lambda t: t.double() if t.is_floating_point() else t)

    def diffuse_albedo(self, albedo_coeffs: torch.Tensor) -> torch.Tensor:
        """[n, n_albedo] -> per-vertex diffuse albedo [n, verts, 3]."""
        return self.diffuse_mean + torch.einsum('nk,kvc->nvc', albedo_coeffs, self.diffuse_basis)

    def specular_albedo(self, albedo_coeffs: torch.Tensor) -> torch.Tensor:
        """[n, n_albedo] -> per-vertex specular albedo [n, verts, 3]."""
        return self.specular_mean + torch.einsum('nk,kvc->nvc', albedo_coeffs, self.specular_basis)

    def to(self, device) -> 'MorphableModel':
        """A copy with every tensor on ``device``."""
        return tensors_to(self, device)

    def trimmed(self, n_shape: int, n_albedo: int) -> 'MorphableModel':
        """Keep the first components only (NextFace's ``trimPca``)."""
        trim = lambda skinning: skinning and dataclasses.replace(
            skinning, joint_shape_basis=skinning.joint_shape_basis[:n_shape])
        head = None if self.head is None else dataclasses.replace(
            self.head, shape_basis=self.head.shape_basis[:n_shape], skinning=trim(self.head.skinning))
        return dataclasses.replace(
            self, shape_basis=self.shape_basis[:n_shape], head=head, skinning=trim(self.skinning),
            diffuse_basis=self.diffuse_basis[:n_albedo], specular_basis=self.specular_basis[:n_albedo])


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

# Raised whenever what a cache holds changes, so that caches of earlier versions are rebuilt.
CACHE_FORMAT = 5  # 2: ICT-FaceKit's whole head; 3: keyed on every source file; 4: expression names;
# 5: barycentric landmarks


def cache_path(sources: list, kind: str) -> str:
    """A cache file named by the sources' paths, sizes and times (a changed file is re-read)."""
    digest = hashlib.sha1(f'{kind}:{CACHE_FORMAT}'.encode())
    for source in sources:
        stat = os.stat(source)
        digest.update(f'{os.path.abspath(source)}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
    folder = os.environ.get('FACE_MODEL_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'faceRecon'))
    return os.path.join(folder, f'{kind}-{digest.hexdigest()[:16]}.npz')


def _tensor_fields(instance, prefix: str = '') -> dict:
    """The tensor fields of a dataclass and of its dataclass fields as numpy arrays, keyed by
    their dotted paths ('head.skinning.weights')."""
    arrays = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if isinstance(value, torch.Tensor):
            arrays[prefix + field.name] = value.numpy()
        elif dataclasses.is_dataclass(value):
            arrays.update(_tensor_fields(value, f'{prefix}{field.name}.'))
    return arrays


def _from_tensor_fields(cls, tensors: dict, **others):
    """A ``cls`` dataclass from the tensors of ``_tensor_fields`` (its nested records where
    their keys are present) and the fields ``others``."""
    nested = {'head': HeadMesh, 'skinning': Skinning}
    values = {key: value for key, value in tensors.items() if '.' not in key}
    for name, kind in nested.items():
        inner = {key[len(name) + 1:]: value for key, value in tensors.items() if key.startswith(name + '.')}
        if inner:
            values[name] = _from_tensor_fields(kind, inner)
    return cls(**values, **others)


def _save_cache(path: str, model: MorphableModel) -> None:
    """Write atomically: a half-written cache must never be read back."""
    arrays = _tensor_fields(model)
    with utils.atomic_path(path) as temporary:
        with open(temporary, 'wb') as file:
            np.savez(file, name=model.name, expression_names=np.array(model.expression_names, dtype=str), **arrays)


def _load_cache(path: str):
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as data:
            name = str(data['name'])
            names = tuple(str(s) for s in data['expression_names'])
            tensors = {key: torch.from_numpy(data[key]) for key in data.files if key not in ('name', 'expression_names')}
        model = _from_tensor_fields(MorphableModel, tensors, name=name, expression_names=names)
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None  # an unreadable cache is rebuilt
    return model if consistent(model) else None  # so is one that reads but makes no model


def consistent(model: MorphableModel) -> bool:
    """Whether the arrays of ``model`` make one model: matching sizes, indices in range, finite."""
    n = len(model.mean_shape)
    sized = lambda t, *shape: tuple(t.shape) == tuple(s if s is not None else t.shape[i] for i, s in enumerate(shape))
    checks = [model.mean_shape.ndim == 2 and model.mean_shape.shape[1] == 3,
              sized(model.shape_basis, None, n, 3), sized(model.expression_basis, None, n, 3),
              sized(model.diffuse_mean, n, 3), sized(model.specular_mean, n, 3),
              sized(model.diffuse_basis, None, n, 3), sized(model.specular_basis, model.n_albedo, n, 3),
              sized(model.faces, None, 3), sized(model.uv_faces, len(model.faces), 3), sized(model.uvs, None, 2),
              sized(model.landmark_vertices, 68, 3), sized(model.landmark_barycentric, 68, 3)]
    if not all(checks) or len(model.faces) == 0:
        return False
    in_range = [0 <= int(model.faces.min()) and int(model.faces.max()) < n,
                len(model.uvs) == 0 or (0 <= int(model.uv_faces.min()) and int(model.uv_faces.max()) < len(model.uvs)),
                int(model.landmark_vertices.max()) < n,
                bool(((model.landmark_vertices >= 0).all(1) | (model.landmark_vertices < 0).all(1)).all())]
    finite = all(bool(np.isfinite(getattr(model, name).numpy()).all()) for name in
                 ('mean_shape', 'shape_basis', 'expression_basis', 'diffuse_mean', 'diffuse_basis', 'uvs'))
    head = model.head
    head_ok = head is None or (
        sized(head.shape_basis, model.n_shape, len(head.mean_shape), 3)
        and sized(head.expression_basis, model.n_expression, len(head.mean_shape), 3)
        and len(head.mean_shape) >= n and bool(torch.equal(head.mean_shape[:n], model.mean_shape))
        and sized(head.parts, len(head.faces)) and int(head.faces.max()) < len(head.mean_shape)
        and skinning_consistent(head.skinning, head))
    return all(in_range) and finite and head_ok and skinning_consistent(model.skinning, model)


def skinning_consistent(skinning: Skinning, mesh) -> bool:
    """Whether the joints of ``skinning`` (or None) fit the ``MorphableModel`` or ``HeadMesh`` ``mesh``."""
    if skinning is None:
        return True
    joints, n = len(skinning.parents), len(mesh.mean_shape)
    return (tuple(skinning.weights.shape) == (n, joints) and tuple(skinning.joint_mean.shape) == (joints, 3)
            and tuple(skinning.pose_basis.shape) == ((joints - 1) * 9, n, 3)
            and tuple(skinning.joint_shape_basis.shape) == (mesh.shape_basis.shape[0], joints, 3)
            and tuple(skinning.joint_expression_basis.shape) == (mesh.expression_basis.shape[0], joints, 3)
            and int(skinning.parents[0]) == -1
            and bool(((skinning.parents[1:] >= 0) & (skinning.parents[1:] < torch.arange(1, joints))).all())
            and bool(((skinning.posed_joints > 0) & (skinning.posed_joints < joints)).all()))


def cached(sources: list, kind: str, build, what: str, remedy: str) -> MorphableModel:
    """The model of ``sources`` from the cache, else ``build()`` and cached. A file that the
    build finds missing, truncated or inconsistent stops it with a ModelFileError naming
    ``what`` was read and the ``remedy``."""
    path = cache_path(sources, kind)
    model = _load_cache(path)
    if model is None:
        try:
            model = build()
        except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
            raise ModelFileError(f'{what} is incomplete or damaged ({type(error).__name__}: {str(error)[:160]}): '
                                 f'{remedy}') from None
        try:
            _save_cache(path, model)
        except OSError:
            pass  # a read-only home only costs the speed-up
    return model


# ------------------------------------------------------------------------ the canonical model

def _tensor(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def canonical_model(name, mean_shape, shape_basis, expression_basis, faces, uvs, uv_faces, landmarks: tuple,
                     diffuse_mean, diffuse_basis, specular_mean, specular_basis, head: dict = None,
                     expression_names: tuple = (), skinning: dict = None) -> MorphableModel:
    """Arrays in the model's own frame (y up, face toward +z, mm) -> a canonical ``MorphableModel``.

    ``landmarks``: (triangle corners [68, 3], barycentric weights [68, 3]) of the iBUG points
    (``vertex_landmarks`` for points on vertices). Without ``uvs`` a low-distortion UV map is computed. Faces are re-oriented so that their
    normals point toward the camera. ``head`` (the arrays of ``HeadMesh`` in the model's own
    frame, its first vertices the face's) is brought into the same frame: centred on the face;
    so is ``skinning`` (the arrays of ``Skinning`` in the model's frame, mm; ``frame`` and
    ``origin`` are set here)."""
    centre = mean_shape.mean(axis=0)
    mean_shape = (mean_shape - centre) * TO_CAMERA_FRAME
    shape_basis = shape_basis * TO_CAMERA_FRAME
    expression_basis = expression_basis * TO_CAMERA_FRAME
    flip = utils.face_normals_np(mean_shape, faces)[:, 2].sum() > 0  # must face the camera (-z)
    if flip:
        faces = faces[:, ::-1]
        uv_faces = None if uv_faces is None else uv_faces[:, ::-1]
    if uvs is None:
        try:
            uvs, uv_faces = face_uv_map(mean_shape, faces), faces
        except ValueError as error:
            raise ModelFileError(f"the {name} model's mesh has no UV map and none can be made ({error}): "
                                 f"use the model's original files") from None
    head_mesh = None
    if head is not None:
        corners = (lambda a: a[:, ::-1]) if flip else (lambda a: a)
        head_mesh = HeadMesh(
            mean_shape=_tensor((head['mean_shape'] - centre) * TO_CAMERA_FRAME),
            shape_basis=_tensor(head['shape_basis'] * TO_CAMERA_FRAME),
            expression_basis=_tensor(head['expression_basis'] * TO_CAMERA_FRAME),
            faces=_tensor(corners(head['faces']), torch.int64), uvs=_tensor(head['uvs']),
            uv_faces=_tensor(corners(head['uv_faces']), torch.int64), parts=_tensor(head['parts'], torch.int64))
    if skinning is not None:
        skinning = Skinning(
            parents=_tensor(skinning['parents'], torch.int64), posed_joints=_tensor(skinning['posed_joints'], torch.int64),
            joint_mean=_tensor((skinning['joint_mean'] - centre) * TO_CAMERA_FRAME),
            joint_shape_basis=_tensor(skinning['joint_shape_basis'] * TO_CAMERA_FRAME),
            joint_expression_basis=_tensor(skinning['joint_expression_basis'] * TO_CAMERA_FRAME),
            pose_basis=_tensor(skinning['pose_basis'] * TO_CAMERA_FRAME), weights=_tensor(skinning['weights']),
            frame=_tensor(TO_CAMERA_FRAME), origin=_tensor(centre), pose_sigma=_tensor(np.array(skinning['pose_sigma'])))
        head_mesh = head_mesh and dataclasses.replace(head_mesh, skinning=skinning)
    return MorphableModel(
        name=name, mean_shape=_tensor(mean_shape), shape_basis=_tensor(shape_basis),
        expression_basis=_tensor(expression_basis), faces=_tensor(faces, torch.int64),
        uvs=_tensor(uvs), uv_faces=_tensor(uv_faces, torch.int64),
        landmark_vertices=_tensor(landmarks[0], torch.int64), landmark_barycentric=_tensor(landmarks[1]),
        diffuse_mean=_tensor(diffuse_mean), diffuse_basis=_tensor(diffuse_basis),
        specular_mean=_tensor(specular_mean), specular_basis=_tensor(specular_basis), head=head_mesh,
        expression_names=tuple(expression_names), skinning=skinning)
