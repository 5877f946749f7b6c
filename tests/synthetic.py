"""Small face models in the exact Basel 2017 / AlbedoMM HDF5 schemas, made from scratch.

The mean shape is a face-like height field on a disk (an ellipsoidal cap with a nose, brows and
eye sockets), in the BFM frame (mm, y up, face toward +z). Bases are smooth random fields,
orthonormalised, so the files have the real schema: ``model/mean`` [3N] interleaved xyz,
``model/pcaBasis`` [3N, K] with orthonormal columns, ``model/pcaVariance`` [K],
``representer/cells`` [3, T], ``metadata/landmarks/json``. Used by the tests and ``benchmark.py``.
"""
import json
import math
import os
import pickle

import numpy as np
import torch

import fitting
import modelFiles
import results
from photos import FitImage
from pipeline import INITIAL_ROUGHNESS, Pipeline, SceneParameters

FACE_HALF_WIDTH, FACE_HALF_HEIGHT, FACE_DEPTH = 75.0, 100.0, 60.0


def face_height(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Depth (toward the viewer, mm) of the synthetic face at (x, y)."""
    rho2 = np.clip((x / FACE_HALF_WIDTH) ** 2 + (y / FACE_HALF_HEIGHT) ** 2, 0, 1)
    cap = FACE_DEPTH * np.sqrt(1 - 0.9 * rho2)
    nose = 22 * np.exp(-((x / 9) ** 2 + ((y + 5) / 22) ** 2)) * (y < 25) + 8 * np.exp(-((x / 7) ** 2 + ((y - 25) / 14) ** 2))
    sockets = -8 * (np.exp(-(((x - 33) / 14) ** 2 + ((y - 28) / 9) ** 2)) + np.exp(-(((x + 33) / 14) ** 2 + ((y - 28) / 9) ** 2)))
    brows = 4 * np.exp(-(((np.abs(x) - 30) / 20) ** 2 + ((y - 42) / 5) ** 2))
    lips = 5 * np.exp(-((x / 25) ** 2 + ((y + 42) / 8) ** 2))
    return cap + nose + sockets + brows + lips


def face_mesh(rings: int, segments: int):
    """A disk mesh: one centre vertex and ``rings`` rings of ``segments`` vertices.
    -> vertices [1 + rings·segments, 3], triangles [segments·(2·rings - 1), 3] (counter-clockwise)."""
    radius = np.repeat(np.arange(1, rings + 1) / rings, segments)
    angle = np.tile(np.arange(segments) * 2 * np.pi / segments, rings)
    x = np.concatenate([[0.0], FACE_HALF_WIDTH * radius * np.cos(angle)])
    y = np.concatenate([[0.0], FACE_HALF_HEIGHT * radius * np.sin(angle)])
    vertices = np.stack([x, y, face_height(x, y)], axis=1).astype(np.float32)
    index = lambda ring, seg: 1 + ring * segments + seg % segments
    seg = np.arange(segments)
    triangles = [np.stack([np.zeros(segments, int), index(0, seg), index(0, seg + 1)], axis=1)]
    for ring in range(rings - 1):
        a, b = index(ring, seg), index(ring, seg + 1)
        c, d = index(ring + 1, seg), index(ring + 1, seg + 1)
        triangles += [np.stack([a, c, d], axis=1), np.stack([a, d, b], axis=1)]
    return vertices, np.concatenate(triangles).astype(np.int64)


def ibug_layout() -> np.ndarray:
    """A rough iBUG-68 layout on the synthetic face, (x, y) in mm, BFM frame [68, 2].
    Subject's right (iBUG 0, 36, 48) is at negative x."""
    t = np.linspace(-np.pi * 0.95, -np.pi * 0.05, 17)
    jaw = np.stack([62 * np.cos(t), -12 + 78 * np.sin(t) * 0.85], axis=1)
    brow_r = np.stack([np.linspace(-52, -14, 5), [38, 44, 46, 45, 42]], axis=1)
    brow_l = brow_r[::-1] * [-1, 1]
    bridge = np.stack([np.zeros(4), np.linspace(30, 2, 4)], axis=1)
    nostrils = np.stack([np.linspace(-12, 12, 5), [-8, -10, -11, -10, -8]], axis=1)

    def eye(cx):
        a = np.array([np.pi, 2 * np.pi / 3, np.pi / 3, 0, -np.pi / 3, -2 * np.pi / 3])
        return np.stack([cx + 14 * np.cos(a), 28 + 5 * np.sin(a)], axis=1)
    eye_r, eye_l = eye(-33), eye(33)  # both start at the corner of smaller x, then go over the top
    outer = np.linspace(np.pi, -np.pi, 13)[:-1]
    mouth_outer = np.stack([25 * np.cos(outer), -42 + 9 * np.sin(outer)], axis=1)
    inner = np.linspace(np.pi, -np.pi, 9)[:-1]
    mouth_inner = np.stack([18 * np.cos(inner), -42 + 3 * np.sin(inner)], axis=1)
    return np.concatenate([jaw, brow_r, brow_l, bridge, nostrils, eye_r, eye_l, mouth_outer, mouth_inner])


def nearest_vertices(vertices: np.ndarray, points_xy: np.ndarray) -> np.ndarray:
    """Index of the vertex nearest to each (x, y) [k] -> [k]."""
    d = ((vertices[None, :, :2] - points_xy[:, None, :]) ** 2).sum(-1)
    return d.argmin(axis=1)


def _smooth_basis(vertices: np.ndarray, count: int, channels: int, rng) -> np.ndarray:
    """Orthonormal columns [3N, count] made of smooth random fields over the face."""
    x = vertices[:, 0] / FACE_HALF_WIDTH
    y = vertices[:, 1] / FACE_HALF_HEIGHT
    fields = []
    for _ in range(count):
        field = np.zeros((len(vertices), 3))
        for _ in range(4):
            fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi, 3)
            amplitude = rng.normal(size=3) if channels == 3 else np.repeat(rng.normal(), 3)
            field += amplitude * np.cos(np.pi * (fx * x + fy * y)[:, None] + phase)
        field += 0.05 * rng.normal(size=field.shape)  # keep the columns independent
        fields.append(field.reshape(-1))
    q, _ = np.linalg.qr(np.stack(fields, axis=1))
    return q.astype(np.float32)


