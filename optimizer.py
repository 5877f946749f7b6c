"""Reconstruct 3D faces from photos: the command line and the three stages of the fit.

    python optimizer.py --input IMG_OR_FOLDER --output DIR [--sharedIdentity] [--config F]

Stage 1 fits pose, expression and focal length to 2D landmarks (Levenberg-Marquardt).
Stage 2 fits identity, expression, statistical albedo, pose and SH light to the photo through the
ray tracer. Stage 3 refines per-texel diffuse, specular and roughness maps.
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

import config as config_module
import landmarks as landmarks_module
import morphableModel
import pipeline
import utils

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


class FitError(RuntimeError):
    """One image could not be fitted; the message names it and says why."""


@dataclass
class FitImage:
    """An input photo as fitted."""
    index: int             # i of the output files (position in the sorted input list)
    path: str
    pixels: np.ndarray     # [h, w, 3] sRGB in [0, 1], scaled to maxResolution
    scale: float           # fitted size / input size
    landmarks: np.ndarray  # [68, 2] pixels of the fitted image
    crop: tuple = (0, 0)   # input pixel of the fitted image's top-left corner

    @property
    def size(self) -> tuple:
        return self.pixels.shape[1], self.pixels.shape[0]

    @property
    def centre(self) -> tuple:
        return self.pixels.shape[1] / 2, self.pixels.shape[0] / 2


# ------------------------------------------------------------------------------------ stage 1

def initial_pose(model_points: np.ndarray, image_points: np.ndarray, focal: float) -> tuple:
    """A camera estimate from any head pose, by a weak-perspective fit.

    model_points [k, 3] (canonical, centred), image_points [k, 2] (relative to the image centre)
    -> (axis-angle [3], translation [3]). An affine camera x = A X + b is fitted by least squares;
    its nearest scaled rotation gives R and the scale s, and the depth follows as f / s."""
    design = np.concatenate([model_points, np.ones((len(model_points), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, image_points, rcond=None)
    affine, offset = solution[:3].T, solution[3]  # [2, 3], [2]
    u, singular, vt = np.linalg.svd(affine, full_matrices=False)
    rows = u @ vt
    rotation = np.stack([rows[0], rows[1], np.cross(rows[0], rows[1])])
    scale = singular.mean()
    depth = focal / scale
    translation = np.array([offset[0] / scale, offset[1] / scale, depth])
    return pipeline.axis_angle_from_matrix(rotation), translation


def levenberg_marquardt(residuals, x: torch.Tensor, iterations: int, tolerance: float = 1e-10) -> tuple:
    """Minimise ||residuals(x)||² from x [p] -> (x, final energy). Marquardt's diagonal scaling
    makes the step invariant to the parameters' units (radians, millimetres, σ)."""
    damping = 1e-3
    r = residuals(x)
    energy = float(r @ r)
    for _ in range(iterations):
        jacobian = torch.func.jacfwd(residuals)(x)
        gradient = jacobian.T @ r
        hessian = jacobian.T @ jacobian
        diagonal = torch.diag(torch.diag(hessian).clamp_min(1e-9))
        while True:
            step = torch.linalg.solve(hessian + damping * diagonal, -gradient)
            candidate = x + step
            r_candidate = residuals(candidate)
            candidate_energy = float(r_candidate @ r_candidate)
            if math.isfinite(candidate_energy) and candidate_energy < energy:
                damping = max(damping / 3, 1e-9)
                break
            damping *= 4
            if damping > 1e8:
                return x, energy
        converged = energy - candidate_energy < tolerance * max(energy, 1e-12)
        x, r, energy = candidate, r_candidate, candidate_energy
        if converged:
            break
    return x, energy


class LandmarkProblem:
    """Stage 1 as least squares: landmark reprojection in units of σ, plus N(0, 1) priors.

    Residuals: √w_j (p_j − l_j) / σ for every detected landmark j with a model vertex, then
    √λ_expr · expression. Identity is left to stage 2, as in NextFace: 68 points cannot tell
    identity from expression, focal length and pose apart. σ = max(w, h) / 128 px (2 px at 256 px), and
    λ = weight / 0.001, so NextFace's default weights give the plain Gaussian prior."""

    def __init__(self, model, images: list, shared_identity: bool, config, optimize_focal: bool):
        lm = model.landmark_vertices
        self.valid = (lm >= 0)
        index = lm.clamp_min(0)
        to64 = lambda t: t.to(torch.float64)
        self.mean = to64(model.mean_shape[index])  # [68, 3]
        self.expression_basis = to64(model.expression_basis[:, index])
        self.targets = torch.tensor(np.stack([im.landmarks for im in images]), dtype=torch.float64)
        finite = torch.isfinite(self.targets).all(-1)
        self.targets = torch.nan_to_num(self.targets)
        sigma = torch.tensor([max(im.size) / 128 for im in images], dtype=torch.float64)
        weights = torch.tensor(landmarks_module.LANDMARK_WEIGHTS, dtype=torch.float64)
        self.residual_scale = (weights.sqrt()[None, :] * (self.valid[None, :] & finite)) / sigma[:, None]
        self.centres = torch.tensor([im.centre for im in images], dtype=torch.float64)
        self.n, self.n_id = len(images), (1 if shared_identity else len(images))
        self.expression_weight = math.sqrt(config.weightExpressionReg / 0.001)
        self.optimize_focal = optimize_focal
        self.sizes = dict(rotation=(self.n, 3), translation=(self.n, 3),
                          expression=(self.n, model.n_expression),
                          log_focal=(self.n,) if optimize_focal else (0,))

    def pack(self, **values) -> torch.Tensor:
        return torch.cat([values[k].reshape(-1) for k in self.sizes])

    def unpack(self, x: torch.Tensor) -> dict:
        out, start = {}, 0
        for key, size in self.sizes.items():
            count = int(np.prod(size))
            out[key] = x[start:start + count].reshape(size)
            start += count
        return out

    def projected(self, p: dict, focal: torch.Tensor) -> torch.Tensor:
        """Model landmarks in pixels [n, 68, 2]."""
        canonical = self.mean + torch.einsum('nk,kvc->nvc', p['expression'], self.expression_basis)
        camera = pipeline.to_camera(canonical, p['rotation'], p['translation'])
        return pipeline.project(camera, focal, self.centres)

    def residuals(self, x: torch.Tensor, fixed_focal: torch.Tensor) -> torch.Tensor:
        p = self.unpack(x)
        focal = p['log_focal'].exp() if self.optimize_focal else fixed_focal
        error = (self.projected(p, focal) - self.targets) * self.residual_scale[..., None]
        return torch.cat([error.reshape(-1), self.expression_weight * p['expression'].reshape(-1)])


