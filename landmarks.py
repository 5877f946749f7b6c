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


# MediaPipe face-mesh vertex for each iBUG-68 point, chosen on the canonical face mesh:
# jaw contour (0-16), brows (17-26), nose bridge and tip (27-30), nostril base (31-35),
# eyes from the outer corner over the upper lid (36-47), outer lips from the right corner
# (48-59), inner lips (60-67). "Right" is the subject's right, on the image's left.
MEDIAPIPE_TO_IBUG = np.array([
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87])

# The jaw contour is a silhouette, not a fixed point of the face: it moves over the skin as the
# head turns, so it gets a smaller weight in the landmark loss.
LANDMARK_WEIGHTS = np.ones(68, np.float32)
LANDMARK_WEIGHTS[:17] = 0.3

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


def _largest(faces: list) -> tuple:
    """[[68, 2], ...] -> (the face with the largest landmark bounding box, its index)."""
    areas = [np.prod(face.max(axis=0) - face.min(axis=0)) for face in faces]
    index = int(np.argmax(areas))
    return faces[index], index


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


class MediapipeDetector:
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

    def detect_all(self, image_uint8: np.ndarray) -> list:
        """[h, w, 3] uint8 RGB -> landmarks [68, 2] of every face found."""
        small, scale = _downscaled(image_uint8)
        with native_logs_silenced():
            result = self._mesh.process(np.ascontiguousarray(small))
        height, width = small.shape[:2]
        return [np.array([[p.x * width, p.y * height] for p in face.landmark])[MEDIAPIPE_TO_IBUG] / scale
                for face in (result.multi_face_landmarks or [])]

    def detect(self, image_uint8: np.ndarray) -> tuple:
        """[h, w, 3] uint8 RGB -> (landmarks [68, 2] of the largest face, number of faces found)."""
        faces = self.detect_all(image_uint8)
        if not faces:
            return None, 0
        return _largest(faces)[0], len(faces)


class FanDetector:
    """FAN (``face-alignment``); it downloads its weights on first use."""

    def __init__(self, device: str = 'cpu'):
        try:
            import face_alignment
        except ImportError:
            raise LandmarkError("lamdmarksDetectorType = 'fan' needs the face-alignment package: "
                                "pip install face-alignment==1.5.0") from None
        landmark_type = getattr(face_alignment.LandmarksType, 'TWO_D', None) or face_alignment.LandmarksType._2D
        self._fan = face_alignment.FaceAlignment(landmark_type, device=device, flip_input=False)

    def detect(self, image_uint8: np.ndarray) -> tuple:
        small, scale = _downscaled(image_uint8)
        faces = self._fan.get_landmarks_from_image(np.ascontiguousarray(small))
        if not faces:
            return None, 0
        return _largest([np.asarray(face)[:, :2] / scale for face in faces])[0], len(faces)


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