def _write_pca(group, mean: np.ndarray, basis: np.ndarray, variance: np.ndarray, cells=None) -> None:
    model = group.create_group('model')
    model['mean'] = mean.reshape(-1).astype(np.float32)
    model['pcaBasis'] = basis.astype(np.float32)
    model['pcaVariance'] = variance.astype(np.float32)
    model['noiseVariance'] = np.float32(0.0)
    if cells is not None:
        representer = group.create_group('representer')
        representer['cells'] = cells.T.astype(np.int32)


def write_bfm(folder: str, rings: int = 20, segments: int = 40, n_shape: int = 199,
              n_expression: int = 100, n_albedo: int = 145, seed: int = 0,
              per_vertex_shape_mm: float = 4.0) -> dict:
    """Write ``model2017-1_face12_nomouth.h5`` and ``albedoModel2020_face12_albedoPart.h5`` into
    ``folder`` and a NextFace-format landmark association file; -> a dict of what was written."""
    import h5py  # here: benchmark.py imports this module, and its memory figures should not count HDF5's libraries
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    vertices, triangles = face_mesh(rings, segments)
    n = len(vertices)
    decay = lambda k, first: first * 0.97 ** np.arange(k)  # per-vertex rms (mm) -> variance of the vector
    shape_variance = (decay(n_shape, per_vertex_shape_mm) ** 2) * n
    expression_variance = (decay(n_expression, per_vertex_shape_mm * 0.6) ** 2) * n
    albedo_variance = (decay(n_albedo, 0.06) ** 2) * n
    landmark_vertices = nearest_vertices(vertices, ibug_layout())
    named = [{'id': name, 'coordinates': vertices[landmark_vertices[ibug]].tolist()}
             for name, ibug in modelFiles.BFM_NAMED_LANDMARKS.items()]

    skin = np.array([0.55, 0.38, 0.30], np.float32)
    diffuse_mean = np.tile(skin, (n, 1)) * (1 - 0.15 * np.exp(-((vertices[:, 1] + 42) / 8) ** 2))[:, None]
    with h5py.File(os.path.join(folder, modelFiles.BFM_FILE), 'w') as h5:
        shape = h5.create_group('shape')
        _write_pca(shape, vertices, _smooth_basis(vertices, n_shape, 3, rng), shape_variance, triangles)
        shape['representer/points'] = vertices.T
        expression = h5.create_group('expression')
        _write_pca(expression, np.zeros_like(vertices), _smooth_basis(vertices, n_expression, 3, rng),
                   expression_variance, triangles)
        h5.create_group('color')  # the real file has one; the fit uses AlbedoMM instead
        h5['metadata/landmarks/json'] = json.dumps(named)
    with h5py.File(os.path.join(folder, modelFiles.ALBEDO_FILE), 'w') as h5:
        _write_pca(h5.create_group('diffuseAlbedo'), diffuse_mean,
                   _smooth_basis(vertices, n_albedo, 3, rng), albedo_variance, triangles)
        _write_pca(h5.create_group('specularAlbedo'), np.full((n, 3), 0.25, np.float32),
                   _smooth_basis(vertices, n_albedo, 1, rng), albedo_variance * 0.25, triangles)
        _write_pca(h5.create_group('shape'), vertices, np.zeros((3 * n, 1)), np.ones(1), triangles)  # dummy
    association = os.path.join(folder, 'landmark_62_association.txt')
    with open(association, 'w') as file:
        file.writelines(f'{i}\t\t{v}\n' for i, v in enumerate(landmark_vertices))
    return dict(folder=folder, vertices=vertices, triangles=triangles, association=association,
                landmark_vertices=landmark_vertices)