def focal_candidates(images: list, config) -> list:
    """Initial focal lengths [n] to start from: the configured one, and if the focal length is
    fitted, a range of fields of view (landmarks alone tell focal length only weakly, so the
    best of several starts is kept)."""
    configured = [config.camFocalLength] * len(images)
    if not config.optimizeFocalLength:
        return [configured]
    widths = np.array([max(im.size) for im in images], dtype=np.float64)
    return [configured] + [list(widths * factor) for factor in (1.0, 2.0, 4.0, 8.0)]


def fit_landmarks(model, images: list, config, shared_identity: bool, progress=None) -> pipeline.SceneParameters:
    """Stage 1: pose, expression and focal length from the landmarks of ``images``."""
    problem = LandmarkProblem(model, images, shared_identity, config, config.optimizeFocalLength)
    mean_points = model.mean_shape[model.landmark_vertices.clamp_min(0)].numpy()
    valid = model.landmark_vertices.numpy() >= 0
    usable = [valid & np.isfinite(im.landmarks).all(1) for im in images]
    best = None
    for focals in focal_candidates(images, config):
        focal = torch.tensor(focals, dtype=torch.float64)
        poses = [initial_pose(mean_points[ok], (im.landmarks - im.centre)[ok], f)
                 for im, ok, f in zip(images, usable, focals)]
        x0 = problem.pack(
            rotation=torch.tensor(np.stack([p[0] for p in poses])),
            translation=torch.tensor(np.stack([p[1] for p in poses])),
            expression=torch.zeros(problem.sizes['expression'], dtype=torch.float64),
            log_focal=focal.log() if config.optimizeFocalLength else torch.zeros(0, dtype=torch.float64))
        x, energy = levenberg_marquardt(lambda v: problem.residuals(v, focal), x0, config.iterStep1)
        if best is None or energy < best[1]:
            best = (x, energy, focal)
        if progress is not None:
            progress.update(1)
    x, _, focal = best
    p = problem.unpack(x)
    if config.optimizeFocalLength:
        focal = p['log_focal'].exp()
    as32 = lambda t: t.detach().to(torch.float32)
    return pipeline.SceneParameters(
        shape=torch.zeros(problem.n_id, model.n_shape), expression=as32(p['expression']), rotation=as32(p['rotation']),
        translation=as32(p['translation']), focal=as32(focal),
        albedo=torch.zeros(problem.n_id, model.n_albedo),
        sh=torch.zeros(problem.n, config.bands ** 2, 3), stage=1)


def landmark_error(model, params: pipeline.SceneParameters, images: list) -> np.ndarray:
    """Mean distance (px) between the model's projected landmarks and the targets, per image [n]."""
    with torch.no_grad():
        vertices = pipeline.model_vertices(model, params)
        lm = model.landmark_vertices
        centres = torch.tensor([im.centre for im in images], dtype=torch.float32)
        pixels = pipeline.project(vertices[:, lm.clamp_min(0)], params.focal, centres).numpy()
    errors = []
    for i, im in enumerate(images):
        ok = (lm.numpy() >= 0) & np.isfinite(im.landmarks).all(1)
        errors.append(np.linalg.norm(pixels[i, ok] - im.landmarks[ok], axis=1).mean())
    return np.array(errors)


# ------------------------------------------------------------------------------- stages 2, 3

