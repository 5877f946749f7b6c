"""The three stages of the fit, their losses, and what they fit to.

Stage 1 fits pose, expression and focal length to the 2D landmarks (Levenberg-Marquardt).
Stage 2 fits identity, expression, statistical albedo, pose and SH light to the photos through the
ray tracer (Adam). Stage 3 refines per-texel diffuse, specular and roughness maps.
Every stage takes and returns ``SceneParameters`` (on the CPU) and a history of its steps (loss
terms by name and the seconds each step took); stages 2 and 3 run on the pipeline's device (the
GPU with ``device = 'cuda'``: model, renders and gradients stay there).
"""
import math
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import scipy.ndimage
import scipy.optimize
import torch
from torch.optim.adam import adam as torch_adam
from tqdm import tqdm

import landmarks as landmarks_module
import textures
from config import Config
from morphableModel import MorphableModel
from photos import FitImage
from pipeline import (INITIAL_ROUGHNESS, Pipeline, SceneParameters, axis_angle_from_matrix, image_centres, project,
                      to_camera)
from skinning import rotation_matrix, rotation_matrix_derivative


class FitError(RuntimeError):
    """The fit of an image failed (it diverged); the message says so."""


@dataclass
class Targets:
    """What a group of images is fitted to, built once and shared by every stage and report."""
    landmarks: torch.Tensor         # [n, 68, 2] pixels of the fitted images (0 where not usable)
    landmark_weights: torch.Tensor  # [n, 68] LANDMARK_WEIGHTS where the point was found and has a vertex, else 0
    sizes: list                     # [(w, h)] of the fitted images
    centres: torch.Tensor           # [n, 2] image centres (w/2, h/2)
    photos: list                    # [h, w, 3] per image, linear colour
    left_out: list = None           # [h, w] bool per image: pixels the face cannot explain (see ``unexplained_pixels``)

    @staticmethod
    def of(model: MorphableModel, images: list[FitImage]) -> 'Targets':
        """The targets of ``images`` for ``model``."""
        targets = Targets.of_landmarks(model, np.stack([image.landmarks for image in images]),
                                       [image.size for image in images])
        targets.photos = [torch.from_numpy(image.linear_pixels()) for image in images]
        return targets

    @staticmethod
    def of_landmarks(model: MorphableModel, points: np.ndarray, sizes: list) -> 'Targets':
        """Landmark targets alone: points [n, 68, 2] (NaN where not found) in images of ``sizes``."""
        usable = np.isfinite(points).all(-1) & model.landmark_usable.numpy()[None]
        return Targets(
            landmarks=torch.from_numpy(np.nan_to_num(points, nan=0.0)).float(),
            landmark_weights=torch.from_numpy(usable * landmarks_module.LANDMARK_WEIGHTS).float(),
            sizes=list(sizes), centres=image_centres(sizes), photos=[])

    def to(self, device) -> 'Targets':
        """The same targets with every tensor on ``device``."""
        return replace(self, landmarks=self.landmarks.to(device), landmark_weights=self.landmark_weights.to(device),
                       centres=self.centres.to(device), photos=[photo.to(device) for photo in self.photos],
                       left_out=self.left_out and [mask.to(device) for mask in self.left_out])

    def pixel_weights(self, row: int) -> torch.Tensor:
        """[h, w] 1 where the photometric loss counts the pixels of image row ``row``, 0 where they are left out."""
        photo = self.photos[row]
        if self.left_out is None:
            return torch.ones(photo.shape[:2], device=photo.device)
        return (~self.left_out[row]).float()

    @property
    def landmark_usable(self) -> torch.Tensor:
        """[n, 68] bool: the points that count."""
        return self.landmark_weights > 0


def landmark_error(landmark_pixels: torch.Tensor, targets: Targets) -> np.ndarray:
    """Mean distance (px) between the model's landmarks [n, 68, 2] and the targets, per image [n]."""
    distance = (landmark_pixels.detach() - targets.landmarks).norm(dim=-1)
    usable = targets.landmark_usable
    return ((distance * usable).sum(1) / usable.sum(1).clamp_min(1)).numpy()


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
    translation = np.array([offset[0] / scale, offset[1] / scale, focal / scale])
    return axis_angle_from_matrix(rotation), translation


def levenberg_marquardt(residuals, x: torch.Tensor, iterations: int, tolerance: float = 1e-10,
                        lower: torch.Tensor = None, upper: torch.Tensor = None, jacobian=None) -> tuple:
    """Minimise ||residuals(x)||² from x [p], within the box ``lower`` <= x <= ``upper`` [p] if
    given -> (x, history: energy and seconds per iteration); ``jacobian(x)`` -> [r, p] (default:
    forward mode through ``residuals``). Marquardt's diagonal scaling makes the
    step invariant to the parameters' units (radians, millimetres, σ). In the box, a parameter at
    a bound that the gradient pushes outward sits out the step (an active set), and the step is
    clipped to the box."""
    damping = 1e-3
    jacobian = jacobian or torch.func.jacfwd(residuals)
    r = residuals(x)
    energy = float(r @ r)
    history = []
    for _ in range(iterations):
        start = time.perf_counter()
        derivative = jacobian(x)
        gradient = derivative.T @ r
        hessian = derivative.T @ derivative
        diagonal = torch.diag(torch.diag(hessian).clamp_min(1e-9))
        free = torch.ones_like(x, dtype=torch.bool)
        if lower is not None:
            free = ~(((x <= lower) & (gradient > 0)) | ((x >= upper) & (gradient < 0)))
        while True:
            step = torch.zeros_like(x)
            system = (hessian + damping * diagonal)[free][:, free]
            step[free] = torch.linalg.solve(system, -gradient[free])
            candidate = x + step if lower is None else torch.clamp(x + step, lower, upper)
            r_candidate = residuals(candidate)
            candidate_energy = float(r_candidate @ r_candidate)
            if math.isfinite(candidate_energy) and candidate_energy < energy:
                damping = max(damping / 3, 1e-9)
                break
            damping *= 4
            if damping > 1e8:
                return x, history
        converged = energy - candidate_energy < tolerance * max(energy, 1e-12)
        x, r, energy = candidate, r_candidate, candidate_energy
        history.append(dict(energy=energy, seconds=time.perf_counter() - start))
        if converged:
            break
    return x, history


# Landmarks tell the focal length only weakly: with expression (and identity) free, a strong
# perspective from a short focal length fits them about as well. benchmark.py's face (focal
# 768 px, 0.9 m away) came back at 190 px, 0.22 m away, from the mean face's fit, and at 465 px
# with its identity fitted too; with the focal length given, the vertex error after stage 2 was
# 3.5 mm instead of 5.0. So where the focal length is fitted, the face's distance has a log-normal
# prior: portraits are taken from about TYPICAL_DISTANCE mm, give or take a factor
# exp(DISTANCE_SIGMA) (1σ: 0.37 to 2.7 m). It brought the benchmark's focal length to 745 px; a
# σ of 0.5 pulled a synthetic face at 0.35 m to 0.8 m, this one to 0.5 m.
TYPICAL_DISTANCE, DISTANCE_SIGMA = 1000.0, 1.0