def synthetic_photo(model, truth, config, size: int, background: float):
    """A photo of ``truth`` (one image, camera at the centre of a size² px image), ray traced at
    256 spp over a grey ``background`` -> (FitImage with the true landmarks, its Pipeline, its
    fitting Targets, true camera-space vertices [verts, 3])."""
    pipeline = Pipeline(model, config, [(size, size)])
    vertices = pipeline.vertices(truth)
    landmarks = pipeline.landmarks(truth, vertices)[0].numpy()
    with torch.no_grad():
        rendered = pipeline.render(truth, 0, 256, 1, vertices[0]).numpy()
    pixels = np.clip(results.composite(rendered, np.full((size, size, 3), background)), 0, 1).astype(np.float32)
    image = FitImage(0, 'synthetic', pixels, 1.0, landmarks)
    return image, pipeline, fitting.Targets.of(model, [image]), vertices[0]


def rigid_vertex_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance (mm) between vertex sets [v, 3] after the best rotation and translation."""
    a0, b0 = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(a0.T @ b0)
    d = np.sign(np.linalg.det(u @ vt))
    rotation = u @ np.diag([1, 1, d]) @ vt
    return float(np.linalg.norm(a0 @ rotation - b0, axis=1).mean())


# The albedo of the faces that a landmark detector sees (``drawn_albedo``), linear colour.
DRAWN_SKIN, DRAWN_LIPS, DRAWN_BROW_DARKENING = (0.45, 0.30, 0.22), (0.42, 0.12, 0.12), 0.85


def drawn_albedo(model, resolution: int) -> torch.Tensor:
    """A diffuse map [res, res, 3] with what a landmark detector looks for and no shading in it:
    one skin colour with a little mottling, dark brows drawn through the model's brow landmarks
    (iBUG 17-26) and red lips filled inside its outer lip (48-59), in UV (row 0 at v = 1). A map
    painted from a photo by a fit would carry that photo's shading and that fit's registration."""
    import scipy.ndimage
    from PIL import Image, ImageDraw
    uv_of_vertex = dict(zip(model.faces.reshape(-1).tolist(), model.uv_faces.reshape(-1).tolist()))

    def texel(k: int) -> tuple:
        u, v = model.uvs[uv_of_vertex[int(model.landmark_vertices[k, 0])]].tolist()
        return u * resolution, (1 - v) * resolution

    def drawn(draw) -> np.ndarray:
        canvas = Image.new('L', (resolution, resolution), 0)
        draw(ImageDraw.Draw(canvas))
        return scipy.ndimage.gaussian_filter(np.asarray(canvas, np.float64) / 255, resolution / 256)[..., None]
    brows = drawn(lambda d: [d.line([texel(k) for k in side], fill=255, width=resolution // 50)
                             for side in (range(17, 22), range(22, 27))])
    lips = drawn(lambda d: d.polygon([texel(k) for k in range(48, 60)], fill=255))
    mottling = scipy.ndimage.gaussian_filter(np.random.default_rng(5).standard_normal((resolution, resolution)), 3)
    skin = np.array(DRAWN_SKIN) * (1 + 0.05 * mottling / mottling.std())[..., None]
    albedo = skin * (1 - DRAWN_BROW_DARKENING * brows) * (1 - lips) + lips * np.array(DRAWN_LIPS)
    return torch.from_numpy(albedo).float()


def known_face_photo(model, config, truth) -> tuple:
    """A photo of an ICT-FaceKit face ``truth`` (SceneParameters with shape, pose, light and a
    diffuse map; specular 0.2 and the initial roughness are filled in) -> (FitImage with the
    model's own landmarks, its Pipeline, true camera-space vertices [verts, 3])."""
    truth.specular_map = torch.full_like(truth.diffuse_map, 0.2)
    truth.roughness_map = torch.full((*truth.diffuse_map.shape[:3], 1), INITIAL_ROUGHNESS)
    image, scene, _, vertices = synthetic_photo(model, truth, config, config.maxResolution, background=0.2)
    return image, scene, vertices


def detector_problem(model, config, seed: int, yaw: float, albedo: torch.Tensor) -> tuple:
    """``known_face_photo`` of a neutral face (identity of 0.7 sigma drawn from ``seed``, turned
    ``yaw`` rad) with the diffuse map ``albedo``, lit from above and the front."""
    size = config.maxResolution
    truth = SceneParameters.zeros(model, 1, 1, config.bands)
    truth.identity = 0.7 * torch.randn(1, model.n_shape, generator=torch.Generator().manual_seed(seed))
    truth.rotation, truth.translation = torch.tensor([[0.05, yaw, 0.0]]), torch.tensor([[0.0, 10.0, 900.0]])
    truth.focal = torch.tensor([size * 3.0])
    truth.sh[0, 0], truth.sh[0, 1], truth.sh[0, 2] = 2.5, 0.3, 0.6
    truth.diffuse_map = albedo[None]
    return known_face_photo(model, config, truth)


def varied_problem(model, config, seed: int, albedo: torch.Tensor) -> tuple:
    """``known_face_photo`` of a face drawn from ``seed``: identity of 0.8 sigma; for odd seeds
    four expression shapes at up to half their range; yaw within +-0.6 rad, pitch -0.2 to 0.25,
    roll +-0.15; focal length 2 to 4 image widths; light of random direction and tint; the skin of
    ``albedo`` lighter or darker (x0.5 to x1.5)."""
    rng = np.random.default_rng(seed)
    truth = SceneParameters.zeros(model, 1, 1, config.bands)
    truth.identity = torch.from_numpy(0.8 * rng.standard_normal((1, model.n_shape))).float()
    if seed % 2:
        truth.expression[0, rng.choice(model.n_expression, 4, replace=False)] = torch.from_numpy(rng.uniform(0, 0.5, 4)).float()
    truth.rotation = torch.tensor([[rng.uniform(-0.2, 0.25), rng.uniform(-0.6, 0.6), rng.uniform(-0.15, 0.15)]]).float()
    truth.translation = torch.tensor([[0.0, 10.0, 900.0]])
    truth.focal = torch.tensor([config.maxResolution * rng.uniform(2.0, 4.0)]).float()
    truth.sh[0, 0] = torch.from_numpy(rng.uniform(2.0, 3.0) * np.array([1.0, rng.uniform(0.9, 1.05), rng.uniform(0.85, 1.05)]))
    truth.sh[0, 1:4] = torch.from_numpy(rng.uniform(-0.8, 0.8, (3, 1)))
    tone = rng.uniform(0.5, 1.5)
    truth.diffuse_map = (albedo * torch.tensor([tone, tone ** 1.1, tone ** 1.2])).clamp(0, 1)[None]
    return known_face_photo(model, config, truth)


# A clip for the video tests and benchmark: 640x360 at 25 fps, the astronaut turning in the image
# plane and moving right, blank frames, then a cut to another person.
CLIP_BLANK, CLIP_CUT = range(20, 24), 45
CLIP_BACKGROUND = (40, 60, 80)


def clip_roll(k: int) -> float:
    """The known in-plane turn (degrees, counter-clockwise on screen) of frame k."""
    return 12 * math.sin(2 * math.pi * k / 30)


def write_clip(path: str, frames: int, second_photo: str, cut: int = CLIP_CUT, blank: range = CLIP_BLANK) -> None:
    """Write the clip to ``path`` (its container from the name); frames from ``cut`` on show
    ``second_photo``, and the first shot repeats every 2 s in a long clip (its motion wraps)."""
    import skimage.data
    import video
    from PIL import Image
    first = Image.fromarray(skimage.data.astronaut()).resize((360, 360))
    second = Image.open(second_photo).convert('RGB')
    second = second.resize((360, round(360 * second.height / second.width))).crop((0, 0, 360, 360))
    with video.VideoWriter(path, 25, 640, 360) as out:
        for k in range(frames):
            canvas = Image.new('RGB', (640, 360), CLIP_BACKGROUND)
            if k < cut and k not in blank:
                turned = first.rotate(clip_roll(k), resample=Image.BICUBIC, fillcolor=CLIP_BACKGROUND)
                canvas.paste(turned, (140 + 2 * (k % 50), 0))
            elif k >= cut:
                canvas.paste(second, (140, 0))
            out.write(np.asarray(canvas))


def render_face_clip(path: str, model, diffuse_srgb: np.ndarray, frames: int) -> tuple:
    """A 640x360 clip at 25 fps of ``model``'s mean face with the texture ``diffuse_srgb``
    [res, res, 3] under a soft light from above, turning (yaw) and opening its jaw on known curves,
    over grey -> (yaw [frames] radians, jawOpen weight [frames])."""
    import config
    import pipeline
    import results
    import utils
    import video
    width, height, res = 640, 360, diffuse_srgb.shape[0]
    cfg = config.Config().replace(model='ict', textureResolution=res, bands=3, envMapRes=16, maxResolution=height)
    scene = pipeline.Pipeline(model, cfg, [(width, height)], crop_to_face=False)
    k = np.arange(frames)
    yaw = 0.35 * np.sin(2 * np.pi * k / 40)
    jaw = np.clip(0.45 + 0.45 * np.sin(2 * np.pi * k / 17), 0, 1)
    params = pipeline.SceneParameters.zeros(model, 1, 1, bands=3)
    params.translation, params.focal = torch.tensor([[0.0, 10.0, 650.0]]), torch.tensor([700.0])
    params.sh[0, 0], params.sh[0, 2] = 3.2, 0.8
    params.diffuse_map = torch.from_numpy(utils.srgb_to_linear(diffuse_srgb.astype(np.float32)))[None]
    params.specular_map, params.roughness_map = torch.full((1, res, res, 3), 0.02), torch.full((1, res, res, 1), 0.5)
    jaw_index = model.expression_names.index('jawOpen')
    with video.VideoWriter(path, 25, width, height) as out:
        for i in range(frames):
            params.rotation = torch.tensor([[0.0, float(yaw[i]), 0.0]])
            params.expression = torch.zeros(1, model.n_expression)
            params.expression[0, jaw_index] = float(jaw[i])
            with torch.no_grad():
                rendered = scene.render(params, 0, 16, i, scene.vertices(params)[0]).numpy()
            out.write(results.to_uint8(results.composite(rendered, np.full((height, width, 3), 0.35, np.float32))))
    return yaw, jaw


# ------------------------------------------------------------------------------ FLAME's files

FLAME_JOINT_NAMES = ('global', 'neck', 'jaw', 'left_eye', 'right_eye')
EYEBALL_RADIUS = 12.0  # mm


def sphere_mesh(centre: np.ndarray, radius: float, rings: int = 6, segments: int = 10) -> tuple:
    """A closed UV sphere -> vertices [2 + (rings - 1)·segments, 3], outward triangles [t, 3]."""
    polar = np.repeat(np.arange(1, rings) * np.pi / rings, segments)
    azimuth = np.tile(np.arange(segments) * 2 * np.pi / segments, rings - 1)
    ring_points = np.stack([np.sin(polar) * np.cos(azimuth), np.cos(polar), np.sin(polar) * np.sin(azimuth)], 1)
    points = np.concatenate([[[0, 1, 0]], ring_points, [[0, -1, 0]]]) * radius + centre
    index = lambda ring, seg: 1 + ring * segments + seg % segments
    seg, last = np.arange(segments), 1 + (rings - 1) * segments
    triangles = [np.stack([np.zeros(segments, int), index(0, seg + 1), index(0, seg)], 1)]
    for ring in range(rings - 2):
        a, b, c, d = index(ring, seg), index(ring, seg + 1), index(ring + 1, seg), index(ring + 1, seg + 1)
        triangles += [np.stack([a, b, d], 1), np.stack([a, d, c], 1)]
    triangles.append(np.stack([np.full(segments, last), index(rings - 2, seg), index(rings - 2, seg + 1)], 1))
    return points, np.concatenate(triangles)


def embed_points(vertices: np.ndarray, triangles: np.ndarray, points_xy: np.ndarray) -> tuple:
    """The triangle of a height-field mesh under each (x, y) point [k, 2] and the point's
    barycentric weights -> (triangle index [k], weights [k, 3])."""
    corners = vertices[triangles][:, :, :2]  # [t, 3, 2]
    found, weights = [], []
    for point in points_xy:
        e1, e2, p = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], point - corners[:, 0]
        det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        b1 = (p[:, 0] * e2[:, 1] - p[:, 1] * e2[:, 0]) / det
        b2 = (e1[:, 0] * p[:, 1] - e1[:, 1] * p[:, 0]) / det
        b = np.stack([1 - b1 - b2, b1, b2], 1)
        best = int(np.argmax(b.min(1)))  # the triangle it lies deepest in
        found.append(best)
        weights.append(b[best])
    return np.array(found, np.int64), np.array(weights)


