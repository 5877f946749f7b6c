"""Input photos: listing, reading any kind of image file, finding the face, cropping it to the
fitted image (``FitImage``)."""
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

import landmarks as landmarks_module
import utils
from config import Config

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
MIN_IMAGE_SIZE = 64
# Longer side of an input image as loaded: larger photos are reduced (the fit uses maxResolution).
MAX_INPUT_SIDE = 2048
# PIL refuses images above this many pixels as a "decompression bomb"; faces need far fewer.
MAX_IMAGE_PIXELS = 400_000_000
# The fitted image is a square around the face, this many times the landmarks' extent: the face
# then fills the pixels that maxResolution allows, whatever the framing of the photo.
CROP_MARGIN = 1.8


class InputError(ValueError):
    """An input that cannot be used; the message names the file and what to do."""


@dataclass
class FitImage:
    """An input photo as fitted."""
    index: int             # i of the output files (position in the sorted input list)
    path: str
    pixels: np.ndarray     # [h, w, 3] sRGB in [0, 1], scaled to maxResolution
    scale: float           # fitted size / input size
    landmarks: np.ndarray  # [68, 2] pixels of the fitted image, NaN where not found
    crop: tuple = (0, 0)   # input pixel of the fitted image's top-left corner

    @property
    def size(self) -> tuple:
        """(width, height) of the fitted image."""
        return self.pixels.shape[1], self.pixels.shape[0]

    def linear_pixels(self) -> np.ndarray:
        """[h, w, 3] in linear colour, as the renderer makes them."""
        return utils.srgb_to_linear(self.pixels)


