import os

import pytest

import config
import fitting
from conftest import ROOT, SHARED

NEXTFACE_CONFIGS = ['optimConfig.nextface.ini', 'optimConfigShadows.nextface.ini']


@pytest.mark.parametrize('name', NEXTFACE_CONFIGS)
def test_nextface_configs_parse_with_their_meaning(name):
    path = os.path.join(SHARED, 'compat', name)
    if not os.path.isfile(path):
        pytest.skip('../shared/compat is not here')
    c = config.load_config(path)
    assert c.device == 'cuda' and c.bands == 9 and c.envMapRes == 64 and c.textureResolution == 512
    assert c.iterStep1 == 2000 and c.iterStep2 == 400 and c.iterStep3 == 100
    assert c.rtSamples == 4000 and c.rtTrainingSamples == 8  # '8#comment' with no space
    assert fitting.stage_samples(c, 2) == fitting.stage_samples(c, 3) == 8  # NextFace traced rtTrainingSamples
    assert c.camFocalLength == 3000.0 and c.optimizeFocalLength is True and c.trimPca is False
    assert c.path == './baselMorphableModel'
    expected_detector = 'fan' if name == 'optimConfig.nextface.ini' else 'mediapipe'  # key 'tracker' there
    assert c.lamdmarksDetectorType == expected_detector
    assert c.weightDiffuseSymmetryReg == (300.0 if name == 'optimConfig.nextface.ini' else 1200.0)


@pytest.mark.parametrize('name', ['optimConfig.ini', 'optimConfigLight.ini'])
def test_shipped_configs_parse(name):
    c = config.load_config(os.path.join(ROOT, name))
    assert c.device == 'cpu' and c.lamdmarksDetectorType == 'mediapipe'
    assert (fitting.stage_samples(c, 2), fitting.stage_samples(c, 3), c.rtTrainingSamples) == (16, 16, 8)  # fewer steps of more samples


def test_light_config_has_stronger_reflectance_regularizers():
    normal = config.load_config(os.path.join(ROOT, 'optimConfig.ini'))
    light = config.load_config(os.path.join(ROOT, 'optimConfigLight.ini'))
    assert light.weightDiffuseSymmetryReg > normal.weightDiffuseSymmetryReg
    assert light.weightSpecularSymmetryReg > normal.weightSpecularSymmetryReg


@pytest.mark.parametrize('text, words', [
    ('bands = 0', ["'bands'", 'an integer from 1 to 16']),
    ('iterStep1 = -5', ["'iterStep1'", 'from 0 to']),
    ("device = 'tpu'", ["'device'", "'cpu', 'cuda'"]),
    ('colour = 3', ["unknown config key 'colour'"]),
    ('smoothSh = 3', ["'smoothSh'", 'True or False']),
    ('textureResolution = 300', ["'textureResolution'", '512']),
    ('just words', ["expected 'key = value'"]),
])
def test_bad_keys_and_values_name_the_key_and_what_is_accepted(text, words):
    with pytest.raises(config.ConfigError) as error:
        config.parse_config_text(f'# header\n{text}  # comment\n', source='f.ini')
    message = str(error.value)
    assert message.startswith('f.ini:2:')
    for word in words:
        assert word in message


def test_overrides_are_validated():
    c = config.Config().replace(device='cuda', maxResolution='512', iterStep2='7')
    assert (c.device, c.maxResolution, c.iterStep2) == ('cuda', 512, 7)
    with pytest.raises(config.ConfigError):
        config.Config().replace(maxResolution='-1')


def test_comments_inside_quotes_are_kept():
    assert config.parse_config_text("path = '/data/#faces' # where").path == '/data/#faces'


def test_missing_config_file():
    with pytest.raises(config.ConfigError, match='not found'):
        config.load_config('/nonexistent/optim.ini')
