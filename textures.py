"""UV-space textures: the fitted skin carried beyond the fitted area (for export), and the photo
projected into the model's UV space (``photoMap``; the pixels of the texels, which stage 3's
start and the shared identity's left-out pixels look up too).

Maps are [res, res, c] with row 0 at v = 1, as everywhere in the project; ``inside`` [res, res]
marks the texels that the fitted area's UV triangles cover.
"""
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch

import utils

# The fitted maps fade into the skin level over this fraction of the texture's width at the
# border of the fitted area, so that the head beyond it (one skin level) shows no seam.
SKIN_FEATHER = 0.03
# photoMap: a texel takes the photo fully where its surface faces the camera at least this much
# (cosine), not at all below PHOTO_GRAZING: the photo's pixels stretch at grazing angles.
PHOTO_FACING, PHOTO_GRAZING = 0.45, 0.15
# photoMap: width of the feathered border between photo and fallback, as a fraction of the width.
PHOTO_FEATHER = 0.01


@dataclass
class SkinTextures:
    """The skin of an exported head: textures over the UV map, and the levels they fade into
    beyond the fitted area (the back of the head)."""
    base_colour: np.ndarray     # [res, res, 3] sRGB in [0, 1]: the diffuse map or the photo map
    specular: np.ndarray        # [res, res, 3] linear F0 (the specular map)
    roughness: np.ndarray       # [res, res, 1] GGX α
    diffuse_level: np.ndarray   # [3] linear
    specular_level: np.ndarray  # [3] linear
    roughness_level: float      # GGX α


def skin_textures(diffuse: np.ndarray, specular: np.ndarray, roughness: np.ndarray, inside: np.ndarray,
                  whole_head: bool) -> SkinTextures:
    """The fitted maps (linear diffuse [res, res, 3], specular [res, res, 3], roughness α
    [res, res, 1]) as the skin of an exported head. Where the head goes on beyond the fitted area,
    the maps fade into their skin level at its border."""
    levels = [skin_level(texture, inside) for texture in (diffuse, specular, roughness)]
    if whole_head:
        diffuse, specular, roughness = (extend_skin(texture, inside, level)
                                        for texture, level in zip((diffuse, specular, roughness), levels))
    return SkinTextures(base_colour=utils.linear_to_srgb(diffuse),
                        specular=specular, roughness=roughness, diffuse_level=levels[0],
                        specular_level=levels[1], roughness_level=float(levels[2][0]))


def skin_level(texture: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The typical value [c] of a map [res, res, c] over the fitted area: the median, which
    brows, lips and eyes do not move."""
    return np.median(texture[inside], axis=0)


def extend_skin(texture: np.ndarray, inside: np.ndarray, level: np.ndarray) -> np.ndarray:
    """A map [res, res, c] whose fitted area keeps its values, fading over SKIN_FEATHER into
    ``level`` [c] at its border, and whose other texels (the rest of the head) are ``level``."""
    weight = np.clip(feather_depth(inside), 0, 1)[..., None]
    return (weight * texture + (1 - weight) * level).astype(np.float32)


def feather_depth(inside: np.ndarray) -> np.ndarray:
    """Each texel's distance [res, res] into the fitted area ``inside`` [res, res] bool, in
    widths of the band (SKIN_FEATHER of the map) over which the exported skin fades into its
    level: 0 outside, 1 where the fitted map is exported unblended."""
    return scipy.ndimage.distance_transform_edt(inside) / max(SKIN_FEATHER * inside.shape[0], 1.0)


def continued_offset(offset: np.ndarray, known: np.ndarray, length: float) -> np.ndarray:
    """``offset`` [res, res, c], given where ``known`` [res, res] bool, continued into the other
    texels: there the value of the known texels nearest around (``pull_push``), in full where at
    least half of a Gaussian of σ = ``length`` texels around lies on known texels and fading
    with that share below it. So a hole up to about 1.2 lengths in radius takes its
    surroundings' value, and into a larger one the value fades over about two lengths (a third
    of it left at one length from a straight border, 5% at two). Texels that are neighbours in
    UV space are taken as neighbours on the surface (not so across a chart's seam, which the
    short reach keeps harmless)."""
    weight = known.astype(np.float64)
    blur = lambda image: scipy.ndimage.gaussian_filter(image, length, mode='constant')
    share = blur(weight) / blur(np.ones_like(weight))  # of the Gaussian's weight on known texels
    fade = np.clip(2 * share, 0, 1)[..., None]
    return np.where(known[..., None], offset, fade * pull_push(offset, weight)).astype(offset.dtype)


def pull_push(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``values`` [h, w, c] with ``weights`` [h, w] in [0, 1] filled where the weight is under 1
    from the values around, the nearest the most (Gortler et al. 1996, "The Lumigraph"): the
    weighted 2×2 means of a half-size level (its weights the sums, at most 1), filled in turn,
    blended in bilinearly where a texel's own weight falls short -> [h, w, c]."""
    height, width = weights.shape
    if weights.min() >= 1 or max(height, width) <= 1:
        return values
    pad = ((0, height % 2), (0, width % 2))
    weighted = np.pad(values * weights[..., None], pad + ((0, 0),))
    weights_even = np.pad(weights, pad)
    quads = lambda a: a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, *a.shape[2:]).sum((1, 3))
    total = quads(weights_even)
    coarse = pull_push(quads(weighted) / np.maximum(total, 1e-12)[..., None], np.minimum(total, 1.0))
    upsampled = scipy.ndimage.zoom(coarse, (2, 2, 1), order=1, mode='nearest', grid_mode=True)[:height, :width]
    return weights[..., None] * values + (1 - weights[..., None]) * upsampled