class _ChumpyArray:
    """Pickles as chumpy's ``Ch`` does (protocol 2: the class, then its ``__dict__`` less the weak
    references), without chumpy."""

    def __init__(self, x):
        self.x = np.asarray(x, np.float64)

    def __getstate__(self):
        return {'x': self.x, '_dirty_vars': set(), '_itr': None, '_depends_on_deps': {},
                '_make_dense': False, '_make_sparse': False}


def dump_chumpy_pickle(path: str, data: dict) -> None:
    """Pickle ``data`` (with ``_ChumpyArray`` values) as the FLAME 2020 files are: protocol 2, the
    chumpy arrays as ``chumpy.ch.Ch`` objects."""
    import sys
    import types
    saved = {name: sys.modules.get(name) for name in ('chumpy', 'chumpy.ch')}
    module = types.ModuleType('chumpy.ch')
    module.Ch = _ChumpyArray
    _ChumpyArray.__module__, _ChumpyArray.__qualname__ = 'chumpy.ch', 'Ch'
    sys.modules['chumpy'], sys.modules['chumpy.ch'] = types.ModuleType('chumpy'), module
    try:
        with open(path, 'wb') as file:
            pickle.dump(data, file, protocol=2)
    finally:
        _ChumpyArray.__module__, _ChumpyArray.__qualname__ = __name__, '_ChumpyArray'
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


