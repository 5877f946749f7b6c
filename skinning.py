"""Rotations and linear blend skinning: the kinematic part of a head model with joints (FLAME's
neck, jaw and eyes), as small pure functions over plain tensors.

A skinned model poses its rest vertices (mean + identity + expression blendshapes) in three
steps, as FLAME defines it (Li et al. 2017, after SMPL):

    rest    = rest + Σ_k (R_k - I)_flat · pose_basis_k          pose-corrective blendshapes
    joints  = joint_mean + identity · joint_shape_basis + expression · joint_expression_basis
    posed_v = Σ_j w_vj · G_j(rest_v)                            G_j: joint j's world transform

``Skinning`` holds the arrays in the canonical frame of ``morphableModel`` (mm, y down, the
face toward -z); the joint rotations stay in the model's own frame (FLAME's: y up, the face
toward +z), so that fitted poses are the numbers the model's own tools take.
"""
import dataclasses
from dataclasses import dataclass

import torch


def cross_matrix(vector: torch.Tensor) -> torch.Tensor:
    """[v]×, the matrix of the cross product with ``vector``: [..., 3] -> [..., 3, 3]."""
    x, y, z = vector.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*vector.shape[:-1], 3, 3)


def rodrigues_terms(axis_angle: torch.Tensor) -> tuple:
    """Of axis-angle [..., 3]: θ² and θ [..., 1, 1], and Rodrigues' a = sin θ / θ and
    b = (1 − cos θ) / θ², by their Taylor series near zero (θ² < 1e-8), which keep the gradient finite."""
    theta2 = (axis_angle ** 2).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    theta = torch.sqrt(theta2 + 1e-16)
    small = theta2 < 1e-8
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-16))
    return theta2, theta, a, b


def rotation_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, [..., 3] axis-angle (radians) -> [..., 3, 3]: I + a K + b K², K = [ω]×;
    smooth through zero."""
    _, _, a, b = rodrigues_terms(axis_angle)
    skew = cross_matrix(axis_angle)
    identity = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand_as(skew)
    return identity + a * skew + b * (skew @ skew)


def rotation_matrix_derivative(axis_angle: torch.Tensor) -> torch.Tensor:
    """d ``rotation_matrix`` / d axis-angle, [..., 3] -> [..., 3, 3, 3] (dR_ab / dω_j at [..., a, b, j]).
    With R = I + a K + b K² (``rodrigues_terms``), dR/dω_j = a K_j + b (K_j K + K K_j) +
    ω_j (c K + d K²), c = a'/θ, d = b'/θ. c and d are differences of nearly equal terms: below
    θ² = 1e-4 their series (to θ⁴) are the more exact, and near zero those of the Taylor series
    that ``rotation_matrix`` takes."""
    theta2, theta, a, b = rodrigues_terms(axis_angle)
    series = theta2 < 1e-4
    sin, cos = torch.sin(theta), torch.cos(theta)
    c = torch.where(series, -1 / 3 + theta2 / 30 - theta2 ** 2 / 840,
                    (theta * cos - sin) / (theta2 * theta).clamp_min(1e-24))
    d = torch.where(series, -1 / 12 + theta2 / 180 - theta2 ** 2 / 6720,
                    (theta * sin - 2 * (1 - cos)) / (theta2 * theta2).clamp_min(1e-32))
    K = cross_matrix(axis_angle)
    axes = cross_matrix(torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device))  # [e_j]× [3, 3, 3]
    derivative = []
    for j in range(3):
        K_j = axes[j].expand_as(K)
        derivative.append(a * K_j + b * (K_j @ K + K @ K_j) + axis_angle[..., j, None, None] * (c * K + d * (K @ K)))
    return torch.stack(derivative, -1)


def pose_features(rotations: torch.Tensor) -> torch.Tensor:
    """Joint rotations [n, joints, 3, 3] -> the pose-corrective features [n, (joints - 1)·9]:
    R - I of every joint but the root, row by row."""
    eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
    return (rotations[:, 1:] - eye).flatten(1)


def joint_transforms(rotations: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """Local joint rotations [n, joints, 3, 3] about the rest joints [n, joints, 3], a kinematic
    tree (``parents`` [joints], -1 for the root, parents before children) -> each joint's
    transform of rest points [n, joints, 3, 4]: x -> A x + b, with A its world rotation and b
    its posed position minus A · its rest position."""
    world_rotation, world_position = [rotations[:, 0]], [joints[:, 0]]
    for joint in range(1, joints.shape[1]):
        parent = int(parents[joint])
        offset = joints[:, joint] - joints[:, parent]
        world_position.append(world_position[parent] + (world_rotation[parent] @ offset[..., None])[..., 0])
        world_rotation.append(world_rotation[parent] @ rotations[:, joint])
    rotation, position = torch.stack(world_rotation, 1), torch.stack(world_position, 1)
    shift = position - (rotation @ joints[..., None])[..., 0]
    return torch.cat([rotation, shift[..., None]], dim=-1)


def blend_skinning(points: torch.Tensor, transforms: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Rest points [n, verts, 3], joint transforms [n, joints, 3, 4], skinning weights [verts,
    joints] -> posed points [n, verts, 3]: each point moved by its weighted sum of transforms."""
    blended = torch.einsum('vj,njrc->nvrc', weights.to(points.dtype), transforms)  # [n, verts, 3, 4]
    return (blended[..., :3] @ points[..., None])[..., 0] + blended[..., 3]


