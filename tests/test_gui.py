"""The web app in a real browser: headless Chromium (Debian's package, driven by Playwright)
uploads a photo, moves a landmark, runs a short fit, and sees the maps and the 3D viewer."""
import os
import shutil
import socket
import time

import numpy as np
import pytest

from conftest import SHARED

gr = pytest.importorskip('gradio')
import config  # noqa: E402
import gui  # noqa: E402
import photos  # noqa: E402

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


@pytest.fixture(scope='module')
def app(ict_folder, tmp_path_factory):
    """The app on a free port of this machine, with ICT-FaceKit; -> (url, its sessions)."""
    sessions = gui.Sessions(str(tmp_path_factory.mktemp('gui-sessions')))
    models = gui.available_models(dict(ict=ict_folder, bfm2017='/nonexistent', flame='/nonexistent'))
    assert list(models) == ['ICT-FaceKit']  # only the models whose files are there are offered
    app = gui.build_app(models, sessions)
    port = free_port()
    app.queue(default_concurrency_limit=1).launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True,
                                                  quiet=True, ssr_mode=False, max_file_size=gui.MAX_UPLOAD)
    yield f'http://127.0.0.1:{port}/', sessions
    app.close()


def screen_point(page, selector: str, pixel: np.ndarray) -> tuple:
    """Where pixel (x, y) of the image shown in ``selector`` is on the screen (the image is
    scaled down to fit its box, centred, never enlarged)."""
    box = page.locator(selector).bounding_box()
    natural = page.evaluate(f"() => {{ const i = document.querySelector('{selector}'); "
                            f"return [i.naturalWidth, i.naturalHeight]; }}")
    scale = min(1.0, box['width'] / natural[0], box['height'] / natural[1])
    left = box['x'] + (box['width'] - natural[0] * scale) / 2
    top = box['y'] + (box['height'] - natural[1] * scale) / 2
    return left + pixel[0] * scale, top + pixel[1] * scale


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get('CI'), reason="no chromium here (apt install chromium)")
def test_upload_correct_a_landmark_fit_and_look_at_the_result(app, tmp_path):
    from playwright.sync_api import sync_playwright
    url, sessions = app
    photo_path = os.path.join(SHARED, 'photos', 'obama2.jpg')
    if not os.path.isfile(photo_path):
        pytest.skip('../shared/photos is not here')
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=['--no-sandbox'])
        page = browser.new_page(viewport={'width': 1400, 'height': 1800})
        page.goto(url)
        page.locator('#uploads input[type=file]').set_input_files(photo_path)
        page.wait_for_selector('#editor img', timeout=120_000)
        page.wait_for_function("document.querySelector('#status').innerText.includes('1 of 1 photos with a face')")
        session = next(iter(sessions.by_key.values()))
        photo = session.photos[0]
        nose = photo.points[30].copy()
        page.screenshot(path=str(tmp_path / '1-uploaded.png'), full_page=True)
        page.locator('#next-face').click()  # one face here: nothing else to show
        page.wait_for_function("document.querySelector('#status').innerText.includes('one face found, no other to show')")
        assert np.array_equal(photo.points[30], nose)

        # select the nose tip, then click 25 shown pixels to the right of it
        shown = (nose - photo.shown_origin) * photo.shown_scale
        page.mouse.click(*screen_point(page, '#editor img', shown))
        page.wait_for_function("document.querySelector('#status').innerText.includes('Point 30 (nose) selected')")
        page.mouse.click(*screen_point(page, '#editor img', shown + [25, 0]))
        page.wait_for_function("document.querySelector('#status').innerText.includes('Point 30 (nose) moved')")
        moved = photo.points[30]
        assert abs(moved[0] - (nose[0] + 25 / photo.shown_scale)) < 2 / photo.shown_scale
        assert abs(moved[1] - nose[1]) < 2 / photo.shown_scale
        page.screenshot(path=str(tmp_path / '2-moved.png'), full_page=True)

        # a fit cancelled in stage 2 stops there and writes no results
        page.get_by_label('quick preview').check()
        page.wait_for_function("document.querySelector('#steps2 input').value === '30'")
        page.locator('#run').click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('obama2.jpg: stage 2, step')", timeout=300_000)
        page.locator('#cancel').click()
        page.wait_for_function("document.querySelector('#status').innerText.startsWith('Cancelled')", timeout=120_000)
        assert not os.path.exists(os.path.join(session.folder, 'run1', 'render_0.png'))

        # a short fit: quick preview, few steps
        for selector, steps in (('#steps2 input', '6'), ('#steps3 input', '3')):
            page.locator(selector).fill(steps)
            page.locator(selector).press('Tab')
        time.sleep(0.5)
        page.locator('#run').click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('obama2.jpg: stage 2, step')", timeout=300_000)
        page.screenshot(path=str(tmp_path / '3-fitting.png'), full_page=True)
        page.wait_for_function("document.querySelector('#status').innerText.startsWith('Done')", timeout=600_000)
        page.wait_for_selector('#maps img', timeout=60_000)
        page.wait_for_selector('#viewer canvas', timeout=60_000)
        assert page.locator('#maps img').count() >= 3  # diffuse, specular, roughness (+ photo texture, light)
        assert page.locator('#composite img').count() == 1
        time.sleep(3)  # the viewer draws the head
        page.screenshot(path=str(tmp_path / '4-result.png'), full_page=True)

        # the fit used the corrected landmark (the command line's landmark file of the photo)
        assert os.path.isfile(os.path.join(session.folder, 'run2', 'render_0.png'))
        written = np.loadtxt(os.path.join(session.folder, 'landmarks', 'photo0.txt'))
        assert np.allclose(written[30], moved, atol=1e-2)
        # the face under its fitted light turned one way, then the other: a new render each time
        page.locator('#light input[type=number]').fill('90')
        page.locator('#light input[type=number]').press('Enter')
        page.wait_for_selector('#turned img', timeout=120_000)
        first = page.locator('#turned img').get_attribute('src')
        page.locator('#light input[type=number]').fill('-90')
        page.locator('#light input[type=number]').press('Enter')
        page.wait_for_function(f"document.querySelector('#turned img').src !== '{first}'", timeout=120_000)
        page.screenshot(path=str(tmp_path / '5-light-turned.png'), full_page=True)
        # one zip of every output
        with page.expect_download() as download:
            page.locator('#download').click()
        archive = tmp_path / 'results.zip'
        download.value.save_as(archive)
        import zipfile
        names = zipfile.ZipFile(archive).namelist()
        assert {'head0.glb', 'mesh0.obj', 'diffuseMap_0.png', 'render_0.png'} <= set(names)
        browser.close()
        print(f'screenshots in {tmp_path}')