def write_flame(folder: str, rings: int = 16, segments: int = 32, n_shape: int = 300, n_expression: int = 100,
                seed: int = 0, embedding: str = 'deca', masks: bool = False, file_name: str = 'generic_model.pkl',
                texture: str = '') -> dict:
    """A small head in FLAME's exact file formats: ``file_name`` (the keys, dtypes and chumpy
    arrays of FLAME 2020's generic_model.pkl, metres, a scipy-sparse J_regressor), the 68-point
    embedding (``embedding``: 'deca' -> landmark_embedding.npy with its static 51 and dynamic
    contour, 'ringnet' -> flame_static_embedding.pkl + flame_dynamic_embedding.npy) and with
    ``masks`` FLAME_masks.pkl; ``texture``: 'bfm' -> FLAME_albedo_from_BFM.npz, 'flame' ->
    FLAME_texture.npz (a small texture space: 32² texels, 5 components, FLAME's UV layout of vt/ft). The head: the synthetic face as skin, and two eyeballs (separate
    shells, as FLAME's). -> a dict of the arrays written (FLAME frame, metres)."""
    import scipy.sparse
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    face, face_triangles = face_mesh(rings, segments)
    eye_centres = [np.array([x, 28.0, face_height(np.array(x), np.array(28.0)) - EYEBALL_RADIUS - 2]) for x in (33.0, -33.0)]
    parts, triangles, offset = [face], [face_triangles], len(face)
    for centre in eye_centres:  # left eye (+x, the subject's left), then right
        points, tris = sphere_mesh(centre, EYEBALL_RADIUS)
        parts.append(points)
        triangles.append(tris + offset)
        offset += len(points)
    vertices_mm = np.concatenate(parts).astype(np.float64)
    faces = np.concatenate(triangles)
    n, n_face = len(vertices_mm), len(face)
    eyes = [np.arange(n_face, n_face + len(parts[1])), np.arange(n_face + len(parts[1]), n)]

    decay = lambda k, first: first * 0.97 ** np.arange(k)
    basis = lambda count, rms: (_smooth_basis(vertices_mm, count, 3, rng).reshape(n, 3, count)
                                * np.sqrt(n) * decay(count, rms))  # per-vertex rms (mm) of each column
    shapedirs = np.concatenate([basis(n_shape, 4.0), basis(n_expression, 2.4)], axis=2) / 1000
    posedirs = basis(36, 0.5) / 1000

    x, y = vertices_mm[:, 0], vertices_mm[:, 1]
    rim = np.arange(n_face - segments, n_face)  # the outer ring of the face
    pick = lambda mask: rim[mask[rim]]
    regressor = np.zeros((5, n))
    for joint, members in enumerate([pick(y < -90), pick(y < -60), pick((np.abs(x) > 60) & (y > -30) & (y < 0)),
                                     eyes[0], eyes[1]]):
        regressor[joint, members] = 1 / len(members)
    jaw = np.clip((-y - 38) / 10, 0, 1)  # the lower lip and chin follow the jaw
    weights = np.zeros((n, 5))
    weights[:n_face, 2], weights[:n_face, 1] = jaw[:n_face], 1 - jaw[:n_face]
    weights[eyes[0], 3] = weights[eyes[1], 4] = 1
    template = vertices_mm / 1000
    model = {'f': faces.astype(np.uint32), 'v_template': template, 'shapedirs': _ChumpyArray(shapedirs),
             'posedirs': posedirs, 'J_regressor': scipy.sparse.csc_matrix(regressor),
             'kintree_table': np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
             'J': _ChumpyArray(regressor @ template), 'weights': weights, 'bs_style': 'lbs', 'bs_type': 'lrotmin'}
    dump_chumpy_pickle(os.path.join(folder, file_name), model)

    layout = ibug_layout()
    static_faces, static_weights = embed_points(face, face_triangles, layout[17:])
    contour_faces, contour_weights = embed_points(face, face_triangles, layout[:17])
    # a contour per head turn (-39° .. 39°); only the middle one is the frontal contour
    wrong = [embed_points(face, face_triangles, layout[:17] + [2.0 * (k - 39), 0]) for k in range(79)]
    dynamic_faces = np.stack([contour_faces if k == 39 else w[0] for k, w in enumerate(wrong)])
    dynamic_weights = np.stack([contour_weights if k == 39 else w[1] for k, w in enumerate(wrong)])
    if embedding == 'deca':
        np.save(os.path.join(folder, 'landmark_embedding.npy'), {
            'static_lmk_faces_idx': static_faces, 'static_lmk_bary_coords': static_weights,
            'dynamic_lmk_faces_idx': dynamic_faces, 'dynamic_lmk_bary_coords': dynamic_weights}, allow_pickle=True)
    else:
        with open(os.path.join(folder, 'flame_static_embedding.pkl'), 'wb') as file:
            pickle.dump({'lmk_face_idx': static_faces.astype(np.uint32), 'lmk_b_coords': static_weights}, file, protocol=2)
        np.save(os.path.join(folder, 'flame_dynamic_embedding.npy'),
                {'lmk_face_idx': dynamic_faces, 'lmk_b_coords': dynamic_weights}, allow_pickle=True)
    if masks:
        inner = np.flatnonzero((x[:n_face] / FACE_HALF_WIDTH) ** 2 + (y[:n_face] / FACE_HALF_HEIGHT) ** 2 < 0.6)
        with open(os.path.join(folder, 'FLAME_masks.pkl'), 'wb') as file:
            pickle.dump({'face': inner, 'left_eyeball': eyes[0], 'right_eyeball': eyes[1],
                         'scalp': np.setdiff1d(np.arange(n_face), inner)}, file, protocol=2)
    uvs = uv_faces = None
    if texture:
        uvs, uv_faces = write_flame_texture(folder, texture, vertices_mm, faces, n_face, rng)
    landmark_faces = np.concatenate([contour_faces, static_faces])
    landmark_weights = np.concatenate([contour_weights, static_weights])
    return dict(folder=folder, template=template, faces=faces, shapedirs=shapedirs, posedirs=posedirs,
                regressor=regressor, weights=weights, parents=np.array([-1, 0, 1, 1, 1]),
                landmark_corners=faces[landmark_faces], landmark_weights=landmark_weights, eyes=eyes,
                n_shape=n_shape, uvs=uvs, uv_faces=uv_faces)