class AppearanceScene:
    """What stages 2 and 3 share: a renderer per image, the photos in linear colour, the UV
    interpolation of per-vertex albedo, the SH environment map."""

    def __init__(self, model, images: list, config, debug_folder: str = '', crop_to_face: bool = True):
        import sphericalharmonics
        self.model, self.images, self.config = model, images, config
        self.crop_to_face = crop_to_face  # ray trace only around the face (see ``renderer``)
        self.debug_folder = debug_folder  # where debugFrequency's progress images go
        self._renderers = {}
        self.set_photos()
        matrix, self.texel_mask = utils.texel_interpolation(
            model.uvs.numpy(), model.uv_faces.numpy(), model.faces.numpy(), config.textureResolution)
        self.texels = utils.sparse_linear_map(matrix)  # [verts, c] -> [res·res, c]
        self.envmap = sphericalharmonics.EnvironmentMap(config.bands, config.envMapRes, config.smoothSh)
        self.centres = torch.tensor([im.centre for im in images], dtype=torch.float32)
        self.targets = torch.tensor(np.nan_to_num(np.stack([im.landmarks for im in images]), nan=0.0),
                                    dtype=torch.float32)
        lm_ok = np.stack([np.isfinite(im.landmarks).all(1) for im in images]) & (model.landmark_vertices.numpy() >= 0)
        self.landmark_weights = torch.from_numpy(lm_ok * landmarks_module.LANDMARK_WEIGHTS).float()

    def set_photos(self) -> None:
        """Take the photos from ``images`` (again), in linear colour [h, w, 3]."""
        self.photos = [torch.from_numpy(utils.srgb_to_linear(im.pixels)) for im in self.images]

    def renderer(self, image: int, vertices: torch.Tensor = None, focal: float = None):
        """The renderer of image ``image``, built once. One per image, as prb's backward pass
        re-reads the scene's parameters: a scene shared by two renders of one loss would
        differentiate the first with the second's parameters. Given the geometry of its first
        use (``vertices`` [verts, 3], ``focal``), it ray traces only the face's bounding box and
        a margin: the loss sees only face pixels, and the background is half the image."""
        import renderer
        if image not in self._renderers:
            config = self.config
            width, height = self.images[image].size
            crop = None
            if vertices is not None and self.crop_to_face:
                pixels = pipeline.project(vertices.detach()[None], torch.tensor([focal]),
                                          torch.tensor([self.images[image].centre]))[0]
                margin = FACE_CROP_MARGIN * max(width, height)
                low = torch.floor(pixels.min(0).values - margin).clamp_min(0)
                high = torch.ceil(pixels.max(0).values + margin).clamp_max(torch.tensor([width, height]))
                if bool((high - low >= 8).all()):
                    crop = (*low.int().tolist(), *high.int().tolist())
            self._renderers[image] = renderer.FaceRenderer(
                self.model.faces, self.model.uv_faces, self.model.uvs, width, height,
                config.textureResolution, config.envMapRes, config.device, config.integrator, crop)
        return self._renderers[image]

    def vertex_texture(self, values: torch.Tensor) -> torch.Tensor:
        """Per-vertex values [verts, c] -> UV map [res, res, c]."""
        res = self.config.textureResolution
        return self.texels(values).reshape(res, res, -1)

    def statistical_maps(self, params: pipeline.SceneParameters, identity: int) -> tuple:
        """The diffuse and specular maps [res, res, 3] of the statistical albedo."""
        coefficients = params.albedo[identity:identity + 1]
        diffuse = self.model.diffuse_albedo(coefficients)[0].clamp(0, 1)
        specular = self.model.specular_albedo(coefficients)[0].clamp(0, 1)
        return self.vertex_texture(diffuse), self.vertex_texture(specular)

    def maps(self, params: pipeline.SceneParameters, identity: int) -> tuple:
        """(diffuse, specular, roughness) maps of one identity: per-texel after stage 3's start,
        else from the statistical model with a uniform roughness."""
        if params.diffuse_map is not None:
            return (params.diffuse_map[identity], params.specular_map[identity], params.roughness_map[identity])
        diffuse, specular = self.statistical_maps(params, identity)
        roughness = torch.full((*diffuse.shape[:2], 1), INITIAL_ROUGHNESS)
        return diffuse, specular, roughness

    def render(self, params: pipeline.SceneParameters, image: int, spp: int, seed: int,
               vertices: torch.Tensor = None) -> torch.Tensor:
        """RGBA render [h, w, 4] of image ``image`` (linear colour); ``vertices`` [verts, 3]
        replace the fitted geometry if given."""
        if vertices is None:
            vertices = pipeline.model_vertices(self.model, _select(params, image))[0]
        normals = utils.vertex_normals(vertices[None], self.model.faces)[0]
        diffuse, specular, roughness = self.maps(params, params.identity_index(image))
        envmap = self.envmap(params.sh[image:image + 1])[0]
        focal = float(params.focal[image])
        return self.renderer(image, vertices, focal).render(vertices, normals, diffuse, specular, roughness,
                                                            envmap, focal, spp, seed)

    def photometric_loss(self, rendered: torch.Tensor, image: int) -> torch.Tensor:
        """Mean L1 distance over the pixels the face covers (linear colour)."""
        alpha = rendered[..., 3:].detach()
        return (alpha * (rendered[..., :3] - self.photos[image]).abs()).sum() / (3 * alpha.sum().clamp_min(1.0))

    def landmark_loss(self, params: pipeline.SceneParameters, vertices: torch.Tensor = None) -> torch.Tensor:
        """Weighted mean squared landmark distance (px²); ``vertices`` [n, verts, 3] if already made."""
        vertices = pipeline.model_vertices(self.model, params) if vertices is None else vertices
        points = pipeline.project(vertices[:, self.model.landmark_vertices.clamp_min(0)], params.focal, self.centres)
        squared = ((points - self.targets) ** 2).sum(-1)
        return (self.landmark_weights * squared).sum() / self.landmark_weights.sum()


INITIAL_ROUGHNESS = 0.45
# Margin around the face's projected bounding box that is ray traced, as a fraction of the image
# size: room for the pose and shape to move in stages 2 and 3.
FACE_CROP_MARGIN = 0.08


def initial_light(scene: AppearanceScene, params: pipeline.SceneParameters) -> torch.Tensor:
    """Uniform SH light that makes the mean albedo match each photo's mean face colour [n, bands², 3]."""
    import sphericalharmonics
    lights = []
    for i in range(len(scene.images)):
        with torch.no_grad():
            rendered = scene.render(params, i, spp=4, seed=0)
        alpha = rendered[..., 3:] > 0.5
        photo_mean = (scene.photos[i] * alpha).sum((0, 1)) / alpha.sum().clamp_min(1)
        albedo_mean = scene.model.diffuse_mean.mean(0)
        lights.append(sphericalharmonics.constant_light(scene.config.bands, photo_mean / albedo_mean.clamp_min(0.05)))
    return torch.stack(lights)


def learning_rate_factor(iteration: int, iterations: int) -> float:
    """Full steps for the first half, then a linear decay to 1/10: the late small steps average
    out the Monte Carlo noise of the gradients instead of jittering around the optimum."""
    progress = iteration / max(iterations - 1, 1)
    return 1.0 if progress < 0.5 else 1.0 - 1.8 * (progress - 0.5)


def _adam_loop(name: str, groups: list, loss_fn, iterations: int, config, on_progress=None) -> None:
    """Adam over ``groups`` (torch param groups) for ``iterations`` steps. A non-finite loss puts
    back the last good values and halves the steps; it fails the image after five in a row.
    ``on_progress(iteration)`` runs every ``debugFrequency`` steps and after the last."""
    from tqdm import tqdm
    optimizer = torch.optim.Adam(groups)
    base_rates = [group['lr'] for group in optimizer.param_groups]
    tensors = [t for group in groups for t in group['params']]
    good = [t.detach().clone() for t in tensors]
    bad_in_a_row, nan_scale = 0, 1.0
    progress = tqdm(range(iterations), desc=name, unit='it', leave=False, disable=not sys.stderr.isatty())
    for iteration in progress:
        for group, rate in zip(optimizer.param_groups, base_rates):
            group['lr'] = rate * nan_scale * learning_rate_factor(iteration, iterations)
        optimizer.zero_grad()
        loss, parts = loss_fn(iteration)
        if not torch.isfinite(loss):
            bad_in_a_row += 1
            if bad_in_a_row >= 5:
                raise FitError(f'{name}: the loss stays NaN/Inf; the fit of this image diverged')
            with torch.no_grad():
                for tensor, value in zip(tensors, good):
                    tensor.copy_(value)
            nan_scale /= 2
            continue
        bad_in_a_row = 0
        loss.backward()
        optimizer.step()
        if iteration % 10 == 0:
            good = [t.detach().clone() for t in tensors]
        if on_progress is not None and config.debugFrequency > 0 and (
                iteration % config.debugFrequency == 0 or iteration == iterations - 1):
            on_progress(iteration)
        values = {k: float(v.detach()) for k, v in parts.items()}
        if config.verbose:
            print(f'{name} {iteration}: ' + ', '.join(f'{k} {v:.5f}' for k, v in values.items()))
        progress.set_postfix({k: f'{v:.4f}' for k, v in values.items()})


