"""The path from scene parameters to vertices, maps and images, and the parameters themselves.

Camera conventions (fixed for every output): camera coordinates x right, y down, z forward, mm;
a point (x, y, z) projects to pixel (f·x/z + w/2, f·y/z + h/2) of the fitted image, f in pixels.
Pose maps the canonical model (see ``morphableModel``) to the camera: X_cam = R(rotation) X + t.

``Pipeline`` wraps the morphable model, the SH light and one renderer per image; ``decode``
turns ``SceneParameters`` into everything the losses and the result writers consume.
"""
import functools
import math
import warnings
from dataclasses import dataclass, fields

import numpy as np
import scipy.ndimage
import scipy.sparse
import torch
from scipy.spatial.transform import Rotation

import renderer
import utils
from config import Config
from morphableModel import MorphableModel
from skinning import rotation_matrix
from sphericalharmonics import EnvironmentMap, constant_light

# Roughness (GGX α) of the maps before stage 3 fits them per texel.
INITIAL_ROUGHNESS = 0.45
# Stages 2 and 3 fit maps of at most this many texels per pixel of the fitted image's side: the
# photo holds no finer detail (a 256 px fit: 1024² texels, about 25 per pixel of the face), and
# per-texel fitting costs about 390 bytes a texel (a 2048² fit peaked at 2.5 GB). Larger maps
# are upsampled from them for output; the photo map is made at the full textureResolution.
TEXELS_PER_PIXEL = 4
# Margin around the face's projected bounding box that is ray traced, as a fraction of the image
# size: room for the pose and shape to move in stages 2 and 3.
FACE_CROP_MARGIN = 0.08


# ------------------------------------------------------------------------------ camera math

def axis_angle_from_matrix(matrix: np.ndarray) -> np.ndarray:
    """[3, 3] rotation -> [3] axis-angle."""
    return Rotation.from_matrix(matrix).as_rotvec()


