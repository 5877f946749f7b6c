"""68 iBUG-order 2D face landmarks: MediaPipe face mesh (default), FAN, or a text file.

All detectors return landmarks [68, 2] as (x, y) pixel coordinates of the image they were given.
"""
import contextlib
import ctypes
import os
import sys

import numpy as np
from PIL import Image


class LandmarkError(RuntimeError):
    """No usable landmarks for an image; the message names the image and what to do."""


# MediaPipe's face mesh has 468 points and none lies where the iBUG-68 annotation puts its
# points: the nearest ones sit 3-5 px off at a 128 px face (along the jaw, the brows wider, the
# nostril base higher): from those, stage 1 on 40 ICT-FaceKit faces of known shape ended 6.2 mm
# from the truth, from the faces' true points 2.0 mm. Each iBUG point is therefore a convex blend
# of a few MediaPipe points (3.1 mm there), fitted on renders of ICT-FaceKit faces (whose landmark
# vertices follow iBUG) and printed, held-out error included, by ``python benchmark.py
# --calibrate 180``. Rows: jaw contour (0-16), brows (17-26), nose bridge and tip (27-30),
# nostril base (31-35), eyes from the outer corner over the upper lid (36-47), outer lips from
# the right corner (48-59), inner lips (60-67); "right" is the subject's right, on the image's left.
MEDIAPIPE_TO_IBUG = (
    {127: 0.532, 162: 0.468},  # 0
    {93: 0.348, 127: 0.296, 143: 0.054, 234: 0.302},  # 1
    {132: 0.459, 187: 0.05, 213: 0.117, 234: 0.375},  # 2
    {132: 0.452, 147: 0.12, 172: 0.314, 177: 0.114},  # 3
    {136: 0.175, 138: 0.204, 172: 0.621},  # 4
    {136: 0.147, 150: 0.853},  # 5
    {149: 0.724, 176: 0.276},  # 6
    {148: 0.731, 171: 0.069, 176: 0.199},  # 7
    {152: 0.993},  # 8
    {377: 0.756, 396: 0.089, 400: 0.155},  # 9
    {378: 0.691, 400: 0.309},  # 10
    {365: 0.131, 379: 0.869},  # 11
    {365: 0.225, 367: 0.372, 397: 0.403},  # 12
    {288: 0.256, 401: 0.306, 435: 0.435},  # 13
    {361: 0.406, 401: 0.262, 447: 0.332},  # 14
    {323: 0.193, 356: 0.499, 366: 0.308},  # 15
    {356: 0.514, 389: 0.486},  # 16
    {21: 0.072, 46: 0.203, 63: 0.07, 70: 0.656},  # 17
    {63: 0.683, 105: 0.313},  # 18
    {66: 0.357, 69: 0.046, 105: 0.597},  # 19
    {66: 0.577, 107: 0.358, 108: 0.065},  # 20
    {8: 0.062, 9: 0.177, 107: 0.76},  # 21
    {8: 0.047, 9: 0.212, 336: 0.741},  # 22
    {296: 0.568, 336: 0.348, 337: 0.084},  # 23
    {296: 0.332, 299: 0.074, 334: 0.594},  # 24
    {293: 0.667, 333: 0.028, 334: 0.306},  # 25
    {276: 0.016, 293: 0.084, 300: 0.9},  # 26
    {6: 0.516, 8: 0.213, 193: 0.182, 413: 0.089},  # 27
    {6: 0.197, 122: 0.08, 197: 0.723},  # 28
    {3: 0.182, 5: 0.291, 195: 0.478, 248: 0.048},  # 29
    {4: 0.819, 5: 0.046, 220: 0.099, 281: 0.036},  # 30
    {97: 0.128, 98: 0.652, 167: 0.22},  # 31
    {2: 0.211, 60: 0.445, 167: 0.344},  # 32
    {2: 0.543, 97: 0.121, 164: 0.336},  # 33
    {2: 0.369, 290: 0.33, 393: 0.301},  # 34
    {326: 0.256, 327: 0.531, 393: 0.213},  # 35
    {130: 0.398, 160: 0.141, 163: 0.379, 247: 0.083},  # 36
    {27: 0.161, 29: 0.406, 144: 0.433},  # 37
    {28: 0.407, 56: 0.259, 145: 0.334},  # 38
    {26: 0.139, 133: 0.566, 155: 0.296},  # 39
    {145: 0.237, 153: 0.64, 155: 0.118},  # 40
    {24: 0.016, 144: 0.806, 163: 0.178},  # 41
    {256: 0.153, 362: 0.706, 382: 0.141},  # 42
    {257: 0.025, 380: 0.521, 442: 0.454},  # 43
    {257: 0.149, 259: 0.438, 373: 0.413},  # 44
    {359: 0.115, 390: 0.546, 467: 0.338},  # 45
    {373: 0.819, 390: 0.181},  # 46
    {256: 0.069, 374: 0.616, 382: 0.315},  # 47
    {43: 0.184, 61: 0.816},  # 48
    {39: 0.45, 40: 0.55},  # 49
    {0: 0.107, 72: 0.174, 73: 0.253, 82: 0.1, 167: 0.367},  # 50
    {13: 0.05, 37: 0.519, 267: 0.432},  # 51
    {0: 0.059, 267: 0.938},  # 52
    {269: 0.549, 270: 0.425, 415: 0.026},  # 53
    {273: 0.256, 291: 0.696, 409: 0.048},  # 54
    {321: 0.266, 335: 0.27, 405: 0.464},  # 55
    {314: 0.71, 405: 0.128, 406: 0.162},  # 56
    {17: 0.686, 18: 0.013, 84: 0.198, 313: 0.103},  # 57
    {84: 0.555, 181: 0.252, 182: 0.193},  # 58
    {91: 0.365, 106: 0.295, 181: 0.34},  # 59
    {61: 0.2, 78: 0.538, 146: 0.262},  # 60
    {80: 0.509, 82: 0.413, 179: 0.078},  # 61
    {82: 0.42, 86: 0.114, 312: 0.466},  # 62
    {310: 0.473, 312: 0.422, 316: 0.105},  # 63
    {291: 0.027, 308: 0.496, 375: 0.477},  # 64
    {310: 0.116, 317: 0.288, 402: 0.497, 404: 0.099},  # 65
    {14: 0.308, 15: 0.181, 87: 0.317, 312: 0.194},  # 66
    {88: 0.044, 178: 0.891, 180: 0.065},  # 67
)
MEDIAPIPE_POINTS = 468