def list_inputs(path: str) -> tuple:
    """``path`` (an image or a folder) -> (image paths, [(skipped entry, why)]): files that are no
    image by their name, and entries named like images that are no readable file (a folder, a
    broken link). Hidden files and plain folders are passed over."""
    if os.path.isfile(path):
        return [path], []
    if not os.path.isdir(path):
        raise InputError(f"input '{path}' does not exist: give an image file or a folder of images")
    images, skipped = [], []
    for name in sorted(os.listdir(path)):
        entry = os.path.join(path, name)
        is_image_name = name.lower().endswith(IMAGE_EXTENSIONS)
        if name.startswith('.'):
            continue
        if os.path.isfile(entry):
            if is_image_name:
                images.append(entry)
            else:
                skipped.append((entry, f'not an image ({", ".join(IMAGE_EXTENSIONS)})'))
        elif os.path.islink(entry) and not os.path.exists(entry):
            skipped.append((entry, 'a broken link'))
        elif is_image_name:
            skipped.append((entry, 'a folder, not an image file' if os.path.isdir(entry) else 'not a regular file'))
    if not images:
        raise InputError(f"input folder '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                         f"point --input at a folder of photos")
    return images, skipped


def load_image(path: str, max_side: int = MAX_INPUT_SIDE) -> tuple:
    """An image file -> (sRGB float array [h, w, 3] in [0, 1], upright (EXIF orientation
    applied), reduction, the file's own (width, height) upright): input pixel = loaded pixel ·
    reduction.

    Grayscale is repeated to RGB, alpha is composited over black, 16-bit is scaled to [0, 1].
    Images with a side over ``max_side`` are reduced by an integer factor while still 8/16-bit,
    so that an 8000 px photo never exists as floats (576 MB) in memory."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file (or an unsupported format): give a JPEG or PNG") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f'{path}: cannot be read, the file may be truncated or corrupt ({error})') from None
    size = image.size
    reduction = -(-max(size) // max_side)  # ceil
    if reduction > 1:
        image = image.reduce(reduction)
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        pixels = np.asarray(image, np.float64)
        pixels = np.repeat((pixels / (65535.0 if pixels.max() > 255 else 255.0))[..., None], 3, axis=2)
    elif image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = np.asarray(image.convert('RGBA'), np.float32) / 255.0
        pixels = rgba[..., :3] * rgba[..., 3:]
    else:
        pixels = np.asarray(image.convert('RGB'), np.float32) / 255.0
    return pixels.astype(np.float32), reduction, size


def resize_image(image: np.ndarray, max_resolution: int) -> tuple:
    """Scale [h, w, 3] so that its longer side is at most ``max_resolution``; -> (image, scale)."""
    height, width = image.shape[:2]
    scale = min(1.0, max_resolution / max(height, width))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    planes = [np.asarray(Image.fromarray(image[..., c]).resize(size, Image.LANCZOS)) for c in range(3)]
    return np.clip(np.stack(planes, axis=2), 0, 1).astype(np.float32), size[0] / width


def face_square(points: np.ndarray) -> tuple:
    """Landmarks [68, 2] (px) -> (x0, y0, side): the square of CROP_MARGIN times the landmarks'
    extent (rounded up to whole pixels) around their box's centre, wherever the image ends."""
    finite = points[np.isfinite(points).all(1)]
    centre = (finite.min(0) + finite.max(0)) / 2
    side = int(np.ceil(CROP_MARGIN * (finite.max(0) - finite.min(0)).max()))
    # one side for both axes: rounding each corner on its own made a side a pixel longer (167x168)
    x0, y0 = np.round(centre - side / 2).astype(int)
    return int(x0), int(y0), side


def face_crop(points: np.ndarray, width: int, height: int) -> tuple:
    """Landmarks [68, 2] (input px) -> crop box (x0, y0, x1, y1) inside the image: the
    ``face_square``, cut where it crosses the image's border."""
    x0, y0, side = face_square(points)
    return max(x0, 0), max(y0, 0), min(x0 + side, width), min(y0 + side, height)


# Landmarks that span fewer pixels than this outline no face that can be fitted.
MIN_LANDMARK_SPAN = 8
MIN_LANDMARKS_INSIDE = 20


def check_landmarks(path: str, points: np.ndarray, width: int, height: int) -> None:
    """Refuse landmarks [68, 2] (pixels of the image as loaded) that cannot place a face: too
    few inside the image, or all (nearly) at one point."""
    inside = np.isfinite(points).all(1) & ((points >= 0) & (points < [width, height])).all(1)
    if inside.sum() < MIN_LANDMARKS_INSIDE:
        raise InputError(f'{path}: only {inside.sum()} of 68 landmarks lie inside the image; the face is too cut '
                         f'by the border to fit (or the landmarks belong to another image)')
    span = float((points[inside].max(0) - points[inside].min(0)).max())
    if span < MIN_LANDMARK_SPAN:
        raise InputError(f'{path}: the landmarks span only {span:.1f} px: they outline no face; give the 68 '
                         f'points of the face in this photo')


def prepare_image(index: int, path: str, config: Config, detector, landmarks_path: str) -> FitImage:
    """Read, find the face in and crop one photo (landmarks from ``detector`` or the file(s) at
    ``landmarks_path``); raise InputError with a clear message."""
    pixels, reduction, (width, height) = load_image(path)  # input pixel = loaded pixel · reduction
    if min(pixels.shape[:2]) < MIN_IMAGE_SIZE:
        reduced = f', {reduction}x smaller as loaded: {pixels.shape[1]}x{pixels.shape[0]}' if reduction > 1 else ''
        raise InputError(f'{path}: the image is {width}x{height} px{reduced}, too small to fit a face '
                         f'(at least {MIN_IMAGE_SIZE} px per side): use a larger photo')
    if landmarks_path:
        try:
            points = landmarks_module.read_landmark_file(
                landmarks_module.landmark_file_for(landmarks_path, path)) / reduction
        except landmarks_module.LandmarkError as error:
            raise InputError(str(error)) from None
        note = 'landmarks from file' + (f' (--face {config.face} does not apply to them)' if config.face else '')
    else:
        faces = detector.detect_all((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
        if not faces:
            raise InputError(f'{path}: no face found; use a photo with a visible face, or give its 68 '
                             f'landmarks with --landmarks')
        points, note = landmarks_module.choose_face(faces, config.face)
        if points is None:
            raise InputError(f'{path}: {note} (--face {config.face}); leave --face out to fit the largest')
    if reduction > 1:
        note += f'; the photo is {width}x{height} px, reduced {reduction}x on loading (longer side over {MAX_INPUT_SIDE} px)'
    return fit_image(index, path, pixels, reduction, points, config, note)


def fit_image(index: int, source: str, pixels: np.ndarray, reduction: int, points: np.ndarray, config: Config,
              note: str) -> FitImage:
    """The fitted image of a picture [h, w, 3] (sRGB in [0, 1]; input pixel = its pixel ·
    ``reduction``) with its landmarks [68, 2] (its pixels): the square around the face, scaled to
    maxResolution; says what it made of ``source``, with ``note``."""
    check_landmarks(source, points, pixels.shape[1], pixels.shape[0])
    x0, y0, x1, y1 = face_crop(points, pixels.shape[1], pixels.shape[0])
    fitted, scale = resize_image(pixels[y0:y1, x0:x1], config.maxResolution)
    landmarks = (points - [x0, y0]) * scale
    inside = ((landmarks >= 0) & (landmarks < [fitted.shape[1], fitted.shape[0]])).all(axis=1)
    if inside.sum() < MIN_LANDMARKS_INSIDE:
        raise InputError(f'{source}: only {inside.sum()} of 68 landmarks lie inside the image; the face is '
                         f'too cut by the border to fit')
    if not inside.all():
        note += f'; {68 - inside.sum()} landmarks outside the image are ignored'
        landmarks = np.where(inside[:, None], landmarks, np.nan)
    print(f'[{index}] {source}: {fitted.shape[1]}x{fitted.shape[0]} px (scale {scale / reduction:.3f}), {note}')
    return FitImage(index, source, fitted, scale / reduction, landmarks, (x0 * reduction, y0 * reduction))