def to_camera(points: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Canonical points [n, k, 3], axis-angle [n, 3], translation [n, 3] -> camera points [n, k, 3]."""
    return points @ rotation_matrix(rotation).transpose(1, 2) + translation[:, None, :]


def project(points: torch.Tensor, focal: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Camera points [n, k, 3], focal [n] (px), image centres (w/2, h/2) [n, 2] -> pixels [n, k, 2]."""
    z = points[..., 2].clamp_min(1e-3)
    return focal[:, None, None] * points[..., :2] / z[..., None] + centre[:, None, :]


def face_box(pixels: torch.Tensor, width: int, height: int, margin: float):
    """The whole pixels (x0, y0, x1, y1) that hold the projected vertices ``pixels`` [verts, 2]
    and ``margin`` px around them inside the [height, width] image; None where that box is
    under 8 px on a side (nothing to crop to)."""
    low = torch.floor(pixels.min(0).values - margin).clamp_min(0)
    high = torch.ceil(pixels.max(0).values + margin).clamp_max(torch.tensor([width, height]))
    return (*low.int().tolist(), *high.int().tolist()) if bool((high - low >= 8).all()) else None


def image_centres(sizes: list, dtype=torch.float32) -> torch.Tensor:
    """Image sizes [(w, h)] -> centres (w/2, h/2) [n, 2], the principal points of ``project``."""
    return torch.tensor([(width / 2, height / 2) for width, height in sizes], dtype=dtype)


# ------------------------------------------------------------------------- scene parameters

@dataclass
class SceneParameters:
    """Everything a fit estimates. ``n`` images; identity tensors have 1 row with a shared identity.
    It is also the checkpoint: ``save`` and ``load`` write and read all of it."""
    identity: torch.Tensor     # [n_id, n_shape] identity shape coefficients, prior N(0, 1)
    expression: torch.Tensor   # [n, n_expr], prior N(0, 1)
    rotation: torch.Tensor     # [n, 3] axis-angle, radians
    translation: torch.Tensor  # [n, 3] mm
    focal: torch.Tensor        # [n] pixels
    albedo: torch.Tensor       # [n_id, n_albedo] statistical albedo coefficients, prior N(0, 1)
    sh: torch.Tensor           # [n, bands², 3] spherical-harmonics light, linear RGB
    diffuse_map: torch.Tensor = None    # [n_id, res, res, 3] per-texel diffuse albedo (stage 3)
    specular_map: torch.Tensor = None   # [n_id, res, res, 3]
    roughness_map: torch.Tensor = None  # [n_id, res, res, 1] GGX α
    stage: int = 0                      # the last stage that finished

    @staticmethod
    def zeros(model: MorphableModel, n_images: int, n_identities: int, bands: int) -> 'SceneParameters':
        """The mean face at the camera's origin, no light: fill in what a test or a stage knows."""
        return SceneParameters(
            identity=torch.zeros(n_identities, model.n_shape), expression=torch.zeros(n_images, model.n_expression),
            rotation=torch.zeros(n_images, 3), translation=torch.zeros(n_images, 3), focal=torch.zeros(n_images),
            albedo=torch.zeros(n_identities, model.n_albedo), sh=torch.zeros(n_images, bands ** 2, 3))

    @property
    def n_images(self) -> int:
        return self.expression.shape[0]

    @property
    def shared_identity(self) -> bool:
        return self.identity.shape[0] == 1 and self.n_images > 1

    def identity_row(self, image: int) -> int:
        """Row of the identity tensors that belongs to image row ``image``."""
        return 0 if self.identity.shape[0] == 1 else image

    def for_image(self, image: int) -> 'SceneParameters':
        """The parameters of image row ``image`` alone (its identity rows picked accordingly)."""
        row = self.identity_row(image)
        per_identity = ('identity', 'albedo', 'diffuse_map', 'specular_map', 'roughness_map')
        pick = lambda name, t: None if t is None else t[(row if name in per_identity else image):][:1]
        return SceneParameters(**{name: pick(name, t) for name, t in self.tensors(with_none=True).items()},
                               stage=self.stage)

    def tensors(self, with_none: bool = False) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != 'stage' and (with_none or getattr(self, f.name) is not None)}

    def to(self, device) -> 'SceneParameters':
        """The same parameters with every tensor on ``device`` (those already there not copied)."""
        return SceneParameters(**{k: v.to(device) for k, v in self.tensors().items()}, stage=self.stage)

    def detached(self) -> 'SceneParameters':
        """A copy that shares no autograd graph with this one."""
        return SceneParameters(**{k: v.detach().clone() for k, v in self.tensors().items()}, stage=self.stage)

    def save(self, path: str) -> None:
        """All tensors to a ``.pt`` checkpoint (atomically)."""
        with utils.atomic_path(path) as temporary:
            torch.save({**self.tensors(), 'stage': self.stage}, temporary)

    @staticmethod
    def load(path: str) -> 'SceneParameters':
        data = torch.load(path, map_location='cpu', weights_only=True)
        if 'shape' in data:  # checkpoints written before the identity was named so
            data['identity'] = data.pop('shape')
        return SceneParameters(**data)


# --------------------------------------------------------------------- per-vertex -> texels

# Texels per block of the UV rasterisation and interpolation: all 2048² texels at once would
# hold gigabytes of candidates; blocks keep the transient memory near 100 MB.
TEXEL_BLOCK = 1 << 20