def eye_corner_distance(points: np.ndarray) -> np.ndarray:
    """iBUG points [..., 68, 2] -> the distance between the outer eye corners (36, 45) [...]: the
    face's size in the image, the unit in which landmark distances compare across faces."""
    return np.linalg.norm(points[..., 45, :] - points[..., 36, :], axis=-1)


def blend_matrix(blends: tuple, n_points: int) -> np.ndarray:
    """Per iBUG point {detected point: weight} -> [68, n_points]: iBUG = matrix @ detected [n_points, 2].
    Each row is divided by its sum, which the table's rounding to 3 digits leaves near 1."""
    matrix = np.zeros((len(blends), n_points))
    for row, blend in enumerate(blends):
        matrix[row, list(blend)] = list(blend.values())
    return matrix / matrix.sum(1, keepdims=True)


def convex_blends(found: np.ndarray, truth: np.ndarray, neighbours: int = 10) -> tuple:
    """The points a detector found [faces, p, 2] and the true iBUG points [faces, 68, 2] of the
    same faces -> per iBUG point {found point: weight}: the convex blend (weights >= 0, summing to
    1) of its ``neighbours`` nearest found points that matches it best in least squares. Distances
    are in units of each face's outer-eye-corner distance (iBUG 36-45), so that large faces do not
    outweigh small ones. Convex, because a blend that extrapolates amplifies the detector's jitter."""
    import scipy.optimize
    unit = eye_corner_distance(truth)[:, None, None]  # [faces, 1, 1]
    found, truth = found / unit, truth / unit
    blends = []
    for point in range(truth.shape[1]):
        distance = np.linalg.norm(found - truth[:, point:point + 1], axis=2).mean(0)  # [p]
        near = np.sort(distance.argsort()[:neighbours])
        # x and y rows of every face, and a heavily weighted row that asks the weights to sum to 1
        design = np.concatenate([found[:, near, 0], found[:, near, 1], np.full((1, len(near)), 1e3)])
        target = np.concatenate([truth[:, point, 0], truth[:, point, 1], [1e3]])
        weights = scipy.optimize.nnls(design, target)[0]
        blends.append({int(k): float(w) for k, w in zip(near, weights / weights.sum()) if w > 0})
    return tuple(blends)