# Adam step sizes of stage 2: coefficients in σ, rotation in radians, translation in mm, light
# relative to its DC level.
STAGE2_RATES = dict(geometry=0.02, albedo=0.02, rotation=0.002, translation=0.5, light=0.005)


def fit_stage2(scene: AppearanceScene, params: pipeline.SceneParameters) -> pipeline.SceneParameters:
    """Stage 2: identity, expression, statistical albedo, pose and SH light by the photometric
    loss, with landmark and prior terms."""
    config = scene.config
    params = params.detached()
    params.sh = initial_light(scene, params) if params.sh.abs().sum() == 0 else params.sh
    trainable = [params.shape, params.expression, params.rotation, params.translation, params.albedo, params.sh]
    for tensor in trainable:
        tensor.requires_grad_(True)
    rates = STAGE2_RATES
    light_level = float(params.sh.detach()[:, 0].abs().max().clamp_min(1e-3))  # SH steps relative to the light
    groups = [dict(params=[params.shape, params.expression], lr=rates['geometry']),
              dict(params=[params.albedo], lr=rates['albedo']),
              dict(params=[params.rotation], lr=rates['rotation']),
              dict(params=[params.translation], lr=rates['translation']),
              dict(params=[params.sh], lr=rates['light'] * light_level)]

    def loss_fn(iteration):
        vertices = pipeline.model_vertices(scene.model, params)
        photo = sum(scene.photometric_loss(scene.render(params, i, config.rtTrainingSamples, iteration,
                                                        vertices=vertices[i]), i)
                    for i in range(len(scene.images))) / len(scene.images)
        landmark = scene.landmark_loss(params, vertices)
        prior = (config.weightShapeReg * (params.shape ** 2).mean()
                 + config.weightExpressionReg * (params.expression ** 2).mean()
                 + config.weightAlbedoReg * (params.albedo ** 2).mean())
        loss = photo + config.weightLandmarksLossStep2 * landmark + prior
        return loss, dict(photo=photo, landmarks=landmark)

    _adam_loop('stage 2', groups, loss_fn, config.iterStep2, config, lambda k: save_progress(scene, params, 2, k))
    params = params.detached()
    params.stage = 2
    return params


def _texture_regularizers(map_: torch.Tensor, reference: torch.Tensor, weights: tuple) -> torch.Tensor:
    """Symmetry (mirror in u), consistency (to the stage-2 map) and smoothness of a map [res, res, c]."""
    symmetry, consistency, smoothness = weights
    mirrored = torch.flip(map_, dims=[1])
    smooth = ((map_[1:] - map_[:-1]) ** 2).mean() + ((map_[:, 1:] - map_[:, :-1]) ** 2).mean()
    return (symmetry * ((map_ - mirrored) ** 2).mean() + consistency * ((map_ - reference) ** 2).mean()
            + smoothness * smooth)


# Adam step sizes of stage 3, per texel of the maps and for the SH coefficients.
STAGE3_RATES = dict(diffuse=0.005, specular=0.005, roughness=0.005, light=0.005)
# Without an albedo model (ICT-FaceKit) the stage-2 maps are one skin colour and one specular
# level. Held to that colour, the diffuse map stayed flat and the specular map took the face's
# detail (a rough specular lobe under smooth light mimics albedo). So for such models the
# diffuse consistency weight is scaled by diffuse_consistency_scale and the specular map moves
# specular_rate_scale as fast (on 32bit.png: stage-3 error 0.057 -> 0.047, detail in the diffuse
# map). With AlbedoMM the stage-2 maps are a real prior and NextFace's weights stay as they are
# (the slower specular map alone made the BFM-sized benchmark worse: 0.090 -> 0.102).
WITHOUT_ALBEDO_MODEL = dict(diffuse_consistency_scale=0.01, specular_rate_scale=0.1)