def smoothstep(x: np.ndarray, low: float, high: float) -> np.ndarray:
    t = np.clip((x - low) / (high - low), 0, 1)
    return t * t * (3 - 2 * t)


def sample_image(image: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Bilinear lookup of an image [h, w, 3] at pixel positions [k, 2] (x, y; pixel centres at
    +0.5) -> [k, 3], clamped at the border."""
    height, width = image.shape[:2]
    grid = torch.from_numpy(np.stack([pixels[:, 0] / width * 2 - 1, pixels[:, 1] / height * 2 - 1], axis=1))
    values = torch.nn.functional.grid_sample(
        torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float(), grid[None, None].float(),
        mode='bilinear', padding_mode='border', align_corners=False)
    return values[0, :, 0].T.numpy()


def pixel_index(pixels: np.ndarray, shape: tuple) -> tuple:
    """The pixel (column, row) that each of ``pixels`` [..., 2] (x, y; pixel centres at +0.5)
    falls in -> (index int64 [..., 2], whether it lies in an image of ``shape`` (h, w) [...])."""
    index = np.floor(pixels).astype(np.int64)
    return index, (index >= 0).all(-1) & (index[..., 0] < shape[1]) & (index[..., 1] < shape[0])


def at_pixels(mask: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """The value of ``mask`` [h, w] bool at each of ``pixels`` [..., 2] (x, y; pixel centres at
    +0.5) -> bool [...]; False outside the mask."""
    index, inside = pixel_index(pixels, mask.shape)
    found = np.zeros(pixels.shape[:-1], bool)
    found[inside] = mask[index[inside][:, 1], index[inside][:, 0]]
    return found


def pixels_of(texels: np.ndarray, pixels: np.ndarray, shape: tuple) -> np.ndarray:
    """The pixels that the marked ``texels`` [res, res] bool fall in, given each texel's pixel
    ``pixels`` [res, res, 2] (x, y) -> [h, w] bool of ``shape`` (h, w): ``at_pixels``' inverse."""
    index, inside = pixel_index(pixels[texels], shape)
    found = np.zeros(shape, bool)
    found[index[inside][:, 1], index[inside][:, 0]] = True
    return found


def photo_coverage(facing: np.ndarray, visible: np.ndarray, in_photo: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """How fully the photo shows each texel [res, res], in [0, 1], before ``photo_weights``
    feathers it: visible from the camera (ray traced), inside the photo, inside the UV map, and
    facing the camera (0 up to PHOTO_GRAZING, 1 from PHOTO_FACING)."""
    return (visible & in_photo & inside) * smoothstep(facing, PHOTO_GRAZING, PHOTO_FACING)


def photo_weights(facing: np.ndarray, visible: np.ndarray, in_photo: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """How much each texel [res, res] takes from the photo, in [0, 1]: its ``photo_coverage``
    with a border feathered over PHOTO_FEATHER that never reaches into hidden texels."""
    weight = photo_coverage(facing, visible, in_photo, inside)
    sigma = max(PHOTO_FEATHER * inside.shape[0], 0.5)
    return np.minimum(weight, scipy.ndimage.gaussian_filter(weight, sigma)).astype(np.float32)


def photo_map(photo_colours: np.ndarray, weights: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """The photo in UV space [res, res, 3]: each texel's photo colour ``photo_colours`` [res, res, 3]
    by its weight [res, res]; a hidden texel takes its mirror texel's photo colour (mirrored in u,
    as the fit's symmetry regularizer) where that one is visible, else ``fallback`` [res, res, 3]
    (the fitted diffuse colour), all in the same colour encoding."""
    mirrored_colours, mirrored_weights = photo_colours[:, ::-1], weights[:, ::-1, None]
    hidden_side = mirrored_weights * mirrored_colours + (1 - mirrored_weights) * fallback
    weights = weights[..., None]
    return (weights * photo_colours + (1 - weights) * hidden_side).astype(np.float32)


def bake_photo(photo: np.ndarray, photo_scale: float, photo_offset: np.ndarray, view: dict, inside: np.ndarray,
               fallback: np.ndarray) -> tuple:
    """The photo [h, w, 3] (sRGB, the input as loaded) projected into UV space -> (photoMap
    [res, res, 3] sRGB, photo weight per texel [res, res]). ``view`` is ``Pipeline.texel_view``'s
    (pixels of the fitted image); photo pixel = offset + fitted pixel / photo_scale."""
    pixels = photo_offset + view['pixels'].numpy().reshape(-1, 2) / photo_scale
    height, width = photo.shape[:2]
    in_photo = ((pixels >= 0) & (pixels < [width, height])).all(1).reshape(inside.shape)
    colours = sample_image(photo, pixels).reshape(*inside.shape, 3)
    weights = photo_weights(view['facing'].numpy(), view['visible'].numpy(), in_photo, inside)
    return photo_map(colours, weights, fallback), weights