class LandmarkProblem:
    """Stage 1 as least squares: landmark reprojection in units of σ, plus N(0, 1) priors.

    Residuals: √w_j (p_j − l_j) / σ for every usable landmark j, then √λ_id · identity and
    √λ_expr · expression. 68 points cannot tell identity from expression, focal length and pose
    apart; their priors pick the most likely mix (a maximum a posteriori fit). Fitting the identity
    here rather than leaving it all to stage 2 (as NextFace does) gives stage 2 a nearer start:
    on benchmark.py's face, with the distance prior (TYPICAL_DISTANCE), the vertex error after
    stage 1 went from 8.1 to 4.7 mm. σ = max(w, h) / 128 px (2 px at 256 px), and λ = weight / 0.001,
    so NextFace's default weights give the plain Gaussian priors."""

    def __init__(self, landmark_model: MorphableModel, targets: Targets, config: Config, identity_rows: list = None):
        """``landmark_model``: ``MorphableModel.landmark_model`` of the model, with its identity
        basis (the identity is fitted) or at a known identity (a tracked clip's: none is),
        built once for all the problems that share it. ``identity_rows`` [n]: the identity row
        of each image (default: one each)."""
        self.expression_bounds = landmark_model.expression_bounds
        self.model = landmark_model
        self.targets = targets.landmarks.double()
        self.centres = targets.centres.double()
        sigma = torch.tensor([max(size) / 128 for size in targets.sizes], dtype=torch.float64)
        self.residual_scale = targets.landmark_weights.double().sqrt() / sigma[:, None]  # [n, 68]
        self.n = len(targets.sizes)
        self.identity_rows = list(range(self.n)) if identity_rows is None else list(identity_rows)
        self.identity_weight = math.sqrt(config.weightShapeReg / 0.001)
        self.expression_weight = math.sqrt(config.weightExpressionReg / 0.001)
        self.optimize_focal = config.optimizeFocalLength
        self.sizes = dict(rotation=(self.n, 3), translation=(self.n, 3),
                          identity=(max(self.identity_rows) + 1, landmark_model.n_shape),
                          expression=(self.n, landmark_model.n_expression),
                          log_focal=(self.n,) if self.optimize_focal else (0,))
        counts = [math.prod(size) for size in self.sizes.values()]
        self.offsets = dict(zip(self.sizes, np.cumsum([0] + counts[:-1]).tolist()))  # each part's first column
        at_landmarks = lambda basis: landmark_model.landmark_points(basis).permute(1, 2, 0)  # [68, 3, k]
        self.bases_at_landmarks = (None if landmark_model.skinning is not None else
                                   (at_landmarks(landmark_model.shape_basis), at_landmarks(landmark_model.expression_basis)))

    def pack(self, **values) -> torch.Tensor:
        """The parameters by name -> one vector [p]; a part of no size (the identity at a known
        identity, a fixed focal length) may be left out."""
        empty = torch.zeros(0, dtype=torch.float64)
        return torch.cat([values[k].reshape(-1) if k in values or math.prod(size) else empty
                          for k, size in self.sizes.items()])

    def bounds(self) -> tuple:
        """(lower, upper) [p] of the packed parameters: blendshape weights in their range, the
        rest free; (None, None) without bounds."""
        if self.expression_bounds is None:
            return None, None
        infinite = {key: torch.full(size, math.inf, dtype=torch.float64) for key, size in self.sizes.items()}
        low, high = self.expression_bounds
        lower = self.pack(**{**{k: -v for k, v in infinite.items()}, 'expression': torch.full(self.sizes['expression'], low)})
        upper = self.pack(**{**infinite, 'expression': torch.full(self.sizes['expression'], high)})
        return lower.double(), upper.double()

    def unpack(self, x: torch.Tensor) -> dict:
        return {key: x[self.offsets[key]:self.offsets[key] + math.prod(size)].reshape(size)
                for key, size in self.sizes.items()}

    def canonical(self, p: dict) -> torch.Tensor:
        """Model landmarks in the model's frame [n, 68, 3]."""
        return self.model.landmark_points(self.model.vertices(p['identity'][self.identity_rows], p['expression']))

    def landmark_pixels(self, p: dict, focal: torch.Tensor) -> torch.Tensor:
        """Model landmarks in pixels [n, 68, 2]."""
        return project(to_camera(self.canonical(p), p['rotation'], p['translation']), focal, self.centres)

    def focal(self, p: dict, fixed_focal: torch.Tensor) -> torch.Tensor:
        """The focal lengths [n] of the unpacked parameters ``p``: fitted, or ``fixed_focal``."""
        return p['log_focal'].exp() if self.optimize_focal else fixed_focal

    def residuals(self, x: torch.Tensor, fixed_focal: torch.Tensor, anchor: torch.Tensor = None,
                  anchor_weights: torch.Tensor = None) -> torch.Tensor:
        """The residuals [r] of the packed parameters ``x``: the landmarks' (``landmark_residuals``),
        then the priors' (``prior_residuals``)."""
        return torch.cat([self.landmark_residuals(x, fixed_focal), self.prior_residuals(x, anchor, anchor_weights)])

    def jacobian(self, x: torch.Tensor, fixed_focal: torch.Tensor, anchor: torch.Tensor = None,
                 anchor_weights: torch.Tensor = None) -> torch.Tensor:
        """d ``residuals`` / dx [r, p] in closed form (``landmark_jacobian``, ``prior_jacobian``).
        Reverse mode, a backward pass a row, took 12 ms an iteration on benchmark.py's problem
        (306 parameters), most of stage 1: 3.8 s there, 0.8 s in closed form (obama.jpg's with
        ICT-FaceKit, 160 parameters: 4.6 -> 1.3 ms an iteration)."""
        return torch.cat([self.landmark_jacobian(x, fixed_focal), self.prior_jacobian(x, anchor, anchor_weights)])

    def columns(self, key: str, image: int) -> slice:
        """The columns of part ``key`` that image ``image`` depends on: its row of the part (its
        identity row for the identity)."""
        size = self.sizes[key]
        row = self.identity_rows[image] if key == 'identity' else image
        width = size[1] if len(size) == 2 else 1
        return slice(self.offsets[key] + row * width, self.offsets[key] + (row + 1) * width)

    def shape_jacobians(self, p: dict) -> tuple:
        """How each image's canonical landmarks [68, 3] move with its identity and expression
        coefficients -> ([n, 68, 3, n_shape], [n, 68, 3, n_expression]): the bases at the
        landmarks for a linear model, forward mode through the joints for a skinned one (FLAME)."""
        if self.model.skinning is None:
            return tuple(basis.expand(self.n, -1, -1, -1) for basis in self.bases_at_landmarks)
        points = lambda a, b: self.model.landmark_points(self.model.vertices(a[None], b[None]))[0]
        return torch.func.vmap(torch.func.jacfwd(points, argnums=(0, 1)))(p['identity'][self.identity_rows],
                                                                           p['expression'])

    def landmark_jacobian(self, x: torch.Tensor, fixed_focal: torch.Tensor) -> torch.Tensor:
        """d ``landmark_residuals`` / dx [n·68·2, p] by the chain rule through the pinhole
        projection, the rigid transform and the model."""
        p = self.unpack(x)
        focal = self.focal(p, fixed_focal)
        canonical = self.canonical(p)  # [n, 68, 3]
        rotation = rotation_matrix(p['rotation'])  # [n, 3, 3]
        camera = to_camera(canonical, p['rotation'], p['translation'])  # [n, 68, 3]
        z = camera[..., 2].clamp_min(1e-3)  # as ``project``: no derivative along z where clamped
        f = focal[:, None] / z  # [n, 68]
        projection = x.new_zeros(*camera.shape[:2], 2, 3)  # d pixel / d camera point
        projection[..., 0, 0] = projection[..., 1, 1] = f
        projection[..., 2] = -f[..., None] * camera[..., :2] / z[..., None] * (camera[..., 2:] > 1e-3)
        projection = projection * self.residual_scale[..., None, None]
        turn = rotation_matrix_derivative(p['rotation'])  # [n, 3, 3, 3]: dR_ab / dω_j
        turned = torch.einsum('nabj,nlb->nlaj', turn, canonical)  # d camera point / d axis-angle [n, 68, 3, 3]
        parts = dict(rotation=projection @ turned, translation=projection)
        through_model = projection @ rotation[:, None]  # d pixel / d canonical point [n, 68, 2, 3]
        identity, expression = self.shape_jacobians(p)
        parts['identity'] = through_model @ identity
        parts['expression'] = through_model @ expression
        if self.optimize_focal:  # pixel − centre = f · (x, y) / z
            parts['log_focal'] = (focal[:, None, None] * camera[..., :2] / z[..., None]
                                  * self.residual_scale[..., None])[..., None]
        jacobian = x.new_zeros(self.n, camera.shape[1], 2, len(x))
        for key, part in parts.items():
            for image in range(self.n):
                jacobian[image, ..., self.columns(key, image)] += part[image]
        return jacobian.reshape(-1, len(x))

    def prior_jacobian(self, x: torch.Tensor, anchor: torch.Tensor = None,
                       anchor_weights: torch.Tensor = None) -> torch.Tensor:
        """d ``prior_residuals`` / dx [priors, p]: scaled identities, and the distance's
        derivative 1 / (σ z) along each translation's z (0 where it is clamped)."""
        rows = []
        for key, weight in (('identity', self.identity_weight), ('expression', self.expression_weight)):
            block = x.new_zeros(math.prod(self.sizes[key]), len(x))
            block[:, self.offsets[key]:self.offsets[key] + len(block)] = weight * torch.eye(len(block), dtype=x.dtype,
                                                                                           device=x.device)
            rows.append(block)
        if self.optimize_focal:
            z = self.unpack(x)['translation'][:, 2]
            block = x.new_zeros(self.n, len(x))
            block[range(self.n), [self.columns('translation', image).start + 2 for image in range(self.n)]] = (
                (z > 1.0) / (DISTANCE_SIGMA * z.clamp_min(1.0)))
            rows.append(block)
        if anchor is not None:
            rows.append(torch.diag(anchor_weights.sqrt()))
        return torch.cat(rows)

    def landmark_residuals(self, x: torch.Tensor, fixed_focal: torch.Tensor) -> torch.Tensor:
        """√w_j (p_j − l_j) / σ [n·68·2] of the packed parameters ``x``."""
        p = self.unpack(x)
        error = (self.landmark_pixels(p, self.focal(p, fixed_focal)) - self.targets) * self.residual_scale[..., None]
        return error.reshape(-1)

    def prior_residuals(self, x: torch.Tensor, anchor: torch.Tensor = None,
                        anchor_weights: torch.Tensor = None) -> torch.Tensor:
        """The priors' residuals of the packed parameters ``x``: √λ_id · identity, √λ_expr ·
        expression, the distance's (where the focal length is fitted); with ``anchor`` [p] (the
        previous frame's), √w (x − anchor) too, ``anchor_weights`` w [p]: a temporal prior
        against jitter."""
        p = self.unpack(x)
        terms = [self.identity_weight * p['identity'].reshape(-1), self.expression_weight * p['expression'].reshape(-1)]
        if self.optimize_focal:
            distance = p['translation'][:, 2].clamp_min(1.0)
            terms.append((distance.log() - math.log(TYPICAL_DISTANCE)) / DISTANCE_SIGMA)
        if anchor is not None:
            terms.append(anchor_weights.sqrt() * (x - anchor))
        return torch.cat(terms)


def focal_candidates(sizes: list, config: Config) -> list:
    """Initial focal lengths [n] to start from: the configured one, and if the focal length is
    fitted, a range of fields of view (landmarks alone tell focal length only weakly, so the
    best of several starts is kept)."""
    configured = [config.camFocalLength] * len(sizes)
    if not config.optimizeFocalLength:
        return [configured]
    widths = np.array([max(size) for size in sizes], dtype=np.float64)
    return [configured] + [list(widths * factor) for factor in (1.0, 2.0, 4.0, 8.0)]


def fit_landmarks(model: MorphableModel, targets: Targets, config: Config, shared_identity: bool) -> tuple:
    """Stage 1: pose, expression and focal length of the mean face from the landmarks, from
    several focal starts (``focal_candidates``); then, from the best, the identity with them
    (``fit_identity``) -> (SceneParameters, history of every Levenberg-Marquardt iteration).
    The starts are tried with the mean face, 107 parameters an image instead of 306 with BFM's
    identity: the identity is found once, from where they lead."""
    n = len(targets.sizes)
    problem = LandmarkProblem(model.landmark_model(torch.zeros(model.n_shape)), targets, config)
    mean_points = model.landmark_points(model.mean_shape[None])[0].numpy()
    relative = (targets.landmarks - targets.centres[:, None]).numpy()  # [n, 68, 2]
    usable = targets.landmark_usable.numpy()
    best, history = None, []
    lower, upper = problem.bounds()
    for focals in focal_candidates(targets.sizes, config):
        focal = torch.tensor(focals, dtype=torch.float64)
        poses = [initial_pose(mean_points[ok], points[ok], f) for points, ok, f in zip(relative, usable, focals)]
        x0 = problem.pack(
            rotation=torch.tensor(np.stack([p[0] for p in poses])),
            translation=torch.tensor(np.stack([p[1] for p in poses])),
            expression=torch.zeros(problem.sizes['expression'], dtype=torch.float64),
            log_focal=focal.log() if config.optimizeFocalLength else torch.zeros(0, dtype=torch.float64))
        x, steps = levenberg_marquardt(lambda v: problem.residuals(v, focal), x0, config.iterStep1,
                                       lower=lower, upper=upper, jacobian=lambda v: problem.jacobian(v, focal))
        history += steps
        energy = float(problem.residuals(x, focal).square().sum())
        if best is None or energy < best[1]:
            best = (x, energy, focal)
    x, _, focal = best
    p = problem.unpack(x)
    p, steps = fit_identity(model, targets, config, shared_identity, p, focal)
    params = SceneParameters.zeros(model, n, 1 if shared_identity else n, config.bands)
    params.identity, params.expression, params.rotation, params.translation = (
        p[k].float() for k in ('identity', 'expression', 'rotation', 'translation'))
    params.focal = problem.focal(p, focal).float()
    params.stage = 1
    return params, history + steps