def fit_stage3(scene: AppearanceScene, params: pipeline.SceneParameters) -> pipeline.SceneParameters:
    """Stage 3: per-texel diffuse, specular and roughness maps (and the light), starting from the
    statistical albedo, with symmetry, consistency and smoothness regularizers."""
    config = scene.config
    params = params.detached()
    identities = params.shape.shape[0]
    start = [scene.maps(params, k) for k in range(identities)]
    params.diffuse_map, params.specular_map, params.roughness_map = (
        torch.stack([s[j] for s in start]).detach().clone() for j in range(3))
    references = [t.detach().clone() for t in (params.diffuse_map, params.specular_map, params.roughness_map)]
    for tensor in (params.diffuse_map, params.specular_map, params.roughness_map, params.sh):
        tensor.requires_grad_(True)
    rates, loose = dict(STAGE3_RATES), not scene.model.has_albedo_model
    if loose:
        rates['specular'] *= WITHOUT_ALBEDO_MODEL['specular_rate_scale']
    groups = [dict(params=[params.diffuse_map], lr=rates['diffuse']),
              dict(params=[params.specular_map], lr=rates['specular']),
              dict(params=[params.roughness_map], lr=rates['roughness']),
              dict(params=[params.sh], lr=rates['light'])]
    diffuse_consistency = config.weightDiffuseConsistencyReg * (
        WITHOUT_ALBEDO_MODEL['diffuse_consistency_scale'] if loose else 1.0)
    weights = ((config.weightDiffuseSymmetryReg, diffuse_consistency, config.weightDiffuseSmoothnessReg),
               (config.weightSpecularSymmetryReg, config.weightSpecularConsistencyReg, config.weightSpecularSmoothnessReg),
               (config.weightRoughnessSymmetryReg, config.weightRoughnessConsistencyReg, config.weightRoughnessSmoothnessReg))

    with torch.no_grad():
        vertices = pipeline.model_vertices(scene.model, params)  # fixed in stage 3

    def loss_fn(iteration):
        photo = sum(scene.photometric_loss(scene.render(params, i, config.rtTrainingSamples, 10_000 + iteration,
                                                        vertices=vertices[i]), i)
                    for i in range(len(scene.images))) / len(scene.images)
        regularizer = sum(_texture_regularizers(m[k], r[k], w) for m, r, w in zip(
            (params.diffuse_map, params.specular_map, params.roughness_map), references, weights)
            for k in range(identities))
        loss = photo + regularizer  # the geometry is fixed: weightLandmarksLossStep3 has nothing to move
        return loss, dict(photo=photo, regularizer=regularizer)

    _adam_loop('stage 3', groups, loss_fn, config.iterStep3, config, lambda k: save_progress(scene, params, 3, k))
    params = params.detached()
    with torch.no_grad():
        params.diffuse_map.clamp_(0, 1)
        params.specular_map.clamp_(0, 1)
        params.roughness_map.clamp_(0.01, 1)
    params.stage = 3
    return params


def save_progress(scene: AppearanceScene, params: pipeline.SceneParameters, stage: int, iteration: int) -> None:
    """debugFrequency: photo | render over the photo | render, of every image, to
    ``debug/stage{k}_image{i}_{iteration}.png`` (16 spp)."""
    if not scene.debug_folder:
        return
    with torch.no_grad():
        for row, image in enumerate(scene.images):
            rendered = scene.render(params, row, 16, iteration).numpy()
            utils.save_image(os.path.join(scene.debug_folder, f'stage{stage}_image{image.index}_{iteration:04d}.png'),
                             np.concatenate(_render_panels(image, rendered), axis=1))


def fit_appearance(model, params: pipeline.SceneParameters, images: list, config, output: str,
                   name: str) -> tuple:
    """Stages 2 and 3 from wherever ``params`` stands, with a checkpoint after each -> (params,
    the scene, whose renderers the outputs reuse)."""
    scene = AppearanceScene(model, images, config, os.path.join(output, 'debug') if config.debugFrequency else '')
    if params.stage < 2 and config.iterStep2 > 0:
        params = fit_stage2(scene, params)
        params.save(checkpoint_path(output, name, 2))
        print(f'{name}: stage 2 photometric error {photometric_error(scene, params):.4f}')
        if config.saveIntermediateStage:
            save_outputs(output, model, params, images, config, suffix='_stage2', scene=scene)
    if params.stage < 3 and config.iterStep3 > 0:
        params = fit_stage3(scene, params)
        params.save(checkpoint_path(output, name, 3))
        print(f'{name}: stage 3 photometric error {photometric_error(scene, params):.4f}')
    return params, scene


def photometric_error(scene: AppearanceScene, params: pipeline.SceneParameters, spp: int = 64) -> float:
    """Mean L1 error (linear colour) over the face pixels, averaged over the images."""
    with torch.no_grad():
        return float(np.mean([float(scene.photometric_loss(scene.render(params, i, spp, 999), i))
                              for i in range(len(scene.images))]))


def save_outputs(folder: str, model, params: pipeline.SceneParameters, images: list, config,
                 suffix: str = '', scene: AppearanceScene = None) -> None:
    """Per image: ``render_{i}.png`` (input | overlay | reconstruction | diffuse | specular |
    roughness), the three maps, ``mesh{i}.obj`` + ``.mtl``, the env map and ``params{i}.json``."""
    import sphericalharmonics
    scene = scene or AppearanceScene(model, images, config)
    with torch.no_grad():
        for row, image in enumerate(images):
            i = f'{image.index}{suffix}'
            identity = params.identity_index(row)
            diffuse, specular, roughness = scene.maps(params, identity)
            maps = dict(diffuseMap=utils.linear_to_srgb(diffuse.numpy()),
                        specularMap=utils.linear_to_srgb(specular.numpy()),
                        roughnessMap=np.repeat(roughness.numpy(), 3, axis=2))
            for key, value in maps.items():
                utils.save_image(os.path.join(folder, f'{key}_{i}.png'), value)
            utils.write_mtl(os.path.join(folder, f'mesh{i}.mtl'), f'diffuseMap_{i}.png',
                            f'specularMap_{i}.png', f'roughnessMap_{i}.png')
            vertices = pipeline.model_vertices(model, _select(params, row))[0]
            rendered = scene.render(params, row, config.rtSamples, 12345, vertices=vertices).numpy()
            uv = scene.renderer(row).uv_image(vertices, float(params.focal[row]))
            black = np.zeros_like(image.pixels)
            panels = _render_panels(image, rendered)
            for value in maps.values():
                panels.append(_composite(np.concatenate([_sample_map(value, uv), rendered[..., 3:]], axis=2),
                                         black, encoded=True))
            utils.save_image(os.path.join(folder, f'render_{i}.png'), np.concatenate(panels, axis=1))
            envmap = scene.envmap(params.sh[row:row + 1])[0].numpy()
            sphericalharmonics.save_envmap(os.path.join(folder, f'envMap_{i}.{"exr" if config.saveExr else "png"}'), envmap)
    save_geometry(folder, model, params, images, suffix)


def _render_panels(image: FitImage, rendered: np.ndarray) -> list:
    """The photo, the render [h, w, 4] over it, and the render over black: sRGB [h, w, 3] each."""
    return [image.pixels, _composite(rendered, image.pixels), _composite(rendered, np.zeros_like(image.pixels))]


