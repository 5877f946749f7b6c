import os
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, '..', 'shared')


@pytest.fixture(scope='session', autouse=True)
def model_cache(tmp_path_factory):
    """Converted-model caches go to a fresh folder, so every run tests the conversion too."""
    os.environ['FACE_MODEL_CACHE'] = str(tmp_path_factory.mktemp('model-cache'))


@pytest.fixture(scope='session')
def render_device():
    """'cpu' (llvm_ad_rgb), or 'cuda' (cuda_ad_rgb) with FACE_TEST_DEVICE=cuda on a GPU machine."""
    return os.environ.get('FACE_TEST_DEVICE', 'cpu')


@pytest.fixture(scope='session')
def small_bfm(tmp_path_factory):
    """A small model in the exact BFM 2017 / AlbedoMM schema (801 vertices)."""
    import synthetic
    return synthetic.write_bfm(str(tmp_path_factory.mktemp('bfm')), rings=20, segments=40,
                               n_shape=40, n_expression=20, n_albedo=30)


@pytest.fixture(scope='session')
def ict_folder():
    """ICT-FaceKit from ../shared, extracted once to a cache folder outside the repo."""
    archive = os.path.join(SHARED, 'models', 'ict-facekit.tar.xz')
    if not os.path.isfile(archive):
        pytest.skip('../shared/models/ict-facekit.tar.xz is not here')
    folder = os.path.join(os.path.expanduser('~'), '.cache', 'faceRecon', 'ict-facekit')
    if not os.path.isfile(os.path.join(folder, 'FaceXModel', 'vertex_indices.json')):
        os.makedirs(folder, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter='data')
    return folder