def fit_identity(model: MorphableModel, targets: Targets, config: Config, shared_identity: bool, start: dict,
                 focal: torch.Tensor) -> tuple:
    """Identity, expression, pose and (if fitted) focal length from the landmarks, from the mean
    face's ``start`` (``LandmarkProblem.unpack``'s dict; ``focal`` [n] where it is not fitted)
    -> (the same dict with the identity, the Levenberg-Marquardt history)."""
    n = len(targets.sizes)
    problem = LandmarkProblem(model.landmark_model(), targets, config,
                              [0] * n if shared_identity else None)
    x0 = problem.pack(**{**start, 'identity': torch.zeros(problem.sizes['identity'], dtype=torch.float64)})
    lower, upper = problem.bounds()
    x, history = levenberg_marquardt(lambda v: problem.residuals(v, focal), x0, config.iterStep1, lower=lower, upper=upper,
                                     jacobian=lambda v: problem.jacobian(v, focal))
    return problem.unpack(x), history


# ------------------------------------------------------------------------------- the losses

def photometric_loss(rendered: torch.Tensor, photo: torch.Tensor, weights: torch.Tensor = None,
                     power: int = 1) -> torch.Tensor:
    """Mean L1 distance (``power`` 2: mean squared distance) over the pixels the face covers
    (linear colour); rendered [h, w, 4], photo [h, w, 3], pixel ``weights`` [h, w] (0: left out;
    default all 1)."""
    alpha = rendered[..., 3:].detach()
    if weights is not None:
        alpha = alpha * weights[..., None]
    return (alpha * (rendered[..., :3] - photo).abs() ** power).sum() / (3 * alpha.sum().clamp_min(1.0))


def landmark_loss(landmark_pixels: torch.Tensor, targets: Targets) -> torch.Tensor:
    """Weighted mean squared landmark distance (px²) of the model's landmarks [n, 68, 2]."""
    squared = ((landmark_pixels - targets.landmarks) ** 2).sum(-1)
    return (targets.landmark_weights * squared).sum() / targets.landmark_weights.sum()


def photometric_error(pipeline: Pipeline, params: SceneParameters, targets: Targets, spp: int = 64) -> float:
    """Mean L1 error (linear colour) over the face pixels, averaged over the images."""
    with torch.no_grad():
        vertices = pipeline.vertices(params)
        return float(np.mean([float(photometric_loss(pipeline.render(params, row, spp, 999, vertices[row]), photo,
                                                     targets.pixel_weights(row)))
                              for row, photo in enumerate(targets.photos)]))


def learning_rate_factor(iteration: int, iterations: int) -> float:
    """Full steps for the first half, then a linear decay to 1/10: the late small steps average
    out the Monte Carlo noise of the gradients instead of jittering around the optimum."""
    progress = iteration / max(iterations - 1, 1)
    return 1.0 if progress < 0.5 else 1.0 - 1.8 * (progress - 0.5)


def adam_step(groups: list, rates: list, moments: dict) -> None:
    """One Adam step (torch's defaults: betas 0.9 / 0.999, eps 1e-8) of the tensors of ``groups``
    that have a gradient, each group at its rate of ``rates``; ``moments``: each tensor's first
    and second moments and step count, made at its first step. The fused kernel (one a tensor,
    without the temporaries of the plain update: several maps a stage-3 step) through
    ``torch.optim.adam.adam``, the function ``torch.optim.Adam`` steps with, the same arithmetic:
    the class imports torch's compiler stack on its first use, about 1 s of a fit's start."""
    for group, rate in zip(groups, rates):
        params = [t for t in group['params'] if t.grad is not None]
        if not params:
            continue
        first, second, steps = (list(part) for part in zip(*(
            moments.setdefault(t, (torch.zeros_like(t), torch.zeros_like(t), torch.zeros((), device=t.device)))
            for t in params)))
        torch_adam(params, [t.grad for t in params], first, second, [], steps, fused=True, amsgrad=False,
                   beta1=0.9, beta2=0.999, lr=rate, weight_decay=0.0, eps=1e-8, maximize=False)


def adam_loop(stage: str, groups: list, loss_terms, iterations: int, config: Config, on_step=None,
              project=None) -> list:
    """Adam over ``groups`` (torch param groups) for ``iterations`` steps of the sum of
    ``loss_terms(iteration)`` (a dict of weighted terms by name) -> history: the terms and the
    seconds of each step; a group's steps shrink as ``learning_rate_factor`` says, or stay as
    they are where it has ``decay=False``. ``project()`` puts the parameters back into their
    bounds after each step. A non-finite loss or gradient puts back the last good values and
    halves the steps; it fails the image after five in a row. ``on_step(iteration, terms)``
    runs after every step (it may raise to stop the fit)."""
    tensors = [t for group in groups for t in group['params']]
    good = [t.detach().clone() for t in tensors]
    moments, bad_in_a_row, nan_scale, history = {}, 0, 1.0, []
    progress = tqdm(range(iterations), desc=stage, unit='it', leave=False, disable=not sys.stderr.isatty())
    for iteration in progress:
        start = time.perf_counter()
        rates = [group['lr'] * nan_scale * (learning_rate_factor(iteration, iterations) if group.get('decay', True) else 1.0)
                 for group in groups]
        for tensor in tensors:
            tensor.grad = None
        terms = loss_terms(iteration)
        loss = sum(terms.values())
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            # a finite loss can have a NaN gradient, which Adam would spread into the parameters
            # and its moments for good (obama3.jpg's stage 2 ended with NaN parameters this way);
            # one check for all of them: one GPU sync
            grads = [t.grad for t in tensors if t.grad is not None]
            finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if not finite:
            bad_in_a_row += 1
            if bad_in_a_row >= 5:
                raise FitError(f'{stage}: the loss or its gradient stays NaN/Inf; the fit of this image diverged')
            with torch.no_grad():
                for tensor, value in zip(tensors, good):
                    tensor.copy_(value)
            nan_scale /= 2
            continue
        bad_in_a_row = 0
        adam_step(groups, rates, moments)
        if project is not None:
            with torch.no_grad():
                project()
        if iteration % 10 == 0:
            with torch.no_grad():
                for kept, tensor in zip(good, tensors):
                    kept.copy_(tensor)
        values = dict(zip(terms, torch.stack([term.detach() for term in terms.values()]).tolist()))  # one GPU sync
        history.append(dict(values, seconds=time.perf_counter() - start))
        if on_step is not None:
            on_step(iteration, values)
        if config.verbose:
            print(f'{stage} {iteration}: ' + ', '.join(f'{k} {v:.5f}' for k, v in values.items()))
        progress.set_postfix({k: f'{v:.4f}' for k, v in values.items()})
    return history


# ------------------------------------------------------------------------------------ stage 2

# The start of stage 2: for the stage-1 geometry, the image is linear in the SH light (for fixed
# reflectance) and in the statistical albedo (for fixed light), so both are solved by least
# squares instead of being left to Adam's noisy steps (which, from a uniform light and the mean
# albedo, never found the albedo: its error stayed at that of the mean). A face pixel is
#     photo = diffuse albedo · Σ_k D_k c_k + specular albedo · Σ_k S_k c_k
# with D_k, S_k the pixel under SH basis light k of a white diffuse face and of a white specular
# one (rendered once, SOLVE_SPP samples), c the light, and both albedos linear in the statistical
# albedo coefficients at the pixel's texel. Light and albedo are solved in turn, SOLVE_ROUNDS
# times, each a weighted least squares whose weights (iteratively reweighted, Tukey's biweight)
# leave out the pixels that the face cannot explain (outlierThreshold). Robust weights need a
# robust start: the first is a uniform light, the median ratio of photo to mean face (a plain
# least-squares light bent itself to a dark microphone at the chin, and the weights kept it).
# Bands 0-2 of the light are solved (they hold almost all the shading of a convex object); the
# higher bands start at 0. Solving band 3 too, against a rim light that bands 0-2 cannot express,
# did worse on 32bit.png (ICT-FaceKit: after stage 3 0.0299 against 0.0288).
SOLVED_BANDS, SOLVE_ROUNDS, SOLVE_SPP = 3, 12, 32
# The photo fixes only the product of albedo and light, channel by channel: a face twice as red
# under a light half as red looks the same. Left to the albedo's prior, every face got the mean
# face's colour and the rest went into the light (on obama2.jpg with ICT-FaceKit: a pink albedo
# (0.46, 0.31, 0.23) under an orange light (3.1, 2.0, 1.5)). Photos are white-balanced, so
# halfway through the rounds each channel's scale is set where the albedo's N(0, 1) prior meets a
# white-light prior: the light's colour is grey, give or take a factor exp(LIGHT_COLOUR_SIGMA)
# per channel. The brightness stays the albedo prior's: an exposure prior (a white face under the
# light at 0.6 on average) raised obama2.jpg's red albedo (0.46 -> 0.51), its photo being bright.
LIGHT_COLOUR_SIGMA = 0.1
# Alternations of a light's colour and its SH pattern (``solve_light``).
LIGHT_COLOUR_ROUNDS = 4
# Fewer face pixels than this in an image (a face a few pixels wide) and the start is a uniform light.
MIN_SOLVE_PIXELS = 64
# The albedo's Gaussian prior against the pixels' residual, as a pixel noise level (linear colour).
ALBEDO_PIXEL_SIGMA = 0.2
# Pixels per block of the albedo's normal equations (``solve_albedo``).
ALBEDO_SOLVE_CHUNK = 4096


@dataclass
class SolvePixels:
    """The face pixels of one image as the least squares see them (k pixels, b = bands² solved)."""
    photo: torch.Tensor     # [k, 3] linear colour
    diffuse: torch.Tensor   # [k, b, 3] D_k: a white diffuse face under each basis light
    specular: torch.Tensor  # [k, b, 3] S_k: a white specular face under each basis light
    diffuse_albedo: tuple   # (mean [k, 3], basis [k, 3, n_albedo]) of the diffuse albedo at the pixels
    specular_albedo: tuple  # the same for the specular albedo

    def subset(self, keep: torch.Tensor) -> 'SolvePixels':
        """The pixels that ``keep`` [k] bool marks (no copy when it marks them all)."""
        if bool(keep.all()):
            return self
        return SolvePixels(self.photo[keep], self.diffuse[keep], self.specular[keep],
                           tuple(t[keep] for t in self.diffuse_albedo), tuple(t[keep] for t in self.specular_albedo))