# The jaw contour is a silhouette, not a fixed point of the face: it moves over the skin as the
# head turns, so it gets a smaller weight in the landmark loss.
LANDMARK_WEIGHTS = np.ones(68, np.float32)
LANDMARK_WEIGHTS[:17] = 0.3

_MEDIAPIPE_BLEND = blend_matrix(MEDIAPIPE_TO_IBUG, MEDIAPIPE_POINTS)  # [68, 468]

# Detection runs on at most this many pixels per side: MediaPipe and FAN work on small crops.
DETECTION_RESOLUTION = 1024


def _downscaled(image_uint8: np.ndarray):
    """[h, w, 3] uint8 -> (image at most DETECTION_RESOLUTION per side, scale applied)."""
    scale = min(1.0, DETECTION_RESOLUTION / max(image_uint8.shape[:2]))
    if scale == 1.0:
        return image_uint8, 1.0
    height, width = image_uint8.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image_uint8).resize(size, Image.BILINEAR)), size[0] / width


def largest(faces: list) -> tuple:
    """[[68, 2], ...] -> (the face with the largest landmark bounding box, its index)."""
    areas = [np.prod(face.max(axis=0) - face.min(axis=0)) for face in faces]
    index = int(np.argmax(areas))
    return faces[index], index


def from_left(faces: list) -> list:
    """[[68, 2], ...] in the order of their landmarks' mean x, left to right."""
    return sorted(faces, key=lambda face: float(face[:, 0].mean()))


def choose_face(faces: list, face: int = 0) -> tuple:
    """Landmarks [68, 2] of every face found -> (the face to fit, what was chosen in words): for
    ``face`` 0 the largest, for K >= 1 the K-th from the left (``from_left``); the face None
    where there are fewer than K (or none)."""
    if face > len(faces) or not faces:
        found = f'{len(faces)} face{"s" if len(faces) != 1 else ""} found'
        return None, found + (f', none {_ordinal(face)} from the left' if face else '')
    if len(faces) == 1:
        return faces[0], 'one face found'
    ordered = from_left(faces)
    if face == 0:
        points, index = largest(ordered)
        return points, (f'{len(faces)} faces found, fitting the largest ({_ordinal(index + 1)} from the left; '
                        f'--face K fits the K-th)')
    return ordered[face - 1], f'{len(faces)} faces found, fitting the {_ordinal(face)} from the left'


