"""Real spherical harmonics light: basis and lat-long environment maps.

Directions are in the camera frame (x right, y down, z forward). The SH polar axis is "up"
(-y). Environment maps are lat-long images [rows, 2·rows, 3] with row 0 looking up, laid out
as Mitsuba's ``envmap`` reads them once turned by ``ENVMAP_TO_WORLD``.
"""
import math

import numpy as np
import torch

# Mitsuba's envmap has its pole on local +y; this turn puts it on the camera frame's up (-y).
ENVMAP_TO_WORLD = np.diag([1.0, -1.0, -1.0, 1.0])


def sh_basis(directions: torch.Tensor, bands: int) -> torch.Tensor:
    """Real, orthonormal SH up to degree ``bands - 1``: unit directions [..., 3] -> [..., bands²].

    Index l² + l + m holds Y_lm, m in [-l, l]; Y_l,m>0 ∝ cos(mφ), Y_l,m<0 ∝ sin(|m|φ)."""
    x, y, z = directions.unbind(-1)
    cos_theta = -y  # polar axis: up
    sin_theta = torch.sqrt((1 - cos_theta ** 2).clamp_min(0))
    phi = torch.atan2(z, x)
    # associated Legendre P_l^m(cos θ), by the standard stable recurrences
    legendre = {}
    for m in range(bands):
        legendre[(m, m)] = ((-1) ** m) * _double_factorial(2 * m - 1) * sin_theta ** m
        if m + 1 < bands:
            legendre[(m + 1, m)] = (2 * m + 1) * cos_theta * legendre[(m, m)]
        for l in range(m + 2, bands):
            legendre[(l, m)] = ((2 * l - 1) * cos_theta * legendre[(l - 1, m)]
                                - (l + m - 1) * legendre[(l - 2, m)]) / (l - m)
    columns = []
    for l in range(bands):
        for m in range(-l, l + 1):
            k = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - abs(m)) / math.factorial(l + abs(m)))
            p = legendre[(l, abs(m))]
            if m == 0:
                columns.append(k * p)
            elif m > 0:
                columns.append(math.sqrt(2) * k * torch.cos(m * phi) * p)
            else:
                columns.append(math.sqrt(2) * k * torch.sin(-m * phi) * p)
    return torch.stack(columns, dim=-1)


def _double_factorial(n: int) -> int:
    return 1 if n <= 0 else n * _double_factorial(n - 2)


def envmap_directions(rows: int) -> torch.Tensor:
    """Camera-frame unit directions of the pixel centres of a lat-long map [rows, 2·rows, 3].

    Mitsuba's envmap reads pixel (u, v) from local direction (sin θ sin φ, cos θ, -sin θ cos φ)
    with u = φ / 2π, v = θ / π; ``ENVMAP_TO_WORLD`` turns that local frame into the camera's."""
    theta = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows * math.pi
    phi = (torch.arange(2 * rows, dtype=torch.float64) + 0.5) / (2 * rows) * 2 * math.pi
    theta, phi = torch.meshgrid(theta, phi, indexing='ij')
    local = torch.stack([torch.sin(theta) * torch.sin(phi), torch.cos(theta), -torch.sin(theta) * torch.cos(phi)], -1)
    return (local * torch.tensor(np.diag(ENVMAP_TO_WORLD)[:3])).to(torch.float32)


def smoothing_window(bands: int) -> torch.Tensor:
    """Per-coefficient Hann window [bands²] that damps high bands (``smoothSh``) to avoid ringing."""
    window = [0.5 * (1 + math.cos(math.pi * l / bands)) for l in range(bands) for _ in range(2 * l + 1)]
    return torch.tensor(window)


class EnvironmentMap:
    """SH coefficients [n, bands², 3] -> lat-long radiance maps [n, rows, 2·rows, 3], differentiable."""

    def __init__(self, bands: int, rows: int, smooth: bool):
        self.bands, self.rows = bands, rows
        self.basis = sh_basis(envmap_directions(rows), bands)  # [rows, 2·rows, bands²]
        self.window = smoothing_window(bands) if smooth else torch.ones(bands ** 2)  # [bands²]
        self._on_device = {self.basis.device: (self.basis, self.window)}

    def __call__(self, sh: torch.Tensor) -> torch.Tensor:
        """[n, bands², 3] -> [n, rows, 2·rows, 3] on the device of ``sh``."""
        if sh.device not in self._on_device:
            self._on_device[sh.device] = (self.basis.to(sh.device), self.window.to(sh.device))
        basis, window = self._on_device[sh.device]
        return torch.einsum('hwk,nkc->nhwc', basis, sh * window[None, :, None])


def constant_light(bands: int, radiance) -> torch.Tensor:
    """SH coefficients [bands², 3] of a uniform environment of the given RGB radiance."""
    sh = torch.zeros(bands ** 2, 3)
    sh[0] = torch.as_tensor(radiance, dtype=torch.float32) * math.sqrt(4 * math.pi)
    return sh


def turned_about_vertical(envmap: torch.Tensor, degrees: float) -> torch.Tensor:
    """A lat-long map [rows, 2·rows, 3] with its light turned about the vertical axis by
    ``degrees`` (to the nearest column: its columns are the azimuth about that axis)."""
    return torch.roll(envmap, round(degrees / 360 * envmap.shape[1]), dims=1)