def _composite(rgba: np.ndarray, background: np.ndarray, encoded: bool = False) -> np.ndarray:
    """RGBA [h, w, 4] over an sRGB background [h, w, 3]; linear RGB is encoded unless ``encoded``."""
    rgb = rgba[..., :3] if encoded else utils.linear_to_srgb(rgba[..., :3])
    alpha = np.clip(rgba[..., 3:], 0, 1)
    return alpha * rgb + (1 - alpha) * background


def _sample_map(texture: np.ndarray, uv: torch.Tensor) -> np.ndarray:
    """Look up a map [res, res, 3] (row 0 at v = 1) at per-pixel UVs [h, w, 2] -> [h, w, 3]."""
    grid = torch.stack([uv[..., 0] * 2 - 1, (1 - uv[..., 1]) * 2 - 1], dim=-1)[None].float()
    values = torch.nn.functional.grid_sample(torch.from_numpy(np.ascontiguousarray(texture)).permute(2, 0, 1)[None].float(),
                                             grid, align_corners=False, mode='bilinear', padding_mode='border')
    return values[0].permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------ inputs

def list_inputs(path: str) -> tuple:
    """``path`` (an image or a folder) -> (image paths, skipped non-image files)."""
    if os.path.isfile(path):
        return [path], []
    if not os.path.isdir(path):
        raise FitError(f"input '{path}' does not exist: give an image file or a folder of images")
    names = sorted(os.listdir(path))
    files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n)) and not n.startswith('.')]
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise FitError(f"input folder '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                       f"point --input at a folder of photos")
    return images, [f for f in files if f not in images]


# The fitted image is a square around the face, this many times the landmarks' extent: the face
# then fills the pixels that maxResolution allows, whatever the framing of the photo.
CROP_MARGIN = 1.8


def face_crop(points: np.ndarray, width: int, height: int) -> tuple:
    """Landmarks [68, 2] (input px) -> crop box (x0, y0, x1, y1) inside the image."""
    finite = points[np.isfinite(points).all(1)]
    centre = (finite.min(0) + finite.max(0)) / 2
    half = CROP_MARGIN * (finite.max(0) - finite.min(0)).max() / 2
    x0, y0 = np.maximum(np.floor(centre - half), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(centre + half), [width, height]).astype(int)
    return x0, y0, x1, y1


def prepare_image(index: int, path: str, config, detector, landmarks_path: str) -> FitImage:
    """Read, scale and find the landmarks of one photo; raise FitError with a clear message."""
    try:
        pixels, reduction = utils.load_image(path)  # input pixel = loaded pixel · reduction
    except utils.InputImageError as error:
        raise FitError(str(error)) from None
    if min(pixels.shape[:2]) < utils.MIN_IMAGE_SIZE:
        raise FitError(f'{path}: the image is {pixels.shape[1]}x{pixels.shape[0]} px, too small to fit a face '
                       f'(at least {utils.MIN_IMAGE_SIZE} px per side): use a larger photo')
    if landmarks_path:
        try:
            points = landmarks_module.read_landmark_file(
                landmarks_module.landmark_file_for(landmarks_path, path)) / reduction
        except landmarks_module.LandmarkError as error:
            raise FitError(str(error)) from None
        note = 'landmarks from file'
    else:
        points, faces = detector.detect((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
        if points is None:
            raise FitError(f'{path}: no face found; use a photo with a visible face, or give its 68 '
                           f'landmarks with --landmarks')
        note = f'{faces} faces found, fitting the largest' if faces > 1 else 'one face found'
    x0, y0, x1, y1 = face_crop(points, pixels.shape[1], pixels.shape[0])
    fitted, scale = utils.resize_image(pixels[y0:y1, x0:x1], config.maxResolution)
    landmarks = (points - [x0, y0]) * scale
    inside = ((landmarks >= 0) & (landmarks < [fitted.shape[1], fitted.shape[0]])).all(axis=1)
    if inside.sum() < 20:
        raise FitError(f'{path}: only {inside.sum()} of 68 landmarks lie inside the image; the face is '
                       f'too cut by the border to fit')
    if not inside.all():
        note += f'; {68 - inside.sum()} landmarks outside the image are ignored'
        landmarks = np.where(inside[:, None], landmarks, np.nan)
    if reduction > 1:
        note += f'; reduced {reduction}x on loading (longer side over {utils.MAX_INPUT_SIDE} px)'
    print(f'[{index}] {path}: {fitted.shape[1]}x{fitted.shape[0]} px (scale {scale / reduction:.3f}), {note}')
    return FitImage(index, path, fitted, scale / reduction, landmarks, (x0 * reduction, y0 * reduction))


# ------------------------------------------------------------------------------------ outputs

def overlay_image(model, params: pipeline.SceneParameters, image: FitImage, row: int, zoom: int = 2) -> np.ndarray:
    """The photo with the model's front-facing wireframe (white), its landmarks (red) and the
    target landmarks (green) [h·zoom, w·zoom, 3]."""
    from PIL import Image, ImageDraw
    width, height = image.size
    canvas = Image.fromarray((image.pixels * 255).astype(np.uint8)).resize((width * zoom, height * zoom))
    layer = Image.new('RGBA', canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    with torch.no_grad():
        single = _select(params, row)
        vertices = pipeline.model_vertices(model, single)[0]
        pixels = pipeline.project(vertices[None], single.focal, torch.tensor([image.centre]))[0].numpy() * zoom
        faces = model.faces.numpy()
        normals = utils.face_normals_np(vertices.numpy(), faces)
        facing = (normals * vertices.numpy()[faces[:, 0]]).sum(1) < 0  # toward the camera at the origin
    for a, b, c in faces[facing]:
        draw.line([tuple(pixels[a]), tuple(pixels[b]), tuple(pixels[c]), tuple(pixels[a])],
                  fill=(255, 255, 255, 40), width=1)
    lm = model.landmark_vertices.numpy()
    for j in range(68):
        if np.isfinite(image.landmarks[j]).all():
            x, y = image.landmarks[j] * zoom
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(0, 255, 0, 255))
        if lm[j] >= 0:
            x, y = pixels[lm[j]]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 0, 0, 255))
    return np.asarray(Image.alpha_composite(canvas.convert('RGBA'), layer).convert('RGB'), np.float32) / 255


def _select(params: pipeline.SceneParameters, image: int) -> pipeline.SceneParameters:
    """The parameters of one image of a batch (identity rows picked accordingly)."""
    identity = params.identity_index(image)
    pick = lambda t, i: None if t is None else t[i:i + 1]
    return pipeline.SceneParameters(
        shape=pick(params.shape, identity), expression=pick(params.expression, image),
        rotation=pick(params.rotation, image), translation=pick(params.translation, image),
        focal=pick(params.focal, image), albedo=pick(params.albedo, identity), sh=pick(params.sh, image),
        diffuse_map=pick(params.diffuse_map, identity), specular_map=pick(params.specular_map, identity),
        roughness_map=pick(params.roughness_map, identity), stage=params.stage)


def save_geometry(folder: str, model, params: pipeline.SceneParameters, images: list, suffix: str = '') -> None:
    """Per image: ``mesh{i}.obj`` in camera coordinates, ``params{i}.json``, ``landmarks{i}.png``."""
    with torch.no_grad():
        vertices = pipeline.model_vertices(model, params).numpy()
    for row, image in enumerate(images):
        i = f'{image.index}{suffix}'
        material = f'mesh{i}.mtl' if os.path.exists(os.path.join(folder, f'mesh{i}.mtl')) else ''
        utils.write_obj(os.path.join(folder, f'mesh{i}.obj'), vertices[row], model.faces.numpy(),
                        model.uvs.numpy(), model.uv_faces.numpy(), material_file=material)
        utils.write_text(os.path.join(folder, f'params{i}.json'), pipeline.params_json(
            params, row, image.size[0], image.size[1], image.scale, image.crop, image.path, model.name))
        utils.save_image(os.path.join(folder, f'landmarks{i}.png'), overlay_image(model, params, image, row))


# ------------------------------------------------------------------------------------ replay

TURNTABLE_FRAMES, TURNTABLE_DEGREES, TURNTABLE_SPP = 36, 35.0, 32


def fitted_runs(output: str) -> list:
    """The fits in ``output``: (checkpoint name, parameters of its latest stage, output image
    indices in row order). A shared-identity batch holds the images with a ``params{i}.json``."""
    import glob
    import re
    indices = sorted(int(m.group(1)) for m in (re.fullmatch(r'params(\d+)\.json', os.path.basename(p))
                                                for p in glob.glob(os.path.join(output, 'params*.json'))) if m)
    runs = []
    names = sorted({re.sub(r'_stage\d\.pt$', '', os.path.basename(p))
                    for p in glob.glob(os.path.join(output, 'checkpoints', '*_stage?.pt'))})
    for name in names:
        params = latest_checkpoint(output, name, 3)
        rows = indices if name == 'batch' else [int(name[len('image'):])]
        if params is not None and len(rows) == params.expression.shape[0]:
            runs.append((name, params, rows))
    return runs


def turntable_frames(scene: AppearanceScene, params: pipeline.SceneParameters, row: int) -> list:
    """The fitted head turning ±TURNTABLE_DEGREES about its vertical axis in the fitted light
    -> sRGB frames [h, w, 3] over black."""
    with torch.no_grad():
        vertices = pipeline.model_vertices(scene.model, _select(params, row))[0]
        centre = vertices.mean(0)
        frames = []
        for k in range(TURNTABLE_FRAMES):
            angle = math.radians(TURNTABLE_DEGREES) * math.sin(2 * math.pi * k / TURNTABLE_FRAMES)
            turn = pipeline.rotation_matrix(torch.tensor([[0.0, angle, 0.0]]))[0]
            rendered = scene.render(params, row, TURNTABLE_SPP, k, vertices=(vertices - centre) @ turn.T + centre)
            frames.append(_composite(rendered.numpy(), np.zeros(rendered.shape[:2] + (3,), np.float32)))
    return frames


def replay(output: str, config) -> int:
    """``--replay``: a turntable ``turntable_{i}.gif`` of every face fitted in ``output``."""
    import json
    runs = fitted_runs(output)
    if not runs:
        raise FitError(f"'{output}' holds no fit to replay (no checkpoints/*_stage*.pt with params*.json): "
                       f"run a fit with --output {output} first")
    model = morphableModel.load_model(config)
    for name, params, rows in runs:
        images = []
        for index in rows:
            with open(os.path.join(output, f'params{index}.json'), encoding='utf-8') as file:
                record = json.load(file)
            images.append(FitImage(index, record['source'], np.zeros((record['height'], record['width'], 3), np.float32),
                                   record['scale'], np.full((68, 2), np.nan)))
        scene = AppearanceScene(model, images, config.replace(bands=int(round(math.sqrt(params.sh.shape[1])))),
                                crop_to_face=False)  # the turning head leaves the fitted face's box
        if params.sh.abs().sum() == 0:  # a stage-1 fit has no light yet
            params.sh = initial_light(scene, params)
        for row, image in enumerate(images):
            path = os.path.join(output, f'turntable_{image.index}.gif')
            utils.save_gif(path, turntable_frames(scene, params, row))
            print(f'{name}: wrote {path} (stage {params.stage})')
    return 0


# ------------------------------------------------------------------------------- the command

def last_stage(config) -> int:
    """The last stage this config runs: stages with 0 iterations are skipped."""
    return 3 if config.iterStep3 > 0 else 2 if config.iterStep2 > 0 else 1


def checkpoint_path(folder: str, name: str, stage: int) -> str:
    return os.path.join(folder, 'checkpoints', f'{name}_stage{stage}.pt')


def latest_checkpoint(folder: str, name: str, until: int):
    """The parameters of the latest finished stage <= ``until`` of ``name``, or None."""
    for stage in range(until, 0, -1):
        path = checkpoint_path(folder, name, stage)
        if os.path.isfile(path):
            return pipeline.SceneParameters.load(path)
    return None


def fit_group(model, images: list, config, shared_identity: bool, output: str, name: str, resume: bool) -> None:
    """Run every stage on ``images`` (one image, or all of them with a shared identity), writing
    a checkpoint after each stage and the outputs at the end."""
    final = last_stage(config)
    params = latest_checkpoint(output, name, final) if resume else None
    if params is not None:
        print(f'{name}: resuming after stage {params.stage}')
    if params is None:
        params = fit_landmarks(model, images, config, shared_identity)
        params.save(checkpoint_path(output, name, 1))
        errors = landmark_error(model, params, images)
        print(f'{name}: stage 1 landmark error ' + ', '.join(f'{e:.2f}' for e in errors) + ' px')
        if config.saveIntermediateStage:
            save_geometry(output, model, params, images, suffix='_stage1')
    scene = None  # made by stages 2 and 3, else by save_outputs
    if params.stage < final:
        params, scene = fit_appearance(model, params, images, config, output, name)
    if final == 1:
        save_geometry(output, model, params, images)
    else:
        save_outputs(output, model, params, images, config, scene=scene)


def check_output_folder(output: str, overwrite: bool, resume: bool) -> None:
    """Never write over earlier results unless told to."""
    if os.path.isdir(output) and os.listdir(output) and not (overwrite or resume):
        raise FitError(f"output folder '{output}' already holds results: pass --overwrite to replace them, "
                       f"--resume to continue that run, or choose another --output")
    try:
        os.makedirs(os.path.join(output, 'checkpoints'), exist_ok=True)
        probe = os.path.join(output, '.write-test')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as error:
        raise FitError(f"cannot write to output folder '{output}' ({error.strerror}): choose another --output") from None


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', help='an image, or a folder of images (a batch)')
    parser.add_argument('--output', required=True, help='folder for the results')
    parser.add_argument('--sharedIdentity', action='store_true',
                        help='the images show one person: share identity shape and reflectance')
    parser.add_argument('--config', default=None, help='INI config file (default: optimConfig.ini beside this script)')
    parser.add_argument('--landmarks', default=None,
                        help="68 landmarks 'x y' per row in input pixels: a file, or for a folder input a "
                             "folder of <image stem>.txt")
    parser.add_argument('--device', choices=('cpu', 'cuda'), help='override config key device')
    parser.add_argument('--maxResolution', type=int, help='override config key maxResolution')
    parser.add_argument('--iterations', type=int, nargs=3, metavar=('STEP1', 'STEP2', 'STEP3'),
                        help='override config keys iterStep1 iterStep2 iterStep3')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='override any config key')
    parser.add_argument('--overwrite', action='store_true', help='replace results already in --output')
    parser.add_argument('--resume', action='store_true', help='continue a run in --output from its checkpoints')
    parser.add_argument('--replay', action='store_true',
                        help='render a turntable (turntable_{i}.gif) of each face fitted in --output, from its checkpoints')
    args = parser.parse_args(argv)
    if not args.input and not args.replay:
        parser.error('--input is required (except with --replay)')
    return args