def _ordinal(number: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    suffix = 'th' if 10 <= number % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(number % 10, 'th')
    return f'{number}{suffix}'


@contextlib.contextmanager
def native_logs_silenced():
    """MediaPipe's C++ code and TensorFlow Lite write their log lines (``W0000 …
    inference_feedback_manager``, ``Created TensorFlow Lite XNNPACK delegate``) straight to the
    process's stderr, past Python (and partly through the C library's buffer): the command
    prints only its own lines, so that file descriptor points at /dev/null meanwhile. Their
    errors still arrive as Python exceptions."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # the C library buffers some of them: out to /dev/null too
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class Detector:
    """A landmark detector: ``detect_all`` gives every face found; ``detect`` the largest."""

    def detect_all(self, image_uint8: np.ndarray) -> list:
        """[h, w, 3] uint8 RGB -> landmarks [68, 2] of every face found."""
        raise NotImplementedError

    def detect(self, image_uint8: np.ndarray) -> tuple:
        """[h, w, 3] uint8 RGB -> (landmarks [68, 2] of the largest face, number of faces found)."""
        faces = self.detect_all(image_uint8)
        return choose_face(faces)[0], len(faces)


class MediapipeDetector(Detector):
    """MediaPipe's face mesh (legacy ``solutions.face_mesh``, bundled in mediapipe 0.10.21)."""

    def __init__(self, max_faces: int = 5):
        with native_logs_silenced():
            import mediapipe
            self._mesh = mediapipe.solutions.face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=max_faces, refine_landmarks=False,
                min_detection_confidence=0.5)
            # The graph opens its models in threads of its own, logging as it goes: one blank
            # image waits for that while the logs still go to /dev/null.
            self._mesh.process(np.zeros((64, 64, 3), np.uint8))

    def meshes(self, image_uint8: np.ndarray) -> list:
        """[h, w, 3] uint8 RGB -> MediaPipe's 468 face-mesh points [468, 2] (pixels) of every face found."""
        small, scale = _downscaled(image_uint8)
        with native_logs_silenced():
            result = self._mesh.process(np.ascontiguousarray(small))
        height, width = small.shape[:2]
        return [np.array([[p.x * width, p.y * height] for p in face.landmark]) / scale
                for face in (result.multi_face_landmarks or [])]

    def detect_all(self, image_uint8: np.ndarray) -> list:
        """[h, w, 3] uint8 RGB -> landmarks [68, 2] of every face found."""
        return [_MEDIAPIPE_BLEND @ mesh for mesh in self.meshes(image_uint8)]


class FanDetector(Detector):
    """FAN (``face-alignment``); it downloads its weights on first use."""

    def __init__(self, device: str = 'cpu'):
        try:
            import face_alignment
        except ImportError:
            raise LandmarkError("lamdmarksDetectorType = 'fan' needs the face-alignment package: "
                                "pip install face-alignment==1.5.0") from None
        landmark_type = getattr(face_alignment.LandmarksType, 'TWO_D', None) or face_alignment.LandmarksType._2D
        self._fan = face_alignment.FaceAlignment(landmark_type, device=device, flip_input=False)

    def detect_all(self, image_uint8: np.ndarray) -> list:
        """[h, w, 3] uint8 RGB -> landmarks [68, 2] of every face found."""
        small, scale = _downscaled(image_uint8)
        faces = self._fan.get_landmarks_from_image(np.ascontiguousarray(small))
        return [np.asarray(face)[:, :2] / scale for face in (faces or [])]


def read_landmark_file(path: str) -> np.ndarray:
    """A text file of 68 rows ``x y`` (input-image pixels) -> [68, 2]."""
    try:
        points = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as error:
        raise LandmarkError(f"{path}: cannot read landmarks ({error}); expected 68 rows 'x y'") from None
    if points.shape != (68, 2) or not np.isfinite(points).all():
        raise LandmarkError(f'{path}: expected 68 rows of 2 finite numbers (x y), got shape {points.shape}')
    return points


def landmark_file_for(landmarks_path: str, image_path: str) -> str:
    """The landmarks file of ``image_path``: ``landmarks_path`` itself, or in a folder ``<stem>.txt``."""
    if os.path.isdir(landmarks_path):
        return os.path.join(landmarks_path, os.path.splitext(os.path.basename(image_path))[0] + '.txt')
    return landmarks_path


def make_detector(kind: str, device: str = 'cpu'):
    return FanDetector(device) if kind == 'fan' else MediapipeDetector()