def test_a_photo_of_two_people_shows_the_largest_face_and_then_the_other(tmp_path):
    """'Next face in this photo' shows and fits the other person of two_people.jpg, then the
    first again; each with its own detected landmarks, the photo cropped around it."""
    path = os.path.join(SHARED, 'photos', 'two_people.jpg')
    if not os.path.isfile(path):
        pytest.skip('../shared/photos is not here')
    photo = gui.read_upload(path, 0, str(tmp_path))
    assert len(photo.faces) == 2
    largest = photo.points.copy()
    assert any(np.array_equal(largest, face) for face in photo.faces)
    origins, centres = [photo.shown_origin.copy()], [largest.mean(0)]
    said = gui.next_face(photo)
    assert said == f'two_people.jpg: face {photo.face + 1} of 2 from the left.'
    origins.append(photo.shown_origin.copy())
    centres.append(photo.points.mean(0))
    assert np.array_equal(photo.points, photo.detected) and not np.allclose(photo.points, largest)
    # the shown crop moved with the face: each face's centre lies inside its own crop
    side = max(photo.shown.shape[:2]) / photo.shown_scale  # input px
    for origin, centre in zip(origins, centres):
        assert (origin < centre).all() and (centre < origin + side).all()
    assert abs(origins[0][0] - origins[1][0]) > side / 2
    gui.next_face(photo)
    assert np.array_equal(photo.points, largest)


def test_the_presets_steps_come_from_their_config_files():
    shipped = config.load_config(os.path.join(gui.ROOT, 'optimConfig.ini'))
    assert gui.preset_steps('default') == (shipped.iterStep2, shipped.iterStep3)
    quick, best = gui.preset_steps('quick preview'), gui.preset_steps('high quality')
    assert all(q < d < b for q, d, b in zip(quick, gui.preset_steps('default'), best))


def test_uploads_that_are_not_photos_are_refused(tmp_path):
    fake = tmp_path / 'photo.png'
    fake.write_bytes(b'not an image at all')
    with pytest.raises(photos.InputError, match='not an image file'):
        gui.read_upload(str(fake), 0, str(tmp_path))
    other = tmp_path / 'notes.txt'
    other.write_text('hello')
    with pytest.raises(photos.InputError, match='not a photo'):
        gui.read_upload(str(other), 0, str(tmp_path))


def test_a_closed_page_stops_its_fit_and_removes_its_folder(tmp_path):
    sessions = gui.Sessions(str(tmp_path))

    class Request:
        session_hash = 'tab-1'
    session = sessions.get(Request())
    assert os.path.isdir(session.folder) and sessions.get(Request()) is session
    sessions.close(Request())
    assert session.cancel.is_set() and not os.path.exists(session.folder)
