"""Scene parameters shared by all stages, and the path parameters -> camera-space vertices -> pixels.

Camera conventions (fixed for every output): camera coordinates x right, y down, z forward, mm;
a point (x, y, z) projects to pixel (f·x/z + w/2, f·y/z + h/2) of the fitted image, f in pixels.
Pose maps the canonical model (see ``morphableModel``) to the camera: X_cam = R(rotation) X + t.
"""
import json
from dataclasses import dataclass, fields

import numpy as np
import torch


def rotation_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, [n, 3] axis-angle (radians) -> [n, 3, 3]; smooth through zero."""
    theta2 = (axis_angle ** 2).sum(-1, keepdim=True)[..., None]  # [n, 1, 1]
    theta = torch.sqrt(theta2 + 1e-16)
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(-1, 3, 3)
    small = theta2 < 1e-8  # Taylor series near zero keeps the gradient finite
    sin_term = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    cos_term = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-16))
    identity = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand_as(skew)
    return identity + sin_term * skew + cos_term * (skew @ skew)


def axis_angle_from_matrix(matrix: np.ndarray) -> np.ndarray:
    """[3, 3] rotation -> [3] axis-angle."""
    from scipy.spatial.transform import Rotation
    return Rotation.from_matrix(matrix).as_rotvec()


def to_camera(points: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Canonical points [n, k, 3], axis-angle [n, 3], translation [n, 3] -> camera points [n, k, 3]."""
    return points @ rotation_matrix(rotation).transpose(1, 2) + translation[:, None, :]


def project(points: torch.Tensor, focal: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Camera points [n, k, 3], focal [n] (px), image centres (w/2, h/2) [n, 2] -> pixels [n, k, 2]."""
    z = points[..., 2].clamp_min(1e-3)
    return focal[:, None, None] * points[..., :2] / z[..., None] + centre[:, None, :]


@dataclass
class SceneParameters:
    """Everything a fit estimates. ``n`` images; identity tensors have 1 row with a shared identity."""
    shape: torch.Tensor        # [n_id, n_shape] identity coefficients, prior N(0, 1)
    expression: torch.Tensor   # [n, n_expr], prior N(0, 1)
    rotation: torch.Tensor     # [n, 3] axis-angle, radians
    translation: torch.Tensor  # [n, 3] mm
    focal: torch.Tensor        # [n] pixels
    albedo: torch.Tensor       # [n_id, n_albedo] statistical albedo coefficients, prior N(0, 1)
    sh: torch.Tensor           # [n, bands², 3] spherical-harmonics light, linear RGB
    diffuse_map: torch.Tensor = None    # [n_id, res, res, 3] per-texel diffuse albedo (stage 3)
    specular_map: torch.Tensor = None   # [n_id, res, res, 3]
    roughness_map: torch.Tensor = None  # [n_id, res, res, 1]
    stage: int = 0                      # the last stage that finished

    def identity_index(self, image: int) -> int:
        """Row of the identity tensors that belongs to ``image``."""
        return 0 if self.shape.shape[0] == 1 else image

    def tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def detached(self) -> 'SceneParameters':
        """A copy that shares no autograd graph with this one."""
        return SceneParameters(**{**{f.name: getattr(self, f.name) for f in fields(self)},
                                  **{k: v.detach().clone() for k, v in self.tensors().items()}})

    def save(self, path: str) -> None:
        """All tensors to a ``.pt`` checkpoint (atomically)."""
        import utils
        with utils.atomic_path(path) as temporary:
            torch.save({**self.tensors(), 'stage': self.stage}, temporary)

    @staticmethod
    def load(path: str) -> 'SceneParameters':
        data = torch.load(path, map_location='cpu', weights_only=True)
        return SceneParameters(**data)


def model_vertices(model, params: SceneParameters) -> torch.Tensor:
    """Camera-space vertices [n, verts, 3] of every image."""
    n = params.expression.shape[0]
    shape = params.shape.expand(n, -1) if params.shape.shape[0] == 1 else params.shape
    canonical = model.vertices(shape, params.expression)
    return to_camera(canonical, params.rotation, params.translation)


def params_json(params: SceneParameters, image: int, width: int, height: int, scale: float, crop: tuple,
                source: str, model_name: str) -> str:
    """``params{i}.json``: focal, fitted image size, its scale and crop from the input, pose and all
    coefficients of one image. Input pixel = crop + fitted pixel / scale."""
    identity = params.identity_index(image)
    as_list = lambda t: t.detach().cpu().numpy().astype(float).round(7).tolist()
    record = dict(
        source=source, model=model_name, stage=params.stage,
        width=width, height=height, scale=scale, crop=[int(c) for c in crop], focal=float(params.focal[image]),
        rotation=as_list(params.rotation[image]),
        rotation_matrix=as_list(rotation_matrix(params.rotation[image:image + 1])[0]),
        translation=as_list(params.translation[image]),
        shape=as_list(params.shape[identity]), expression=as_list(params.expression[image]),
        albedo=as_list(params.albedo[identity]), sh=as_list(params.sh[image]),
        conventions='camera x right, y down, z forward, mm; pixel = (f*x/z + w/2, f*y/z + h/2); '
                    'X_cam = R X_model + t, R from the axis-angle rotation; coefficients are in '
                    'units of their standard deviation')
    return json.dumps(record, indent=1)