def uv_triangle_of_texels(uvs: np.ndarray, uv_faces: np.ndarray, resolution: int) -> np.ndarray:
    """The UV triangle that holds each texel centre [res, res] (-1 for none), by rasterising
    every triangle over the texels of its bounding box (row 0 at v = 1), in blocks of triangles."""
    corners = np.stack([uvs[uv_faces][..., 0] * resolution - 0.5,
                        (1 - uvs[uv_faces][..., 1]) * resolution - 0.5], axis=-1)  # [tris, 3, (col, row)]
    low = np.clip(np.ceil(corners.min(1)), 0, resolution).astype(np.int64)
    high = np.clip(np.floor(corners.max(1)), -1, resolution - 1).astype(np.int64)
    extent = np.maximum(high - low + 1, 0)  # [tris, 2] texels in the bounding box
    count = extent[:, 0] * extent[:, 1]
    result = np.full((resolution, resolution), -1, np.int32)
    blocks = np.searchsorted(np.cumsum(count), np.arange(TEXEL_BLOCK, count.sum(), TEXEL_BLOCK))
    for triangles in np.split(np.arange(len(uv_faces)), blocks):
        tri = np.repeat(triangles, count[triangles])
        first = np.cumsum(count[triangles]) - count[triangles]
        k = np.arange(len(tri)) - np.repeat(first, count[triangles])
        col = low[tri, 0] + k % extent[tri, 0]
        row = low[tri, 1] + k // extent[tri, 0]
        a, b, c = corners[tri, 0], corners[tri, 1], corners[tri, 2]  # [candidates, 2]
        edge = lambda p, q: (q[:, 0] - p[:, 0]) * (row - p[:, 1]) - (q[:, 1] - p[:, 1]) * (col - p[:, 0])
        e0, e1, e2 = edge(a, b), edge(b, c), edge(c, a)
        eps = 1e-9
        inside = ((e0 >= -eps) & (e1 >= -eps) & (e2 >= -eps)) | ((e0 <= eps) & (e1 <= eps) & (e2 <= eps))
        result[row[inside], col[inside]] = tri[inside]
    return result