def face_pixels(pipeline: Pipeline, row: int, vertices: torch.Tensor, focal: float) -> tuple:
    """The pixels of image row ``row`` the face covers -> (mask [h, w] bool, their texel indices
    [k] into the fitted maps (row-major, row 0 at v = 1))."""
    uv = pipeline.uv_image(row, vertices, focal)
    with torch.no_grad():
        alpha = pipeline.render_maps(row, vertices, focal, *[torch.ones(pipeline.resolution, pipeline.resolution, c)
                                                              for c in (3, 3, 1)], torch.ones(1, 1, 3), 4)[..., 3]
    mask = alpha > 0.99  # whole pixels: the edges blend with the background
    res = pipeline.resolution
    cols = (uv[..., 0][mask] * res).long().clamp(0, res - 1)
    rows = ((1 - uv[..., 1][mask]) * res).long().clamp(0, res - 1)
    return mask, rows * res + cols


def light_basis_images(pipeline: Pipeline, row: int, vertices: torch.Tensor, focal: float, mask: torch.Tensor) -> tuple:
    """The face pixels ``mask`` [h, w] under each of the first SOLVED_BANDS² SH basis lights
    (white) -> (with a white diffuse map, with a white specular map) [k, bands², 3] each.
    One render gives both: with the diffuse map red and the specular map green, the red channel is
    the diffuse render and the green the specular one, sample for sample (no sample's path depends
    on the maps' colours: the BSDF samples by its lobes and roughness)."""
    count = solved_coefficients(pipeline.config)
    basis = pipeline.envmap.basis[..., :count] * pipeline.envmap.window[:count]
    res = pipeline.resolution
    colour = lambda *rgb: torch.tensor(rgb, dtype=torch.float32).expand(res, res, 3)
    maps = colour(1.0, 0.0, 0.0), colour(0.0, 1.0, 0.0), torch.full((res, res, 1), INITIAL_ROUGHNESS)
    # Rendered without the light's sampling: a light is then only looked up, so the basis lights
    # go in as they are, negative lobes and all (a sampled light is clipped at 0). A seed per
    # basis light: with one seed every basis image would carry the same samples, and their shared
    # noise biased the solved light (tests/test_appearance.py's face: band 1 over DC 10% too
    # strong; stage 2 from there walked the geometry from 0.16 to 2.7 mm).
    render = lambda light, seed: pipeline.render_maps(row, vertices, focal, *maps, light[..., None].expand(-1, -1, 3),
                                                      SOLVE_SPP, seed, sample_light=False)[mask][:, :3]
    images = torch.stack([render(basis[..., k], k) for k in range(basis.shape[-1])], dim=1)  # [k, bands², 3]
    return images[..., 0:1].expand(-1, -1, 3), images[..., 1:2].expand(-1, -1, 3)


def solved_coefficients(config: Config) -> int:
    """How many SH coefficients the least squares solve: those of bands 0-2, or fewer bands."""
    return min(SOLVED_BANDS, config.bands) ** 2


def solve_pixels(pipeline: Pipeline, row: int, vertices: torch.Tensor, focal: float, photo: torch.Tensor,
                 mask: torch.Tensor, texels: torch.Tensor) -> SolvePixels:
    """The face pixels ``mask`` [h, w] of image row ``row`` (at ``texels`` [k]), rendered under
    the basis lights white diffuse and white specular, and the statistical albedo at them."""
    res, model = pipeline.resolution, pipeline.model
    interpolation = pipeline.texels(res)[0].weights[texels.numpy()]  # [k, verts] scipy CSR

    def at_pixels(mean: torch.Tensor, basis: torch.Tensor) -> tuple:
        """(mean [verts, 3], basis [n, verts, 3]) -> their values at the pixels ([k, 3], [k, 3, n])."""
        flat = basis.permute(1, 2, 0).reshape(len(mean), -1).numpy()  # [verts, 3·n]
        return (torch.from_numpy(interpolation @ mean.numpy()),
                torch.from_numpy(np.asarray(interpolation @ flat)).reshape(len(texels), 3, -1))  # float32: 40 MB at 20k px
    diffuse, specular = light_basis_images(pipeline, row, vertices, focal, mask)
    return SolvePixels(
        photo=photo[mask].double(), diffuse=diffuse.double(), specular=specular.double(),
        diffuse_albedo=at_pixels(model.diffuse_mean, model.diffuse_basis),
        specular_albedo=at_pixels(model.specular_mean, model.specular_basis))


def albedo_at(pixels: SolvePixels, coefficients: torch.Tensor) -> tuple:
    """The diffuse and specular albedo [k, 3] of the statistical ``coefficients`` [n] at the pixels."""
    return tuple((mean + basis @ coefficients.float()).double()
                 for mean, basis in (pixels.diffuse_albedo, pixels.specular_albedo))