def load_run_config(args):
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'optimConfig.ini')
    config = config_module.load_config(args.config or default)
    overrides = dict(item.split('=', 1) if '=' in item else (item, '') for item in args.set)
    if args.device:
        overrides['device'] = args.device
    if args.maxResolution:
        overrides['maxResolution'] = args.maxResolution
    if args.iterations:
        overrides.update(iterStep1=args.iterations[0], iterStep2=args.iterations[1], iterStep3=args.iterations[2])
    config = config.replace(**{k.strip(): v for k, v in overrides.items()})
    if config.device == 'cuda' and not torch.cuda.is_available():
        print("warning: device = 'cuda' but no CUDA GPU is usable here; running on the CPU instead")
        config = config.replace(device='cpu')
    return config


def run(args) -> int:
    """The whole command; -> exit status (0 only if every image was fitted)."""
    config = load_run_config(args)
    torch.manual_seed(config.seed)
    if args.replay:
        return replay(args.output, config)
    paths, skipped = list_inputs(args.input)
    for path in skipped:
        print(f'note: skipping {path}: not an image ({", ".join(IMAGE_EXTENSIONS)})')
    check_output_folder(args.output, args.overwrite, args.resume)
    model = morphableModel.load_model(config)
    detector = None if args.landmarks else landmarks_module.make_detector(config.lamdmarksDetectorType, config.device)
    failures = {}
    final = last_stage(config)

    def prepare(index, path):
        try:
            return prepare_image(index, path, config, detector, args.landmarks)
        except FitError as error:
            failures[path] = str(error)
            print(f'error: {error}')
            return None

    def fit(images, shared, name):
        try:
            fit_group(model, images, config, shared, args.output, name, args.resume)
        except (FitError, OSError) as error:
            reason = str(error) if isinstance(error, FitError) else (
                f'writing the results failed ({error.strerror}: {error.filename}); free some space '
                f'or choose another --output, then continue with --resume')
            message = f"{', '.join(image.path for image in images)}: {reason}"
            for image in images:
                failures[image.path] = message
            print(f'error: {message}')

    if args.sharedIdentity:
        images = [im for im in (prepare(i, p) for i, p in enumerate(paths)) if im is not None]
        if images:
            fit(images, True, 'batch')
    else:
        from tqdm import tqdm
        for index, path in enumerate(tqdm(paths, desc='images', unit='image', disable=len(paths) == 1)):
            name = f'image{index}'
            if args.resume and os.path.isfile(checkpoint_path(args.output, name, final)) \
                    and os.path.isfile(os.path.join(args.output, f'params{index}.json')):
                print(f'[{index}] {path}: already fitted, skipped (--resume)')
                continue
            image = prepare(index, path)
            if image is not None:
                fit([image], False, name)
    fitted = len(paths) - len(failures)
    print(f'done: {fitted} of {len(paths)} images fitted; results in {os.path.abspath(args.output)}')
    for path, reason in failures.items():
        print(f'  failed: {reason}')
    return 0 if not failures else 1


def main(argv=None) -> int:
    import renderer  # imports no Mitsuba until a renderer is made
    args = parse_arguments(argv)
    try:
        return run(args)
    except (FitError, config_module.ConfigError, morphableModel.ModelFileError,
            landmarks_module.LandmarkError, renderer.RendererError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'\ninterrupted: continue with --resume --output {args.output}', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