def barycentric(corners: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Barycentric weights [k, 3] of points [k, 2] in triangles [k, 3, 2], clipped into the
    triangle (for texels outside the UV map, copied from the nearest inside one)."""
    e1, e2, p = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], points - corners[:, 0]
    determinant = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    b1 = (p[:, 0] * e2[:, 1] - p[:, 1] * e2[:, 0]) / determinant
    b2 = (e1[:, 0] * p[:, 1] - e1[:, 1] * p[:, 0]) / determinant
    weights = np.clip(np.stack([1 - b1 - b2, b1, b2], axis=1), 0, 1)
    return weights / weights.sum(axis=1, keepdims=True)


def texel_interpolation(uvs: np.ndarray, uv_faces: np.ndarray, faces: np.ndarray, resolution: int) -> tuple:
    """Per-vertex values -> UV texture, as the three vertices [res·res, 3] (int32) and their
    barycentric weights [res·res, 3] (float32) of every texel, and the mask of the texels inside
    the UV map [res, res].

    Texel (row, col) has its centre at u = (col + ½)/res, v = 1 − (row + ½)/res (row 0 on top, as
    the map images are saved). Its value interpolates the three vertices of the UV triangle that
    holds it; texels outside every triangle copy the nearest inside texel, so bilinear lookups
    near the UV boundary and seams do not bleed in black."""
    triangle = uv_triangle_of_texels(uvs, uv_faces, resolution)  # [res, res], -1 outside
    inside = triangle >= 0
    if not inside.any():
        raise ValueError('the UV map covers no texel')
    nearest = scipy.ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
    triangle = triangle[nearest[0], nearest[1]].ravel()  # each texel -> the triangle of an inside texel
    centres = (np.arange(resolution) + 0.5) / resolution
    vertices = np.empty((resolution * resolution, 3), np.int32)
    weights = np.empty((resolution * resolution, 3), np.float32)
    for block in range(0, resolution * resolution, TEXEL_BLOCK):
        texels = np.arange(block, min(block + TEXEL_BLOCK, resolution * resolution))
        rows, cols = nearest[0].ravel()[texels], nearest[1].ravel()[texels]
        points = np.stack([centres[cols], 1 - centres[rows]], axis=1)  # the (inside) texel copied
        weights[texels] = barycentric(uvs[uv_faces[triangle[texels]]], points)
        vertices[texels] = faces[triangle[texels]]
    return vertices, weights, inside


def sparse_interpolation(vertices: np.ndarray, weights: np.ndarray, n_vertices: int, device='cpu'):
    """The interpolation of ``texel_interpolation`` (vertices and weights [m, 3]) as a
    differentiable function: per-vertex values x [n_vertices, c] -> texels [m, c]. A sparse CSR
    product (int32 indices) on ``device``, its transpose made in CSR at the first backward pass and
    kept: torch's own backward of a sparse product converts on every call (0.10 s per call for a
    512² map of 28.8k vertices on this project's CPU). Maps that are only exported, never fitted,
    need no transpose (at 2048² texels each matrix is 100 MB)."""
    m = len(vertices)
    rows = np.arange(0, 3 * m + 1, 3, dtype=np.int32)
    forward = scipy.sparse.csr_matrix((weights.ravel(), vertices.ravel(), rows), shape=(m, n_vertices))

    def to_torch(matrix: scipy.sparse.csr_matrix) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', 'Sparse CSR tensor support is in beta')
            warnings.filterwarnings('ignore', 'Sparse invariant checks are implicitly disabled')
            return torch.sparse_csr_tensor(torch.from_numpy(matrix.indptr.astype(np.int32, copy=False)),
                                           torch.from_numpy(matrix.indices.astype(np.int32, copy=False)),
                                           torch.from_numpy(matrix.data.astype(np.float32, copy=False)), matrix.shape,
                                           check_invariants=False).to(device)
    matrix, transposed = to_torch(forward), functools.cache(lambda: to_torch(forward.T.tocsr()))
    interpolate = lambda x: _SparseProduct.apply(matrix, transposed, x)
    interpolate.weights = forward  # [m, n_vertices] scipy CSR, for least-squares solves
    return interpolate


class _SparseProduct(torch.autograd.Function):
    """matrix @ x, with the backward pass by the transposed matrix in CSR (``transposed()``)."""

    @staticmethod
    def forward(ctx, matrix, transposed, x):
        ctx.transposed = transposed
        return matrix @ x

    @staticmethod
    def backward(ctx, gradient):
        return None, None, ctx.transposed() @ gradient


# ---------------------------------------------------------------------------- the pipeline

class Pipeline:
    """Scene parameters -> vertices, landmarks, reflectance maps, light and ray-traced images.

    ``sizes`` [(w, h)] are the fitted images' sizes: one renderer per image, built on its first
    render. One per image, as prb's backward pass re-reads the scene's parameters: a scene
    shared by two renders of one loss would differentiate the first with the second's.

    Every method works on the device of the parameters it is given: the fit's stages move them
    to ``device`` (the GPU with ``device = 'cuda'``), the result writers hand them on the CPU;
    the model and the UV interpolation are copied to each device once."""

    def __init__(self, model: MorphableModel, config: Config, sizes: list, crop_to_face: bool = True):
        self.model, self.config, self.sizes = model, config, list(sizes)
        self.device = compute_device(config)
        self.centres = image_centres(self.sizes)  # [n, 2]
        self.crop_to_face = crop_to_face  # ray trace only around the face (see ``renderer``)
        self._renderers, self._models = {}, {model.mean_shape.device: model}
        self._texel_layouts, self._texel_maps = {}, {}  # by resolution; by (resolution, device)
        self.resolution = fitted_texture_resolution(config)  # of the maps that are fitted and rendered
        self.envmap = EnvironmentMap(config.bands, config.envMapRes, config.smoothSh)

    def model_on(self, device: torch.device) -> MorphableModel:
        """The model with its tensors on ``device`` (a tensor's ``.device``), copied there once."""
        if device not in self._models:
            self._models[device] = self.model.to(device)
        return self._models[device]

    # textures
    def texels(self, resolution: int, device: torch.device = torch.device('cpu')) -> tuple:
        """The UV interpolation at ``resolution`` on ``device``, built once: (per-vertex values
        [verts, c] -> texels [res·res, c], mask of the texels inside the UV map [res, res])."""
        if (resolution, device) not in self._texel_maps:
            if resolution not in self._texel_layouts:
                self._texel_layouts[resolution] = texel_interpolation(
                    self.model.uvs.numpy(), self.model.uv_faces.numpy(), self.model.faces.numpy(), resolution)
            vertices, weights, mask = self._texel_layouts[resolution]
            self._texel_maps[resolution, device] = (
                sparse_interpolation(vertices, weights, len(self.model.mean_shape), device), mask)
        return self._texel_maps[resolution, device]

    @property
    def texel_mask(self) -> np.ndarray:
        """[res, res] the fitted maps' texels inside the UV map."""
        return self.texels(self.resolution)[1]

    @property
    def export_mask(self) -> np.ndarray:
        """[textureResolution, textureResolution] the exported maps' texels inside the UV map."""
        return self.texels(self.config.textureResolution)[1]

    # geometry
    def vertices(self, params: SceneParameters) -> torch.Tensor:
        """Camera-space vertices [n, verts, 3] of every image."""
        return model_vertices(self.model_on(params.identity.device), params)

    def landmarks(self, params: SceneParameters, vertices: torch.Tensor) -> torch.Tensor:
        """The model's 68 landmarks in pixels [n, 68, 2] (rows of iBUG points without a vertex
        hold vertex 0: weigh them out with ``fitting.Targets.landmark_weights``)."""
        points = self.model_on(vertices.device).landmark_points(vertices)
        return project(points, params.focal, self.centres.to(vertices.device))

    # reflectance and light
    def vertex_texture(self, values: torch.Tensor, resolution: int = None) -> torch.Tensor:
        """Per-vertex values [verts, c] -> UV map [res, res, c] (res: the fitted maps', unless given)."""
        resolution = resolution or self.resolution
        return self.texels(resolution, values.device)[0](values).reshape(resolution, resolution, -1)

    def statistical_maps(self, params: SceneParameters, identity: int, resolution: int = None) -> tuple:
        """The diffuse and specular maps [res, res, 3] of the statistical albedo of identity row
        ``identity``."""
        coefficients = params.albedo[identity:identity + 1]
        model = self.model_on(coefficients.device)
        diffuse = model.diffuse_albedo(coefficients)[0].clamp(0, 1)
        specular = model.specular_albedo(coefficients)[0].clamp(0, 1)
        return self.vertex_texture(diffuse, resolution), self.vertex_texture(specular, resolution)

    def maps(self, params: SceneParameters, identity: int) -> tuple:
        """(diffuse [res, res, 3], specular [res, res, 3], roughness [res, res, 1]) of identity
        row ``identity``: per-texel from stage 3 on, else the statistical albedo with a uniform
        roughness."""
        if params.diffuse_map is not None:
            return params.diffuse_map[identity], params.specular_map[identity], params.roughness_map[identity]
        diffuse, specular = self.statistical_maps(params, identity)
        return diffuse, specular, torch.full((*diffuse.shape[:2], 1), INITIAL_ROUGHNESS, device=diffuse.device)

    def export_maps(self, params: SceneParameters, identity: int) -> tuple:
        """``maps`` at textureResolution: the fitted per-texel maps resampled to it, or the
        statistical albedo evaluated at it."""
        resolution = self.config.textureResolution
        if params.diffuse_map is None:
            diffuse, specular = self.statistical_maps(params, identity, resolution)
            return diffuse, specular, torch.full((resolution, resolution, 1), INITIAL_ROUGHNESS, device=diffuse.device)
        return tuple(resize_map(texture, resolution) for texture in self.maps(params, identity))

    def initial_light(self, params: SceneParameters, photos: list) -> torch.Tensor:
        """Uniform SH light [n, bands², 3] that makes the mean albedo match each photo's mean face
        colour (``photos``: linear [h, w, 3] per image)."""
        vertices = self.vertices(params)
        lights = []
        for row, photo in enumerate(photos):
            with torch.no_grad():
                rendered = self.render(params, row, spp=4, seed=0, vertices=vertices[row])
            alpha = rendered[..., 3:] > 0.5
            photo_mean = (photo * alpha).sum((0, 1)) / alpha.sum().clamp_min(1)
            albedo_mean = self.model_on(photo_mean.device).diffuse_mean.mean(0)
            lights.append(constant_light(self.config.bands, photo_mean / albedo_mean.clamp_min(0.05)))
        return torch.stack(lights)

    # images
    def renderer(self, row: int, vertices: torch.Tensor = None, focal: float = None) -> renderer.FaceRenderer:
        """The renderer of image row ``row``, built once. Given the geometry of its first use
        (``vertices`` [verts, 3], ``focal``), it ray traces only the face's bounding box and a
        margin: the loss sees only face pixels, and the background is half the image."""
        if row not in self._renderers:
            width, height = self.sizes[row]
            crop = None
            if vertices is not None and self.crop_to_face:
                pixels = project(vertices.detach().cpu()[None], torch.tensor([focal]), self.centres[row:row + 1])[0]
                crop = face_box(pixels, width, height, FACE_CROP_MARGIN * max(width, height))
            config = self.config
            self._renderers[row] = renderer.FaceRenderer(
                self.model.faces, self.model.uv_faces, self.model.uvs, width, height, self.resolution,
                config.envMapRes, config.device, config.integrator, crop)
        return self._renderers[row]

    def render_maps(self, row: int, vertices: torch.Tensor, focal: float, diffuse: torch.Tensor,
                    specular: torch.Tensor, roughness: torch.Tensor, envmap: torch.Tensor, spp: int,
                    seed: int = 0, sample_light: bool = True) -> torch.Tensor:
        """RGBA render [h, w, 4] of image row ``row`` with the given maps ([res, res, 3|3|1]) and
        environment map ([rows, 2·rows, 3], or [1, 1, 3] for a uniform one); ``sample_light`` as
        for ``FaceRenderer.render``."""
        normals = utils.vertex_normals(vertices[None], self.model_on(vertices.device).faces)[0]
        envmap = envmap.expand(self.config.envMapRes, 2 * self.config.envMapRes, 3)
        return self.renderer(row, vertices, focal).render(vertices, normals, diffuse, specular, roughness, envmap,
                                                          focal, spp, seed, self.centres[row].tolist(), sample_light)

    def render(self, params: SceneParameters, row: int, spp: int, seed: int, vertices: torch.Tensor) -> torch.Tensor:
        """RGBA render [h, w, 4] (linear colour) of image row ``row`` with its camera-space
        ``vertices`` [verts, 3] (the fitted ones, or any others: a turntable's)."""
        return self.render_maps(row, vertices, float(params.focal[row]), *self.maps(params, params.identity_row(row)),
                                self.envmap(params.sh[row:row + 1])[0], spp, seed)

    def decode(self, params: SceneParameters) -> dict:
        """Everything the result writers need, computed once (no gradients):
        vertices [n, verts, 3] (camera frame) and their pixels [n, verts, 2], landmarks [n, 68, 2]
        (px), per identity row the maps (diffuse, specular, roughness) [res, res, 3|3|1] (linear,
        at textureResolution),
        envmaps [n, rows, 2·rows, 3]; the exported head (``MorphableModel.export_mesh``) in the
        model frame: head_vertices [n, head verts, 3], and per identity row at a neutral
        expression, neutral_heads [n_id, head verts, 3]."""
        mesh = self.model.export_mesh()
        with torch.no_grad():
            vertices = self.vertices(params)
            identity_of_image = params.identity[[params.identity_row(row) for row in range(params.n_images)]]
            return dict(vertices=vertices, vertex_pixels=project(vertices, params.focal, self.centres),
                        landmarks=self.landmarks(params, vertices),
                        maps=[self.export_maps(params, k) for k in range(params.identity.shape[0])],
                        envmaps=self.envmap(params.sh),
                        head_vertices=mesh.vertices(identity_of_image, params.expression),
                        neutral_heads=mesh.vertices(params.identity, params.expression.new_zeros(
                            params.identity.shape[0], self.model.n_expression)))

    def turntable(self, params: SceneParameters, row: int, vertices: torch.Tensor, frames: int,
                  degrees: float, spp: int) -> list:
        """The head of image row ``row`` (``vertices`` [verts, 3]) turning ±``degrees`` about its
        vertical axis through its centre, in its fitted light -> RGBA renders [h, w, 4]."""
        centre = vertices.mean(0)
        renders = []
        with torch.no_grad():
            for k in range(frames):
                angle = math.radians(degrees) * math.sin(2 * math.pi * k / frames)
                turn = rotation_matrix(torch.tensor([[0.0, angle, 0.0]]))[0]
                renders.append(self.render(params, row, spp, k, (vertices - centre) @ turn.T + centre))
        return renders

    def texel_view(self, params: SceneParameters, row: int, vertices: torch.Tensor, resolution: int = None) -> dict:
        """How the camera of image row ``row`` sees each texel (at ``resolution``, by default
        textureResolution) of the surface with ``vertices`` [verts, 3]: its pixel [res, res, 2]
        in the fitted image, the cosine between its normal and the direction to the camera
        [res, res], and whether a ray from the camera reaches it first (ray traced) [res, res];
        texels outside the UV map are not visible."""
        resolution = resolution or self.config.textureResolution
        with torch.no_grad():
            points = self.vertex_texture(vertices, resolution)  # [res, res, 3]
            normals = torch.nn.functional.normalize(
                self.vertex_texture(utils.vertex_normals(vertices[None], self.model.faces)[0], resolution), dim=-1)
            to_camera = -torch.nn.functional.normalize(points, dim=-1)
            pixels = project(points.reshape(1, -1, 3), params.focal[row:row + 1], self.centres[row:row + 1])[0]
            inside = torch.from_numpy(self.texels(resolution)[1])
            visible = torch.zeros_like(inside)
            focal = float(params.focal[row])
            visible[inside] = self.renderer(row, vertices, focal).visible_from_camera(vertices, points[inside])
        return dict(pixels=pixels.reshape(*points.shape[:2], 2), facing=(normals * to_camera).sum(-1), visible=visible)

    def uv_image(self, row: int, vertices: torch.Tensor, focal: float) -> torch.Tensor:
        """The texture coordinate seen by each pixel of image row ``row`` [h, w, 2] (v up)."""
        return self.renderer(row, vertices, focal).uv_image(vertices, focal, self.centres[row].tolist())


def compute_device(config: Config) -> torch.device:
    """Where the fit's tensors live: the GPU with ``device = 'cuda'`` where one is usable, else the CPU."""
    if config.device == 'cuda' and torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def fitted_texture_resolution(config: Config) -> int:
    """The side of the maps that stages 2 and 3 fit: textureResolution, halved while it is over
    TEXELS_PER_PIXEL · maxResolution (and over 256)."""
    resolution = config.textureResolution
    while resolution > max(256, TEXELS_PER_PIXEL * config.maxResolution):
        resolution //= 2
    return resolution


def resize_map(texture: torch.Tensor, resolution: int) -> torch.Tensor:
    """A map [res, res, c] resampled (bilinear) to [resolution, resolution, c]."""
    if texture.shape[0] == resolution:
        return texture
    resized = torch.nn.functional.interpolate(texture.permute(2, 0, 1)[None], size=(resolution, resolution),
                                              mode='bilinear', align_corners=False)
    return resized[0].permute(1, 2, 0)


def model_vertices(model: MorphableModel, params: SceneParameters) -> torch.Tensor:
    """Camera-space vertices [n, verts, 3] of every image."""
    identity = params.identity.expand(params.n_images, -1) if params.identity.shape[0] == 1 else params.identity
    return to_camera(model.vertices(identity, params.expression), params.rotation, params.translation)