def solve_light(pixels: SolvePixels, coefficients: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares SH coefficients [bands², 3] of the light under which the albedo of
    ``coefficients`` [n] gives the photo; ``weights`` [k]. The light has one colour: it is a
    colour [3] times one SH pattern [bands²], found by alternating the two. (Each channel on its
    own, the light painted colour gradients over the face: a red cup at the chin became red
    light from below on skin-coloured skin.)"""
    diffuse, specular = albedo_at(pixels, coefficients)
    design = diffuse[:, None, :] * pixels.diffuse + specular[:, None, :] * pixels.specular  # [k, b, 3]
    root = weights.sqrt()[:, None]
    colour = torch.ones(3, dtype=torch.float64)
    for _ in range(LIGHT_COLOUR_ROUNDS):
        stacked = root.repeat(3, 1) * (design * colour).permute(2, 0, 1).reshape(-1, design.shape[1])  # [3k, b]
        # normal equations: b = 9 unknowns in double, well conditioned; 4x cheaper than a QR of [3k, b]
        pattern = torch.linalg.solve(stacked.T @ stacked, stacked.T @ (root * pixels.photo).T.reshape(-1))
        shaded = torch.einsum('kbc,b->kc', design, pattern)  # [k, 3] under white light
        colour = (weights[:, None] * shaded * pixels.photo).sum(0) / (weights[:, None] * shaded ** 2).sum(0).clamp_min(1e-12)
    return pattern[:, None] * colour[None, :]


def shading(pixels: SolvePixels, light: torch.Tensor) -> tuple:
    """The pixels of a white diffuse face and of a white specular face under ``light``
    [bands², 3] -> ([k, 3], [k, 3])."""
    return tuple(torch.einsum('kbc,bc->kc', basis_images, light.double())
                 for basis_images in (pixels.diffuse, pixels.specular))


def solve_albedo(images: list, lights: list, weights: list, n_albedo: int) -> torch.Tensor:
    """Weighted least-squares statistical albedo coefficients [n_albedo] with their N(0, 1) prior
    for the pixels of ``images`` (``SolvePixels`` of one identity) under their ``lights``
    [bands², 3], with ``weights`` [k] per image."""
    normal = torch.eye(n_albedo, dtype=torch.float64) * ALBEDO_PIXEL_SIGMA ** 2
    right = torch.zeros(n_albedo, dtype=torch.float64)
    for pixels, light, weight in zip(images, lights, weights):
        diffuse_shading, specular_shading = shading(pixels, light)
        (diffuse_mean, diffuse_basis), (specular_mean, specular_basis) = pixels.diffuse_albedo, pixels.specular_albedo
        target = pixels.photo - diffuse_shading * diffuse_mean.double() - specular_shading * specular_mean.double()
        # A channel and ALBEDO_SOLVE_CHUNK pixels at a time: the design [chunk, n] in double stays
        # small (the whole face's, 30k pixels of AlbedoMM's 145 components, was about 200 MB of
        # temporaries and the peak of the fit's memory).
        for start in range(0, len(target), ALBEDO_SOLVE_CHUNK):
            chunk = slice(start, start + ALBEDO_SOLVE_CHUNK)  # views, not gathered copies
            for c in range(3):
                design = (diffuse_shading[chunk, c, None] * diffuse_basis[chunk, c].double()
                          + specular_shading[chunk, c, None] * specular_basis[chunk, c].double())
                weighted = design * weight[chunk, None]
                normal += weighted.T @ design
                right += weighted.T @ target[chunk, c]
    return torch.linalg.solve(normal, right)


def residual(pixels: SolvePixels, coefficients: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over the colours [k] between the photo and the model's pixels."""
    diffuse, specular = albedo_at(pixels, coefficients)
    diffuse_shading, specular_shading = shading(pixels, light)
    return (diffuse * diffuse_shading + specular * specular_shading - pixels.photo).abs().mean(-1)


def uniform_light(pixels: SolvePixels, coefficients: torch.Tensor, bands: int) -> torch.Tensor:
    """The uniform light [bands², 3] under which the albedo of ``coefficients`` [n] gives the
    photo's pixels their median brightness, colour by colour."""
    diffuse, specular = albedo_at(pixels, coefficients)
    under_unit_light = diffuse * pixels.diffuse[:, 0] + specular * pixels.specular[:, 0]  # [k, 3]
    light = torch.zeros(bands ** 2, 3, dtype=torch.float64)
    light[0] = (pixels.photo / under_unit_light.clamp_min(1e-6)).median(0).values
    return light


def tukey_weights(residuals: torch.Tensor, threshold: float) -> torch.Tensor:
    """Iteratively reweighted least squares: Tukey's biweight (1 - (r / s)²)² with s = threshold
    times the median residual ``residuals`` [k]: 0 for a pixel further off (outlierThreshold 0:
    every pixel counts fully)."""
    if threshold <= 0:
        return torch.ones_like(residuals)
    scale = threshold * residuals.median().clamp_min(1e-6)
    return (1 - (residuals / scale) ** 2).clamp_min(0) ** 2


def white_shading(pixels: SolvePixels, light: torch.Tensor) -> torch.Tensor:
    """The mean brightness [3] of a white diffuse face under ``light`` [bands², 3] over the pixels."""
    return shading(pixels, light)[0].mean(0)


def white_balance(model: MorphableModel, coefficients: torch.Tensor, shadings: list) -> tuple:
    """Where along the albedo/light ambiguity the albedo of ``coefficients`` [n] should lie: the
    scale k [3] of each colour channel of the albedo (the light's divided by it) that best meets
    the albedo's N(0, 1) prior and the white-light prior on the ``shadings`` (``white_shading``
    of each image of that identity) -> (k [3], the coefficients of the scaled albedo [n])."""
    basis, mean = model.diffuse_basis, model.diffuse_mean  # [n, verts, 3], [verts, 3]
    albedo = mean + torch.einsum('n,nvc->vc', coefficients, basis)
    # least squares by the normal equations, with no copy of the basis (a view [n, verts·3]; one
    # channel's columns are its products with the albedo of that channel alone)
    flat = basis.reshape(len(basis), -1)
    channel = lambda c: (albedo * (torch.arange(3) == c)).reshape(-1)  # [verts·3], 0 outside channel c
    gram = (flat @ flat.T).double()
    columns = torch.stack([flat @ channel(c) for c in range(3)] + [flat @ mean.reshape(-1)], dim=1).double()
    solution = torch.linalg.lstsq(gram, columns).solution.numpy()  # the channels' and the mean's coefficients
    per_channel, of_mean = solution[:, :3], solution[:, 3]
    logs = np.log(np.stack([brightness.numpy() for brightness in shadings]).clip(1e-6))  # [images, 3]

    def cost(log_scale: np.ndarray) -> float:
        scaled = per_channel @ np.exp(log_scale) - of_mean
        light = logs - log_scale  # the log light of each channel once the albedo is scaled
        cast = ((light - light.mean(1, keepdims=True)) / LIGHT_COLOUR_SIGMA) ** 2
        return float(scaled @ scaled + cast.sum())
    log_scale = scipy.optimize.minimize(cost, np.zeros(3), method='BFGS').x
    scale = np.exp(log_scale)
    return torch.from_numpy(scale), torch.from_numpy(per_channel @ scale - of_mean).float()


def face_solve_pixels(pipeline: Pipeline, params: SceneParameters, photos: list) -> list:
    """Per image, (the mask [h, w] of its face pixels, their ``SolvePixels``): the renders of
    ``solve_appearance``, made once for every solve with the geometry of ``params``."""
    with torch.no_grad():
        vertices = pipeline.vertices(params)
        focal = [float(f) for f in params.focal]
        faces = [face_pixels(pipeline, row, vertices[row], focal[row]) for row in range(params.n_images)]
        return [(mask, solve_pixels(pipeline, row, vertices[row], focal[row], photo.cpu(), mask, texels))
                for row, (photo, (mask, texels)) in enumerate(zip(photos, faces))]


def solve_appearance(pipeline: Pipeline, params: SceneParameters, targets: Targets, rendered: list = None) -> SceneParameters:
    """The SH light of every image (bands 0-2) and the statistical albedo of every identity for
    the geometry of ``params``, by alternating, robustly weighted least squares over the face
    pixels that ``targets`` does not leave out -> SceneParameters. ``rendered``: that geometry's
    ``face_solve_pixels``, if made already."""
    params = params.detached()
    with torch.no_grad():
        rendered = rendered or face_solve_pixels(pipeline, params, targets.photos)
        images = [pixels.subset(targets.pixel_weights(row).cpu()[mask] > 0) for row, (mask, pixels) in enumerate(rendered)]
        if min(len(pixels.photo) for pixels in images) < MIN_SOLVE_PIXELS:  # too few to solve for: a uniform light
            params.sh = pipeline.initial_light(params, targets.photos)
            return params
        identity_of = [params.identity_row(row) for row in range(params.n_images)]
        rows_of = {identity: [row for row, of in enumerate(identity_of) if of == identity]
                   for identity in range(params.identity.shape[0])}
        albedo_of = lambda row: params.albedo[identity_of[row]]
        threshold, count = pipeline.config.outlierThreshold, solved_coefficients(pipeline.config)
        lights = [uniform_light(pixels, albedo_of(row), min(SOLVED_BANDS, pipeline.config.bands))
                  for row, pixels in enumerate(images)]
        for round in range(SOLVE_ROUNDS):
            weights = [tukey_weights(residual(pixels, albedo_of(row), lights[row]), threshold)
                       for row, pixels in enumerate(images)]
            if round:  # the first light is the mean face's
                for identity, rows in rows_of.items():
                    params.albedo[identity] = solve_albedo([images[row] for row in rows], [lights[row] for row in rows],
                                                           [weights[row] for row in rows], pipeline.model.n_albedo).float()
            lights = [solve_light(pixels, albedo_of(row), weights[row]) for row, pixels in enumerate(images)]
            if round == SOLVE_ROUNDS // 2:  # the colour the photos cannot tell, from the priors
                for identity, rows in rows_of.items():
                    scale, params.albedo[identity] = white_balance(
                        pipeline.model, params.albedo[identity], [white_shading(images[row], lights[row]) for row in rows])
                    for row in rows:
                        lights[row] = lights[row] / scale
        params.sh = torch.zeros_like(params.sh)
        for row, light in enumerate(lights):
            params.sh[row, :count] = light.float()
    return params


# Pixels the face cannot explain (a hand, a microphone, hair or glasses in front of it; the mouth's
# inside) are left out of stages 2 and 3 and of the photo map. A pixel's residual (mean absolute
# difference over the colours, linear) after the least-squares start, and again after stage 2,
# marks it when it exceeds OUTLIER_FLOOR and outlierThreshold times the median residual of the
# face; of those, only connected regions of at least OUTLIER_MIN_AREA of the face count: eyebrows,
# nostrils and lip lines, which the statistical albedo misses as well, are smaller and stay in
# (stage 3 fits them). A region then takes in the pixels connected to it whose residual exceeds
# half that level (hysteresis: the parts of an object nearer the skin's colour, such as a red
# cup's body), and is grown by OUTLIER_GROW px to take in its blurred edge. When more than
# OUTLIER_MAX_SHARE of the face would go, the fit itself is off, not the photo: nothing is left out.
# Within OUTLINE_BAND of the face's height of its outline, a marked pixel counts whatever the size
# of its region: there the fitted face overhangs the real one (a jaw over a white collar, a cheek
# over the background, on biden.jpg a strip of 1-2% of the face) and the stage-3 and photo maps had
# painted collar and background under the chin. A hole's rim (an eye's lashes) is no outline, nor is
# the image's border. Of the marks there only brighter ones count: dark ones at the outline are as
# often a brow's end or hair, which stage 3 should paint (32bit.png lost a brow). And only after
# stage 2: the start's light (bands 0-2) leaves rim-lit skin at the outline brighter than the face
# (obama_partial_face.jpg's temple). There a mark counts in groups of OUTLINE_MIN_PIXELS touching
# pixels, not opened as elsewhere: a rim light along the cheek is a strip 1-3 px wide, which the
# opening took away, and stage 3 painted it into the diffuse map as a pale streak (32bit.png).
# Pixels there whose hue is further than OUTLINE_HUE from the render's (``hue_distance``) count too,
# however small their residual, unless darker than OUTLINE_HUE_FLOOR times the render (a dark
# pixel's hue is noise): a red flag behind the jaw of 32bit.png, as dark as the skin on average,
# went into the diffuse map as a red streak. A shadow on the skin keeps the skin's hue and stays.
OUTLIER_FLOOR, OUTLIER_MIN_AREA, OUTLIER_GROW, OUTLIER_MAX_SHARE = 0.03, 0.02, 2, 0.4
OUTLINE_BAND, OUTLINE_MIN_PIXELS, OUTLINE_HUE, OUTLINE_HUE_FLOOR = 0.04, 4, 1.0, 0.3
# Linear colour added before taking logarithms of a hue (``hue_distance``).
HUE_EPSILON = 0.01


def outline_band(face: np.ndarray) -> np.ndarray:
    """The pixels of ``face`` [h, w] bool within OUTLINE_BAND of its height of its outer outline."""
    rows = np.flatnonzero(face.any(1))
    width = max(1, round(OUTLINE_BAND * (rows[-1] - rows[0] + 1))) if len(rows) else 1
    # the image's border is no outline: a face the photo cuts off goes on beyond it
    return face & ~scipy.ndimage.binary_erosion(scipy.ndimage.binary_fill_holes(face), iterations=width, border_value=1)


def regions_of_at_least(marks: np.ndarray, pixels: float, structure: np.ndarray = None) -> np.ndarray:
    """The ``marks`` [h, w] bool in connected regions of at least ``pixels`` pixels (connected
    through edges, or as ``structure`` says: np.ones((3, 3)) for corners too)."""
    regions, count = scipy.ndimage.label(marks, structure=structure)
    large = np.bincount(regions.ravel(), minlength=count + 1) >= pixels
    large[0] = False  # the background label
    return large[regions]


def hue_distance(photo: np.ndarray, render: np.ndarray) -> np.ndarray:
    """How far apart the hues of two images [h, w, 3] (linear) are, per pixel [h, w]: the L1
    distance of their log chromaticities (log R/G, log B/G); 0 for one colour at two brightnesses."""
    chromaticity = lambda image: np.log(image + HUE_EPSILON)[..., [0, 2]] - np.log(image[..., 1:2] + HUE_EPSILON)
    return np.abs(chromaticity(photo) - chromaticity(render)).sum(-1)


def hysteresis(seeds: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The ``seeds`` [h, w] bool and the connected regions of ``weak`` [h, w] bool they touch."""
    regions, _ = scipy.ndimage.label(weak)
    return seeds | (np.isin(regions, np.unique(regions[seeds])) & (regions > 0))


def unexplained_pixels(rendered: torch.Tensor, photo: torch.Tensor, threshold: float, outline: bool = True) -> torch.Tensor:
    """The face pixels [h, w] bool that the render [h, w, 4] does not explain in ``photo``
    [h, w, 3] (see OUTLIER_FLOOR above; ``outline``: with the outline band's rule)."""
    alpha = rendered[..., 3].cpu().numpy()
    face = alpha > 0.99
    seen, explained = photo.cpu().numpy(), rendered[..., :3].cpu().numpy()  # [h, w, 3]
    difference = seen - explained
    residual = np.abs(difference).mean(-1)
    none = torch.zeros(alpha.shape, dtype=torch.bool)
    if face.sum() < MIN_SOLVE_PIXELS:
        return none
    level = max(threshold * float(np.median(residual[face])), OUTLIER_FLOOR)
    candidates = scipy.ndimage.binary_opening(face & (residual > level))  # not single noisy pixels
    seeds = regions_of_at_least(candidates, OUTLIER_MIN_AREA * face.sum())
    weak = face & (residual > level / 2)
    reached = hysteresis(seeds, weak)
    overhang = np.zeros_like(face)
    if outline:
        band, brighter = outline_band(face), difference.mean(-1) > 0
        unlike_skin = band & (hue_distance(seen, explained) > OUTLINE_HUE) & (
            seen.mean(-1) > OUTLINE_HUE_FLOOR * explained.mean(-1))
        touching = np.ones((3, 3))
        overhang = hysteresis(regions_of_at_least(band & (residual > level) & brighter, OUTLINE_MIN_PIXELS, touching),
                              weak & brighter)
        overhang |= regions_of_at_least(unlike_skin, OUTLINE_MIN_PIXELS, touching)
    outliers = scipy.ndimage.binary_dilation(seeds | reached | overhang, iterations=OUTLIER_GROW) & (alpha > 0)
    if outliers.sum() > OUTLIER_MAX_SHARE * face.sum():
        return none
    return torch.from_numpy(outliers)


def fitted_renders(pipeline: Pipeline, params: SceneParameters) -> list:
    """Each image's render under ``params`` [h, w, 4] (CPU, SOLVE_SPP samples): what the face
    explains of its photo."""
    with torch.no_grad():
        vertices = pipeline.vertices(params)
        return [pipeline.render(params, row, SOLVE_SPP, 7, vertices[row]).cpu() for row in range(params.n_images)]


def leave_out_unexplained(pipeline: Pipeline, params: SceneParameters, targets: Targets,
                          outline: bool = True, rendered: list = None) -> Targets:
    """``targets`` with the pixels that the face of ``params`` (its ``fitted_renders``, or
    ``rendered``) does not explain left out too (``unexplained_pixels``, with the outline band's
    rule or not; none with outlierThreshold 0). Pixels already left out stay out: a fit that never
    saw them may explain them by chance."""
    threshold = pipeline.config.outlierThreshold
    if threshold <= 0:
        return replace(targets, left_out=None)
    rendered = rendered or fitted_renders(pipeline, params)
    left_out = [unexplained_pixels(render, photo.cpu(), threshold, outline) for render, photo in zip(rendered, targets.photos)]
    if targets.left_out is not None:
        left_out = [new | old.cpu() for new, old in zip(left_out, targets.left_out)]
    return replace(targets, left_out=left_out)


def stage3_targets(pipeline: Pipeline, params: SceneParameters, targets: Targets) -> Targets:
    """What stage 3 and the photo map fit after stage 2: ``targets`` with what the face of
    ``params`` does not explain left out (``leave_out_unexplained``), except, with a shared
    identity, what the photos that see it leave out alike (``keep_what_every_photo_shows``)."""
    if pipeline.config.outlierThreshold <= 0:  # nothing is left out: no renders to look at
        return leave_out_unexplained(pipeline, params, targets)
    rendered = fitted_renders(pipeline, params)
    return keep_what_every_photo_shows(pipeline, params, leave_out_unexplained(pipeline, params, targets, rendered=rendered),
                                       rendered)


# A texel that every photo seeing it leaves out goes back in only for the photos that agree on
# its colour: their photo-to-render ratio at its pixel (the true over the fitted albedo where the
# diffuse light dominates, whatever each photo's light) within a factor AGREEMENT of the median
# ratio of those photos, and only where two or more agree. A beard agrees with itself from every
# side; a microphone held over it in one photo of three does not, and stays out (two photos that
# disagree both stay out). In tests/test_appearance.py's three synthetic views a beard texel's
# ratio lies within 1.2-1.3x of the median in 95% of the texels; a grey microphone over the skin
# just beside the beard (left out by the outliers' grow) within 1.4x in a few: at 1.5 7% of the
# microphone's pixels went back in, at 1.4 4%, at 1.3 1%.
AGREEMENT = 1.4


def colour_ratios(photo: torch.Tensor, render: torch.Tensor, pixels: np.ndarray) -> torch.Tensor:
    """log(photo / render) [res, res, 3] at each texel's pixel ``pixels`` [res, res, 2] (x, y);
    photo [h, w, 3], render [h, w, 4]."""
    ratio = (photo.cpu() / render[..., :3].clamp_min(1e-3)).clamp(1e-3, 1e3).log()
    return torch.from_numpy(textures.sample_image(ratio.numpy(), pixels.reshape(-1, 2))).reshape(*pixels.shape[:2], 3)


def masked_median(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The median over the first dimension of ``values`` [n, ...] where ``mask`` [n, ...] bool
    (the mean of the middle two for an even count; inf where none)."""
    ordered = torch.where(mask, values, torch.tensor(float('inf'))).sort(0).values
    count = mask.sum(0, keepdim=True)
    middle = lambda k: ordered.gather(0, k.clamp(0, len(values) - 1))
    return ((middle((count - 1) // 2) + middle(count // 2)) / 2)[0]


def keep_what_every_photo_shows(pipeline: Pipeline, params: SceneParameters, targets: Targets,
                                rendered: list) -> Targets:
    """With a shared identity, the left-out pixels of the texels that two or more photos see and
    every one of them leaves out go back in, in the photos that agree on their colour
    (AGREEMENT; ``rendered``: each image's ``fitted_renders``): the same part of the face
    unexplained in every photo is the face's own (a beard, which the statistical albedo cannot
    express), while something in front of the face (a microphone) hides other texels in each
    photo, and the photos that see them explained paint them, or it hides the beard in one of
    them and looks unlike it."""
    if targets.left_out is None or not params.shared_identity or params.n_images < 2:
        return targets
    with torch.no_grad():
        vertices = pipeline.vertices(params)
        views = [pipeline.texel_view(params, row, vertices[row], pipeline.resolution) for row in range(params.n_images)]
    seen = torch.stack([view['visible'] & (view['facing'] > textures.PHOTO_GRAZING) for view in views])  # [n, res, res]
    unexplained = torch.stack([torch.from_numpy(textures.at_pixels(left_out.cpu().numpy(), view['pixels'].numpy()))
                               for left_out, view in zip(targets.left_out, views)]) & seen
    own = (seen.sum(0) >= 2) & (unexplained.sum(0) == seen.sum(0))  # [res, res]
    ratios = torch.stack([colour_ratios(photo, render, view['pixels'].numpy())
                          for photo, render, view in zip(targets.photos, rendered, views)])  # [n, res, res, 3]
    median = masked_median(ratios, unexplained[..., None].expand_as(ratios))
    agrees = ((ratios - median).abs().amax(-1) <= math.log(AGREEMENT)) & unexplained  # [n, res, res]
    own &= agrees.sum(0) >= 2
    back = [torch.from_numpy(textures.pixels_of((own & agree).numpy(), view['pixels'].numpy(), tuple(mask.shape)))
            for mask, view, agree in zip(targets.left_out, views, agrees)]
    return replace(targets, left_out=[mask.cpu() & ~pixels for mask, pixels in zip(targets.left_out, back)])


def start_stage2(pipeline: Pipeline, params: SceneParameters, targets: Targets) -> tuple:
    """Stage 2's start from stage 1: light and albedo by least squares (``solve_appearance``),
    the pixels that face cannot explain left out, and where any were, light and albedo solved
    again without them (from the same renders) -> (SceneParameters, Targets). A dark beard over
    a third of the face had tilted the first light (its robust weights cannot leave out that
    much), and Adam keeps the light it starts from."""
    rendered = face_solve_pixels(pipeline, params, targets.photos)
    solved = solve_appearance(pipeline, params, targets, rendered)
    targets = leave_out_unexplained(pipeline, solved, targets, outline=False)  # see OUTLINE_BAND
    if targets.left_out is not None and any(bool(mask.any()) for mask in targets.left_out):
        solved = solve_appearance(pipeline, params, targets, rendered)
    return solved, targets


def left_out_share(pipeline: Pipeline, params: SceneParameters, targets: Targets) -> list:
    """Per image, the share of the face's pixels that ``targets`` leaves out."""
    if targets.left_out is None:
        return [0.0] * params.n_images
    with torch.no_grad():
        vertices = pipeline.vertices(params)
        covered = [pipeline.render(params, row, 4, 0, vertices[row])[..., 3] > 0 for row in range(params.n_images)]
    return [float((mask & face).sum()) / max(float(face.sum()), 1.0) for mask, face in zip(targets.left_out, covered)]


# Adam step sizes of stage 2: coefficients in σ, rotation in radians, translation in mm, light
# relative to its DC level. From the least-squares start and stage 1's mean face, geometry steps
# of 0.1 σ fitted the benchmark's shape best (vertex error after stage 2: 0.02 → 6.0 mm, 0.05 →
# 5.4, 0.1 → 4.8, 0.2 → 5.4). Since stage 1 fits the identity, the start is nearer and 0.05 σ
# does better: four runs each of stage 2, 0.0501-0.0589 and 2.76-3.30 mm (mean 0.0549, 2.94 mm)
# against 0.0556-0.0787 and 2.99-4.28 mm (0.0674, 3.67 mm) with 0.1 σ. Light steps 5× smaller
# than before keep the solved light (10× smaller kept it closer on the small test face, but the
# benchmark's error rose: 0.058 → 0.065). Those were 300 steps of 8 spp; with 100 of 32 (the
# defaults now) these rates, 1.5× and 2× them did alike (six runs from one start, README).
# Stage 2's geometry (identity and expression) keeps its steps whole to the end (its group's
# decay=False in ``adam_loop``): it was still moving when the steps shrank (vertex error 2.98 ->
# 2.93 mm over the last 10 steps), and the noise they would average out is not what limits it.
# From one least-squares start, stage 2 alone, vertex error shrinking (to 1/10 over the second
# half) against whole steps for every group, three runs of each in turn: 3.12 / 2.81, 2.92 /
# 2.34, 2.80 / 2.26 mm; with earlier runs 2.79-3.12 mm (five, mean 2.91) against 2.26-2.95 mm
# (six, mean 2.57). But whole steps for the pose, light and albedo too jittered them:
# benchmark.py 1.34x / 1.27x the truth's photometric error, landmarks 0.34 / 0.26 px (two runs),
# so those still shrink; with the geometry alone whole 1.15-1.305x (mean 1.23x), 2.42-2.92 mm
# (mean 2.66), 0.21-0.27 px over four runs (before: 1.15-1.26x, mean 1.19x, 2.59-3.03 mm, mean
# 2.77, 0.15-0.19 px over four).
STAGE2_RATES = dict(geometry=0.05, albedo=0.02, rotation=0.002, translation=0.5, light=0.001)
# The photometric steps on a clip's frames: pose and expression near the landmark fit.
REFINE_RATES = dict(expression=0.02, rotation=0.002, translation=0.5)


def training_samples(samples: int, iteration: int, iterations: int) -> int:
    """Samples per pixel of step ``iteration`` of a stage of ``iterations`` steps that traces
    ``samples``: half of them while the steps are full (the first half, see
    ``learning_rate_factor``), all of them while the steps shrink and average the noise out.
    Stage 3 does so. Stage 2 did at 8 spp (benchmark.py, two runs each: 8 spp throughout 0.0629
    / 0.0632 and 5.47 / 5.88 mm, 81.7 / 80.2 s; 4 spp first 0.0635 / 0.0616 and 6.07 / 5.12 mm,
    71.3 / 72.4 s), but at 32 its first half needs them all: from one cached start, four runs
    each of 100 steps, 8 spp in the first half 3.38-3.72 mm (42-43 s), 16 spp 2.83-3.26 mm (six
    runs, 49-50 s), 32 spp 2.76-3.02 mm (59 s)."""
    return max(1, samples // 2) if iteration < iterations // 2 else samples


def stage_samples(config: Config, stage: int) -> int:
    """Samples per pixel of stage 2 or 3: rtTrainingSamplesStep2 / rtTrainingSamplesStep3, or
    rtTrainingSamples where that is 0."""
    return (config.rtTrainingSamplesStep2 if stage == 2 else config.rtTrainingSamplesStep3) or config.rtTrainingSamples


def fit_stage2(pipeline: Pipeline, params: SceneParameters, targets: Targets, on_step=None) -> tuple:
    """Stage 2: identity, expression, statistical albedo, pose and SH light by the photometric
    loss, with landmark and prior terms -> (SceneParameters, history).
    ``on_step(params, iteration, iterations, terms)`` sees the parameters after every step."""
    config = pipeline.config
    params = params.detached()
    if params.sh.abs().sum() == 0:  # straight from stage 1
        params, targets = start_stage2(pipeline, params, targets)
    params, targets = params.to(pipeline.device), targets.to(pipeline.device)
    pixel_weights = [targets.pixel_weights(row) for row in range(params.n_images)]
    trainable = [params.identity, params.expression, params.rotation, params.translation, params.albedo, params.sh]
    for tensor in trainable:
        tensor.requires_grad_(True)
    rates = STAGE2_RATES
    light_level = float(params.sh.detach()[:, 0].abs().max().clamp_min(1e-3))  # SH steps relative to the light
    groups = [dict(params=[params.identity, params.expression], lr=rates['geometry'], decay=False),
              dict(params=[params.albedo], lr=rates['albedo']),
              dict(params=[params.rotation], lr=rates['rotation']),
              dict(params=[params.translation], lr=rates['translation']),
              dict(params=[params.sh], lr=rates['light'] * light_level)]
    spp = stage_samples(config, 2)  # all of them from the first step: see training_samples

    def loss_terms(iteration: int) -> dict:
        vertices = pipeline.vertices(params)
        photo = sum(photometric_loss(pipeline.render(params, row, spp, iteration, vertices[row]),
                                     target, pixel_weights[row]) for row, target in enumerate(targets.photos)) / len(targets.photos)
        return dict(
            photo=photo,
            landmarks=config.weightLandmarksLossStep2 * landmark_loss(pipeline.landmarks(params, vertices), targets),
            identity_prior=config.weightShapeReg * (params.identity ** 2).mean(),
            expression_prior=config.weightExpressionReg * (params.expression ** 2).mean(),
            albedo_prior=config.weightAlbedoReg * (params.albedo ** 2).mean())

    bounds = pipeline.model.expression_bounds
    history = adam_loop('stage 2', groups, loss_terms, config.iterStep2, config,
                        on_step and (lambda k, terms: on_step(params, k, config.iterStep2, terms)),
                        bounds and (lambda: params.expression.clamp_(*bounds)))
    params = params.detached().to('cpu')
    params.stage = 2
    return params, history


def refine_pose(pipeline: Pipeline, params: SceneParameters, targets: Targets, anchors: dict, weights: dict,
                steps: int) -> SceneParameters:
    """A few Adam steps on the pose and expression of one image (a frame of a clip) by the
    photometric and landmark losses, each parameter held to its ``anchors`` value (the landmark
    fit) with ``weights`` (1/σ²): the rest of ``params`` stays as it is."""
    config = pipeline.config
    params = params.detached()
    for tensor in (params.rotation, params.translation, params.expression):
        tensor.requires_grad_(True)
    groups = [dict(params=[getattr(params, name)], lr=rate) for name, rate in REFINE_RATES.items()]
    sigma = max(targets.sizes[0]) / 128  # px, as stage 1 weighs landmarks

    def loss_terms(iteration: int) -> dict:
        vertices = pipeline.vertices(params)
        rendered = pipeline.render(params, 0, config.rtTrainingSamples, iteration, vertices[0])
        prior = sum(weights[name] * ((getattr(params, name) - anchor) ** 2).sum() for name, anchor in anchors.items())
        return dict(photo=photometric_loss(rendered, targets.photos[0]),
                    landmarks=config.weightLandmarksLossStep2 * landmark_loss(pipeline.landmarks(params, vertices), targets),
                    temporal_prior=1e-3 * prior / sigma ** 2)

    bounds = pipeline.model.expression_bounds
    adam_loop('refine', groups, loss_terms, steps, config, project=bounds and (lambda: params.expression.clamp_(*bounds)))
    return params.detached()


# ------------------------------------------------------------------------------------ stage 3

# Adam step sizes of stage 3, per texel of the maps and for the SH coefficients. Twice NextFace's
# (0.005), for 50 steps of 16 spp instead of 100 of 8: from one stage-2 result of benchmark.py
# the photometric error after stage 3 went 0.0455 -> 0.0443 (--detail: 0.0512 -> 0.0489) in
# 11 s instead of 15, the diffuse map's error against the true one unchanged (0.0613, 0.0840),
# its grain (distance to its 3x3 mean) 6% higher.
STAGE3_RATES = dict(diffuse=0.01, specular=0.01, roughness=0.01, light=0.01)
# Stage 3's data term is the squared error (times this weight), not stage 2's L1. At 16 spp a
# pixel's noise is larger than what is left of its residual, so the L1's gradient (the residual's
# sign) is mostly the noise's sign and its optimum is the median of the render's samples, not
# their mean (1.6% darker on the benchmark's face); the squared error's gradient is the residual
# itself. From one stage-2 result of benchmark.py: after stage 3 0.0464 -> 0.0399 (weight 30;
# 100: 0.0374, 300: 0.0362), --detail 0.0456 -> 0.0386 (100: 0.0359), the diffuse map's error
# against the true one 0.0610 -> 0.0617 and 0.0823 -> 0.0824 (100: 0.0643, 0.0835). A heavier
# weight is a weaker hold of the regularizers: at 30 the maps' error hardly moved (on real photos
# they come out a little grainier: README). Stage 2 stays L1: squared, its geometry was worse
# (x10: 4.07 mm; x5: 3.46 mm against 2.94-2.95 from the same start).
STAGE3_SQUARED_ERROR_WEIGHT = 30.0
# Without an albedo model (ICT-FaceKit) the stage-2 maps are one skin colour and one specular
# level. Held to that colour, the diffuse map stayed flat and the specular map took the face's
# detail (a rough specular lobe under smooth light mimics albedo). So for such models the
# diffuse consistency weight is scaled by diffuse_consistency_scale and the specular map moves
# specular_rate_scale as fast (on 32bit.png: stage-3 error 0.057 -> 0.047, detail in the diffuse
# map). With AlbedoMM the stage-2 maps are a real prior and NextFace's weights stay as they are
# (the slower specular map alone made the BFM-sized benchmark worse: 0.090 -> 0.102).
WITHOUT_ALBEDO_MODEL = dict(diffuse_consistency_scale=0.01, specular_rate_scale=0.1)


# Without an albedo model, stage 3 starts its diffuse map from the photos (``delit_diffuse``):
# Adam moves a texel at most STAGE3_RATES['diffuse'] a step, about 0.4 over stage 3's steps,
# so from stage 2's one skin colour dark brows, a beard or a nostril's rim stopped half way, and
# dark red (skin's red channel has the furthest to go). With an albedo model the consistency
# prior holds the map near the statistical albedo; there the same start lowered benchmark.py's
# photometric error after stage 3 (from one stage-2 result: 0.054 -> 0.043; with --detail
# 0.049 -> 0.040) by painting the fitted geometry's shading errors into the map (its error
# against the true map 0.044 -> 0.084; 0.065 -> 0.088): not used there.
# DELIT_SPP: samples of the shading renders. DELIT_PRIOR: the stage-2 map's weight in each
# texel's least squares, relative to the face's typical shading² (the median over its pixels):
# where the photos see a texel little or only in shadow, a small error of the fitted light there
# would make a large one of the map, which stays nearer the stage-2 map instead.
# DELIT_MAX_GAIN: no texel comes out brighter than this times the stage-2 map (per colour):
# brighter still were, on ../shared/photos, a white collar or background where the fitted face
# overhangs the real one and light the SH model cannot express, not skin (on 32bit.png 95% of
# the texels are under 1.7 / 2.0 / 2.4 times the skin colour in red / green / blue).
DELIT_SPP, DELIT_PRIOR, DELIT_MAX_GAIN = 64, 0.05, 2.0
# Texels that the photos show too little (left out, at grazing angles: their weight under the
# prior's) are not held at the stage-2 map: its difference from the map of the texels around
# them continues into them (``textures.continued_offset``: from the texels nearest around, in
# full where at least half of a Gaussian of σ = DELIT_FILL of the map's width lies on known
# texels). A small left-out patch takes its surroundings' colour: stubble that the face model
# cannot explain is left out, and a spot of it in the middle of the chin (obama3.jpg) stayed the
# one skin colour of ICT-FaceKit's stage 2, a bright patch in the painted stubble. A large one
# (a hand) keeps the stage-2 map away from its border, and so does what no camera shows (the
# exported head's skin beyond the fitted area fades into the stage-2 level: no seam there). On a
# synthetic bearded face, a disc left out in the beard: 1/16 0.043 off the beard's colour, 1/32
# 0.130 (the skin colour 0.297; tests/test_appearance.py).
DELIT_FILL = 1 / 16


def delit_diffuse(pipeline: Pipeline, params: SceneParameters, targets: Targets) -> torch.Tensor:
    """The diffuse map of each identity row whose render best matches its photos under the
    fitted geometry, light and specular map -> [identities, res, res, 3] (linear, in [0, 1];
    ``params`` and ``targets`` on the CPU, where the texels' pixels are looked up).
    Per texel and colour, least squares over the images that see it: photo = D·E + S, with E the
    render of a white diffuse surface and S that of the specular map alone at the texel's pixel,
    weighted (w) as the photo map weighs its pixels (visible, facing the camera, not left out),
    with the stage-2 map D₂ as a prior of weight λ = DELIT_PRIOR · median(E²) over the face:
    D = (Σ w·E·(photo − S) + λ·D₂) / (Σ w·E² + λ), at most DELIT_MAX_GAIN · D₂; where Σ w·E² < λ
    but a camera shows the texel (through a left-out pixel, at a grazing angle), D − D₂ continues
    that of the texels around (DELIT_FILL)."""
    maps = [pipeline.maps(params, k) for k in range(params.identity.shape[0])]
    sums = [[] for _ in maps]  # per identity, per image: (w·E·(photo − S), w·E², E² over the face's pixels)
    with torch.no_grad():
        vertices = pipeline.vertices(params)
        for row, photo in enumerate(targets.photos):
            diffuse, specular, roughness = maps[params.identity_row(row)]
            envmap, focal = pipeline.envmap(params.sh[row:row + 1])[0], float(params.focal[row])
            render = lambda diffuse, specular, seed: pipeline.render_maps(
                row, vertices[row], focal, diffuse, specular, roughness, envmap, DELIT_SPP, seed)
            white, glossy = render(torch.ones_like(diffuse), torch.zeros_like(specular), 1), \
                render(torch.zeros_like(diffuse), specular, 2)[..., :3]
            # a texel's bilinear lookup must not reach the background or a left-out pixel
            usable = scipy.ndimage.binary_erosion(((white[..., 3] > 0.99) & (targets.pixel_weights(row) > 0)).numpy())
            (shading, target), weights, in_view = texel_samples(pipeline, params, row, vertices[row], usable,
                                                                [white[..., :3], photo - glossy])
            sums[params.identity_row(row)].append((weights * shading * target, weights * shading ** 2,
                                                   white[..., :3][torch.from_numpy(usable)] ** 2, in_view))
    delit = []
    for (stage2, _, _), images in zip(maps, sums):
        numerator, denominator = sum(image[0] for image in images), sum(image[1] for image in images)
        prior = DELIT_PRIOR * torch.cat([image[2] for image in images]).median(0).values  # [3]
        stage2 = stage2.detach()
        solved = (numerator + prior * stage2) / (denominator + prior)
        known = (denominator >= prior).all(-1).numpy()  # the photos outweigh the prior: see DELIT_FILL
        offset = textures.continued_offset((solved - stage2).numpy(), known, DELIT_FILL * stage2.shape[0])
        reach = fill_reach(pipeline, np.logical_or.reduce([image[3] for image in images]))
        offset = np.where(known[..., None], offset, reach * offset)
        delit.append(torch.minimum(stage2 + torch.from_numpy(offset), DELIT_MAX_GAIN * stage2).clamp(0, 1))
    return torch.stack(delit)


def fill_reach(pipeline: Pipeline, in_view: np.ndarray) -> np.ndarray:
    """How much of the continued colour each texel takes [res, res, 1] (``delit_diffuse``): none
    where no camera shows it (``in_view`` [res, res] bool: it keeps the stage-2 map), nor within
    textures.SKIN_FEATHER of the fitted area's border, rising to all of it at twice that, so that
    the exported head's skin, which fades into the stage-2 level over that band, shows no seam."""
    ramp = np.clip(textures.feather_depth(pipeline.texels(in_view.shape[0])[1]) - 1, 0, 1)
    return (ramp * in_view)[..., None].astype(np.float32)


def texel_samples(pipeline: Pipeline, params: SceneParameters, row: int, vertices: torch.Tensor, usable: np.ndarray,
                  images: list) -> tuple:
    """Images [h, w, 3] of image row ``row`` looked up (bilinear) at the pixel of each texel of
    the fitted maps -> ([res, res, 3] per image, weights [res, res, 1]: ``textures.photo_weights``
    of the texels seen from the camera whose pixel is ``usable`` [h, w] bool, the texels that
    the camera shows whatever their pixel [res, res] bool)."""
    resolution = pipeline.resolution
    view = pipeline.texel_view(params, row, vertices, resolution)
    pixels = view['pixels'].numpy()
    samples = [torch.from_numpy(textures.sample_image(image.numpy(), pixels.reshape(-1, 2))).reshape(resolution, resolution, 3)
               for image in images]
    facing, visible, inside = view['facing'].numpy(), view['visible'].numpy(), pipeline.texels(resolution)[1]
    weights = textures.photo_weights(facing, visible, textures.at_pixels(usable, pixels), inside)
    in_view = textures.photo_coverage(facing, visible, np.ones_like(inside), inside) > 0
    return samples, torch.from_numpy(weights)[..., None], in_view


def texture_regularizer(texture: torch.Tensor, reference: torch.Tensor, weights: tuple) -> torch.Tensor:
    """Symmetry (mirror in u), consistency (to ``reference``, stage 3's start) and smoothness of
    maps [n, res, res, c] with the (symmetry, consistency, smoothness) ``weights``: each a mean
    squared difference over one map, summed over the n maps."""
    return MapRegularizer.apply(texture, reference, *weights)


class MapRegularizer(torch.autograd.Function):
    """``texture_regularizer``'s value and its gradient, both in closed form and computed together.
    Autograd's backward pass of the same terms (mean squares of flips, row and column slices,
    one identity's map out of the stack) allocated about fifteen zero-filled maps per map and
    step: at 512² texels over 100 MB a stage-3 step, which set stage 3's peak memory."""

    @staticmethod
    def forward(ctx, texture, reference, symmetry: float, consistency: float, smoothness: float):
        # (autograd records nothing in a Function's forward: no temporaries kept for a backward pass)
        mirrored = texture - torch.flip(texture, dims=[2])  # [n, res, res, c]
        changed = texture - reference
        rows = texture[:, 1:] - texture[:, :-1]  # [n, res - 1, res, c]
        columns = texture[:, :, 1:] - texture[:, :, :-1]  # [n, res, res - 1, c]
        # the mean over one map of each term, as weights on a sum over all of them
        per_texel, per_row, per_column = (1 / t[0].numel() for t in (texture, rows, columns))
        squares = lambda t: torch.linalg.vector_norm(t).square()
        value = (symmetry * per_texel * squares(mirrored) + consistency * per_texel * squares(changed)
                 + smoothness * (per_row * squares(rows) + per_column * squares(columns)))
        # mirroring is its own transpose: d/dx |x - Fx|² = 2(x - Fx) - 2F(x - Fx) = 4(x - Fx);
        # a difference d_i = x_(i+1) - x_i pulls x_(i+1) by 2 d_i and x_i by -2 d_i
        gradient = mirrored.mul_(4 * symmetry * per_texel).add_(changed, alpha=2 * consistency * per_texel)
        rows.mul_(2 * smoothness * per_row)
        columns.mul_(2 * smoothness * per_column)
        gradient[:, 1:] += rows
        gradient[:, :-1] -= rows
        gradient[:, :, 1:] += columns
        gradient[:, :, :-1] -= columns
        ctx.save_for_backward(gradient)
        return value

    @staticmethod
    def backward(ctx, upstream):
        gradient, = ctx.saved_tensors
        return upstream * gradient, None, None, None, None


def stage3_rates_and_weights(config: Config, has_albedo_model: bool) -> tuple:
    """Adam groups' rates and the (symmetry, consistency, smoothness) weights of the diffuse,
    specular and roughness maps."""
    rates = dict(STAGE3_RATES)
    diffuse_consistency = config.weightDiffuseConsistencyReg
    if not has_albedo_model:
        rates['specular'] *= WITHOUT_ALBEDO_MODEL['specular_rate_scale']
        diffuse_consistency *= WITHOUT_ALBEDO_MODEL['diffuse_consistency_scale']
    weights = dict(
        diffuse=(config.weightDiffuseSymmetryReg, diffuse_consistency, config.weightDiffuseSmoothnessReg),
        specular=(config.weightSpecularSymmetryReg, config.weightSpecularConsistencyReg,
                  config.weightSpecularSmoothnessReg),
        roughness=(config.weightRoughnessSymmetryReg, config.weightRoughnessConsistencyReg,
                   config.weightRoughnessSmoothnessReg))
    return rates, weights


def fit_stage3(pipeline: Pipeline, params: SceneParameters, targets: Targets, on_step=None) -> tuple:
    """Stage 3: per-texel diffuse, specular and roughness maps (and the light), starting from the
    statistical albedo (without an albedo model, the diffuse map from the photos:
    ``delit_diffuse``), with symmetry, consistency (to that start) and smoothness regularizers, fitted by
    the squared error (STAGE3_SQUARED_ERROR_WEIGHT) to the pixels that ``targets`` does not leave out
    (``leave_out_unexplained``); the geometry stays as stage 2 left it -> (SceneParameters,
    history). ``on_step`` as for ``fit_stage2``."""
    config = pipeline.config
    delit = None if pipeline.model.has_albedo_model else delit_diffuse(pipeline, params.detached().to('cpu'),
                                                                         targets.to('cpu'))  # see DELIT_SPP
    params, targets = params.detached().to(pipeline.device), targets.to(pipeline.device)
    pixel_weights = [targets.pixel_weights(row) for row in range(params.n_images)]
    identities = params.identity.shape[0]
    start = [pipeline.maps(params, k) for k in range(identities)]
    if delit is not None:
        start = [(diffuse.to(pipeline.device), *rest) for diffuse, (_, *rest) in zip(delit, start)]
    params.diffuse_map, params.specular_map, params.roughness_map = (
        torch.stack([maps[j] for maps in start]).detach().clone() for j in range(3))
    fitted = dict(diffuse=params.diffuse_map, specular=params.specular_map, roughness=params.roughness_map)
    references = {name: texture.detach().clone() for name, texture in fitted.items()}
    for tensor in (*fitted.values(), params.sh):
        tensor.requires_grad_(True)
    rates, weights = stage3_rates_and_weights(config, pipeline.model.has_albedo_model)
    groups = [dict(params=[texture], lr=rates[name]) for name, texture in fitted.items()]
    groups.append(dict(params=[params.sh], lr=rates['light']))
    with torch.no_grad():
        vertices = pipeline.vertices(params)  # fixed in stage 3: weightLandmarksLossStep3 has nothing to move

    def loss_terms(iteration: int) -> dict:
        spp = training_samples(stage_samples(config, 3), iteration, config.iterStep3)
        photo = STAGE3_SQUARED_ERROR_WEIGHT * sum(
            photometric_loss(pipeline.render(params, row, spp, 10_000 + iteration, vertices[row]), target,
                             pixel_weights[row], power=2)
            for row, target in enumerate(targets.photos)) / len(targets.photos)
        regularizers = {f'{name}_regularizer': texture_regularizer(texture, references[name], weights[name])
                        for name, texture in fitted.items()}
        return dict(photo=photo, **regularizers)

    history = adam_loop('stage 3', groups, loss_terms, config.iterStep3, config,
                        on_step and (lambda k, terms: on_step(params, k, config.iterStep3, terms)))
    params = params.detached().to('cpu')
    with torch.no_grad():
        params.diffuse_map.clamp_(0, 1)
        params.specular_map.clamp_(0, 1)
        params.roughness_map.clamp_(0.01, 1)
    params.stage = 3
    return params, history