def write_flame_texture(folder: str, kind: str, vertices_mm: np.ndarray, faces: np.ndarray, n_face: int, rng,
                        side: int = 32, components: int = 5) -> tuple:
    """A texture space in FLAME's layouts (BGR texels, row 0 at v = 1, one UV per corner: vt
    [uv_verts, 2], ft [tris, 3]): the face laid out by its x, y; the eyeballs in one corner.
    -> (vt, ft)."""
    vt = np.stack([vertices_mm[:, 0] / (2.2 * FACE_HALF_WIDTH) + 0.5, vertices_mm[:, 1] / (2.2 * FACE_HALF_HEIGHT) + 0.5], 1)
    vt[n_face:] = [0.03, 0.03]
    ft = faces.copy()  # one UV per vertex: the same indices
    texels = side * side * 3
    if kind == 'bfm':
        arrays = dict(MU=rng.uniform(0.2, 0.7, (1, texels)), PC=rng.normal(0, 0.02, (texels, components)),
                      specMU=rng.uniform(0.1, 0.3, (1, texels)), specPC=rng.normal(0, 0.01, (texels, components)))
    else:
        arrays = dict(mean=rng.uniform(60, 200, (side, side, 3)), tex_dir=rng.normal(0, 5, (side, side, 3, components)))
    np.savez(os.path.join(folder, 'FLAME_albedo_from_BFM.npz' if kind == 'bfm' else 'FLAME_texture.npz'),
             vt=vt, ft=ft, **arrays)
    return vt, ft