@dataclass
class Skinning:
    """The joints of a skinned model in the canonical frame (see the module docstring)."""
    parents: torch.Tensor                 # [joints] int64, -1 for the root
    joint_mean: torch.Tensor              # [joints, 3] mm, rest joints of the mean shape
    joint_shape_basis: torch.Tensor       # [n_shape, joints, 3] joints moved by each identity coefficient
    joint_expression_basis: torch.Tensor  # [n_expr, joints, 3]
    pose_basis: torch.Tensor              # [(joints - 1)·9, verts, 3] mm per unit of a pose feature
    weights: torch.Tensor                 # [verts, joints] skinning weights, rows summing to 1
    posed_joints: torch.Tensor            # [k] int64: the joints whose rotations the fit estimates
    frame: torch.Tensor                   # [3] the model frame -> canonical frame axis signs
    origin: torch.Tensor                  # [3] mm, the model-frame point at the canonical origin
    pose_sigma: torch.Tensor              # [] radians per unit of a pose coefficient (its prior's σ)

    @property
    def n_pose(self) -> int:
        """Pose parameters that follow the expression blendshape coefficients: 3 per posed joint."""
        return 3 * len(self.posed_joints)

    def axis_angles(self, pose: torch.Tensor) -> torch.Tensor:
        """Pose coefficients [n, k·3] (units of ``pose_sigma``, like every coefficient of the fit
        in units of its prior's σ) -> the posed joints' axis-angles [n, k, 3] (radians, model frame)."""
        return pose.reshape(len(pose), -1, 3) * self.pose_sigma

    def joint_rotations(self, pose: torch.Tensor) -> torch.Tensor:
        """Pose coefficients of the posed joints [n, k·3] -> rotations of every joint
        [n, joints, 3, 3] (the others at rest), in the model frame."""
        angles = self.axis_angles(pose)
        posed = {int(joint): angles[:, k] for k, joint in enumerate(self.posed_joints)}
        rest = pose.new_zeros(pose.shape[0], 3)  # built without writing in place: jacfwd runs through it
        return rotation_matrix(torch.stack([posed.get(joint, rest) for joint in range(len(self.parents))], 1))

    def pose(self, rest: torch.Tensor, identity: torch.Tensor, expression: torch.Tensor,
             pose: torch.Tensor) -> torch.Tensor:
        """Rest vertices [n, verts, 3] of identity [n, n_shape] and expression [n, n_expr]
        coefficients, posed by ``pose`` [n, k·3] -> vertices [n, verts, 3] (canonical frame)."""
        rotations = self.joint_rotations(pose)
        corrected = rest + torch.einsum('nf,fvc->nvc', pose_features(rotations), self.pose_basis.to(rest.dtype))
        joints = self.joints(identity, expression)
        flip = self.frame.to(rest.dtype)
        canonical_rotations = rotations * flip[:, None] * flip[None, :]  # F R F, F = diag(frame)
        return blend_skinning(corrected, joint_transforms(canonical_rotations, joints, self.parents), self.weights)

    def at_vertices(self, index: torch.Tensor) -> 'Skinning':
        """The same joints driving only the vertices ``index`` [k]."""
        return dataclasses.replace(self, pose_basis=self.pose_basis[:, index], weights=self.weights[index])

    def joints(self, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """Rest joints [n, joints, 3] (canonical frame) of identity [n, n_shape] and blendshape
        expression [n, n_expr] coefficients."""
        return (self.joint_mean + torch.einsum('nk,kjc->njc', identity, self.joint_shape_basis)
                + torch.einsum('nk,kjc->njc', expression, self.joint_expression_basis))

    def model_frame_pose(self, rotation: torch.Tensor, translation: torch.Tensor, identity: torch.Tensor,
                         expression: torch.Tensor) -> tuple:
        """The camera pose of the fit (X_cam = R X + t: axis-angle [n, 3], t [n, 3] mm, canonical
        X) as the model's own root pose: the model posed with root rotation ``root`` about its
        root joint and then moved by ``shift`` lands in the camera frame turned into the model's
        axes (X_model_cam = F X_cam, F = diag(frame)). -> (root axis-angle [n, 3], shift [n, 3] mm).

        The model's vertices x (model frame) are X = F (x - origin) canonically, so X_model_cam =
        F R F (x - origin) + F t; the model's root turn gives R0 (x - J0) + J0 + shift with
        R0 = F R F: hence shift = F t - R0 origin + R0 J0 - J0."""
        flip = self.frame.to(rotation.dtype)
        root = rotation * flip  # F is a half turn: F R(ω) F = R(F ω)
        turn = rotation_matrix(root)
        root_joint = self.joints(identity, expression)[:, 0] * flip + self.origin  # model frame [n, 3]
        apply = lambda points: (turn @ points[..., None])[..., 0]
        return root, translation * flip - apply(self.origin.expand_as(root_joint)) + apply(root_joint) - root_joint
