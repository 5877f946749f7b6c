"""Benchmark the fit on a BFM-sized synthetic model with known parameters.

    python benchmark.py [--device cpu|cuda] [--iterations S1 S2 S3] [--size 256] [--spp 8]
                        [--set key=value ...] [--profile]

Writes a synthetic model in the exact BFM 2017 / AlbedoMM schema (28.8k vertices, 57k
triangles, 199/100/145 components) in a child process (so that the peak memory printed is the
fit's), renders a synthetic input with known pose, expression, albedo and light, runs the three
stages with the default config (optimConfig.ini) and prints per stage: iterations, median
seconds per iteration, total time; the final render time; peak memory (resident, and the
process's own: ``OwnMemoryPeak``); and the
accuracy reached (landmark error in px, photometric error after stages 2 and 3 next to that of
the true parameters, vertex error in mm after rigid alignment, the diffuse map's error against
the true map after stages 2 and 3). ``--detail`` gives the true
diffuse map fine detail (spots, mottling) that the statistical albedo cannot express and only
stage 3 can fit. ``--profile`` prints where the time of stages 2 and 3 goes instead of the
accuracy; ``--cli`` times the whole command line (model loading, the
three stages, all outputs) on the synthetic photo instead; ``--textures`` prints the time of
stages 2 and 3 and of writing the outputs, and the peak memory, at 512, 1024 and 2048 texels;
``--diagnose`` prints what limits stage 2 (the error that light and albedo solved
by least squares reach on the start's geometry and on the true one, and how alike the geometry
gradients of independent renders are) instead of fitting; ``--video N ...`` the speed of
finding and tracking the face in 640x360 clips of N frames, and
the peak memory of each; ``--cluster N`` the images per hour of a batch of N photos fitted here
one by one and on a local Ray cluster with 1 and 2 workers, and the overhead per image;
``--detector N`` the vertex error that stages 1 and 2 reach on N ICT-FaceKit faces of known
shape from MediaPipe's landmarks of their render and from the model's own; ``--calibrate N``
fits, on N such faces of varied pose, expression and light, the table that turns MediaPipe's
face mesh into iBUG points (``landmarks.MEDIAPIPE_TO_IBUG``) and prints it. ``--converged OUTPUT
...`` prints, for the photos fitted in optimizer.py's output folders, each fit's photometric
error without the render's noise (the figures optimizer.py prints are of 64-spp renders).
"""
import argparse
import cProfile
import dataclasses
import itertools
import multiprocessing
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tests'))
import config as config_module  # noqa: E402
import fitting  # noqa: E402
import landmarks  # noqa: E402
import modelFiles  # noqa: E402
import pipeline  # noqa: E402
import results  # noqa: E402
import synthetic  # noqa: E402
import textures  # noqa: E402


def stage_row(name: str, history: list, seconds: float) -> tuple:
    """A stage's history (one dict per step with its 'seconds') -> (name, steps, median s/it, total s)."""
    median = float(np.median([step['seconds'] for step in history])) if history else float('nan')
    return name, len(history), median, seconds


def timed(function):
    """-> (what ``function()`` returns, seconds it took)."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


class OwnMemoryPeak:
    """The peak of a process's own memory (``RssAnon`` of /proc/PID/status, sampled every 10 ms
    in a thread; Linux only, else 0): what it allocated, without the pages of the libraries' code
    that the resident size also counts. Those depend on the page cache, not on the fit: in a
    freshly installed environment (its libraries' files all cached) the same fit's resident peak
    came out 95 MB higher (932 against 1026-1030 MB)."""

    def __init__(self, pid='self'):
        self.path, self.peak_kb, self._running = f'/proc/{pid}/status', 0, True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while self._running:
            try:
                with open(self.path, encoding='ascii') as status:
                    rows = [row for row in status if row.startswith('RssAnon:')]
            except OSError:  # no /proc here, or the process has ended
                return
            if rows:
                self.peak_kb = max(self.peak_kb, int(rows[0].split()[1]))
            time.sleep(0.01)

    def stop(self) -> float:
        """Stop sampling -> the peak in MB."""
        self._running = False
        self._thread.join()
        return self.peak_kb / 1024


def write_model(folder: str) -> str:
    """The BFM-sized synthetic model and its converted cache (run in a child process) -> association file."""
    info = synthetic.write_bfm(folder, rings=120, segments=240)
    modelFiles.load_bfm2017(folder, info['association'])
    return info['association']


def skin_detail(resolution: int, seed: int = 0) -> torch.Tensor:
    """Fine detail the statistical albedo cannot express, [res, res, 1] multiplicative, mean 1:
    dark spots (freckles, pores) a few texels wide and a fine mottling."""
    generator = torch.Generator().manual_seed(seed)
    spots = (torch.rand(1, 1, resolution, resolution, generator=generator) < 0.004).float()
    spots = torch.nn.functional.max_pool2d(spots, 5, stride=1, padding=2)  # 5-texel spots
    mottling = torch.nn.functional.avg_pool2d(torch.randn(1, 1, resolution, resolution, generator=generator),
                                              3, stride=1, padding=1)
    return (1.0 - 0.45 * spots + 0.25 * mottling)[0].permute(1, 2, 0).clamp(0.3, 1.5)


def diffuse_map_error(scene, params, truth) -> float:
    """Mean |fitted - true| of the diffuse map [res, res, 3] over the texels the photo sees
    (visible from the camera and facing it, under the true geometry); a brightness that the map
    and the light share counts too."""
    with torch.no_grad():
        view = scene.texel_view(truth, 0, scene.vertices(truth)[0], scene.resolution)
        seen = view['visible'] & (view['facing'] > textures.PHOTO_GRAZING)
        return float((scene.maps(params, 0)[0] - scene.maps(truth, 0)[0]).abs()[seen].mean())


def synthetic_problem(config, size: int, detail: bool = False):
    """A synthetic photo of known parameters -> (model, truth, FitImage, Pipeline, Targets, true
    vertices). With ``detail`` the true diffuse map is the statistical albedo times ``skin_detail``."""
    model = modelFiles.load_model(config)
    generator = torch.Generator().manual_seed(0)
    truth = pipeline.SceneParameters.zeros(model, 1, 1, config.bands)
    truth.identity = 0.7 * torch.randn(1, model.n_shape, generator=generator)
    truth.expression = 0.5 * torch.randn(1, model.n_expression, generator=generator)
    truth.rotation, truth.translation = torch.tensor([[0.1, 0.35, 0.05]]), torch.tensor([[5.0, 10.0, 900.0]])
    truth.focal, truth.albedo = torch.tensor([size * 3.0]), 0.7 * torch.randn(1, model.n_albedo, generator=generator)
    truth.sh[0, 0], truth.sh[0, 1], truth.sh[0, 2] = 2.5, 0.8, 1.2
    if detail:
        scene = pipeline.Pipeline(model, config, [(size, size)])
        diffuse, specular, roughness = scene.maps(truth, 0)
        truth.diffuse_map = (diffuse * skin_detail(diffuse.shape[0])).clamp(0, 1)[None]
        truth.specular_map, truth.roughness_map = specular[None], roughness[None]
    image, scene, targets, vertices = synthetic.synthetic_photo(model, truth, config, size, background=0.2)
    return model, truth, image, scene, targets, vertices.numpy()


def time_command_line(folder: str, image, config, args) -> None:
    """Run ``optimizer.py`` in a process of its own on the synthetic photo (landmarks from a file:
    the detector knows no synthetic face) with the benchmark's model; print its wall time and
    peak memory (the fitted image is the 1.8x crop around the face, here 207 px)."""
    photo, landmark_file = os.path.join(folder, 'synthetic.png'), os.path.join(folder, 'synthetic.txt')
    results.save_image(photo, image.pixels)
    np.savetxt(landmark_file, image.landmarks)
    overrides = dict(path=config.path, landmarksAssociation=config.landmarksAssociation, device=args.device,
                     rtTrainingSamples=args.spp, maxResolution=args.size, **config_module.parse_overrides(args.set))
    argv = ['--input', photo, '--landmarks', landmark_file, '--output', os.path.join(folder, 'output')]
    for key, value in overrides.items():
        argv += ['--set', f'{key}={value}']
    if args.iterations:
        argv += ['--iterations', *map(str, args.iterations)]
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'optimizer.py'),
                              *argv])
    own = OwnMemoryPeak(child.pid)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the model writer's
    print(f'command line: exit status {os.waitstatus_to_exitcode(status)}, {time.perf_counter() - start:.1f} s, '
          f'peak memory {usage.ru_maxrss / 1024:.0f} MB resident, {own.stop():.0f} MB its own')


def texture_resolution_run(config, size: int, folder: str) -> dict:
    """In a process of its own (its peak memory is this fit's): the three stages and every output
    at ``config.textureResolution`` -> seconds of stages 2 and 3 and of writing the outputs, peak MB."""
    import fitting
    import optimizer
    own_memory = OwnMemoryPeak()
    model, _, image, scene, targets, _ = synthetic_problem(config, size)
    params, _ = fitting.fit_landmarks(model, targets, config, False)
    (params, targets), start = timed(lambda: fitting.start_stage2(scene, params, targets))
    (params, _), stage2 = timed(lambda: fitting.fit_stage2(scene, params, targets))
    targets = fitting.stage3_targets(scene, params, targets)
    (params, _), stage3 = timed(lambda: fitting.fit_stage3(scene, params, targets))
    output = os.path.join(folder, f'outputs-{config.textureResolution}')
    _, writing = timed(lambda: optimizer.write_results(output, scene, params, [image], targets))
    return dict(stage2=start + stage2, stage3=stage3, writing=writing,
                peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, own=own_memory.stop())


def compare_texture_resolutions(config, args, folder: str) -> None:
    """Stage 2, stage 3, output writing and peak memory (resident and own) at 512, 1024 and 2048 texels."""
    print(f'{"texels":>7} {"stage 2 s":>10} {"stage 3 s":>10} {"outputs s":>10} {"peak MB":>8} {"own MB":>7}')
    for resolution in (512, 1024, 2048):
        with multiprocessing.get_context('spawn').Pool(1) as pool:
            row = pool.apply(texture_resolution_run, (config.replace(textureResolution=resolution), args.size, folder))
        print(f'{resolution:>7} {row["stage2"]:>10.1f} {row["stage3"]:>10.1f} {row["writing"]:>10.1f} {row["peak"]:>8.0f}'
              f' {row["own"]:>7.0f}', flush=True)


def geometry_gradients(scene, params, targets, spp: int, seeds: tuple) -> list:
    """The gradient of stage 2's photometric loss with respect to the identity and expression
    coefficients of ``params`` [shape + expression], one per render seed, at ``spp``."""
    params = params.detached()
    coefficients = (params.identity.requires_grad_(True), params.expression.requires_grad_(True))
    weights = targets.pixel_weights(0)
    gradients = []
    for seed in seeds:
        rendered = scene.render(params, 0, spp, seed, scene.vertices(params)[0])
        loss = fitting.photometric_loss(rendered, targets.photos[0], weights)
        gradients.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, coefficients)]))
    return gradients


def print_stage2_diagnosis(scene, truth, params, targets, every_pixel) -> None:
    """What limits stage 2, from the least-squares start ``params``: the photometric error that
    light and albedo solved by least squares reach on the start's geometry and on the true one
    (how much of the error is the geometry's), and how alike the geometry gradients of
    independent renders are (the mean cosine between pairs of seeds: 1 is noise-free)."""
    on_true_geometry = params.detached()
    for name in ('identity', 'expression', 'rotation', 'translation', 'focal'):
        setattr(on_true_geometry, name, getattr(truth, name).clone())
    on_true_geometry = fitting.solve_appearance(scene, on_true_geometry, targets)
    print(f'photometric error, light and albedo by least squares: on the start\'s geometry '
          f'{fitting.photometric_error(scene, params, every_pixel):.4f}, on the true geometry '
          f'{fitting.photometric_error(scene, on_true_geometry, every_pixel):.4f} '
          f'(true parameters {fitting.photometric_error(scene, truth, every_pixel):.4f})')
    cosine, cosines = torch.nn.functional.cosine_similarity, []
    for spp in (4, 16, 64, 256):
        a, b, c = geometry_gradients(scene, params, targets, spp, (11, 12, 13))
        cosines.append(f'{spp} spp {float(cosine(a, b, 0) + cosine(a, c, 0) + cosine(b, c, 0)) / 3:.2f}')
    print('geometry gradient (identity and expression) of the photometric loss at the start, mean cosine '
          'between independent renders: ' + ', '.join(cosines))


def video_run(clip_path: str, model_path: str) -> dict:
    """In a process of its own: find the face in every frame of a clip and track its pose and
    expression (ICT-FaceKit, the mean identity) -> frames, seconds of each pass, peak MB."""
    import tracking
    import video
    own_memory = OwnMemoryPeak()
    model = modelFiles.load_ict(model_path)
    clip = video.Clip(clip_path)
    tracks, detect = timed(lambda: tracking.detect(clip, landmarks.MediapipeDetector()))
    config = config_module.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'optimConfig.ini'))
    config = config.replace(model='ict', path=model_path)
    focal, size = 2.0 * clip.width, (clip.width, clip.height)
    _, track = timed(lambda: tracking.track(tracks, model, torch.zeros(model.n_shape), focal, size, config))
    # the photometric steps on the first 50 tracked frames, with the mean face's reflectance
    keyframe = pipeline.SceneParameters.zeros(model, 1, 1, config.bands)
    keyframe.sh[0, 0] = 3.0
    refiner = tracking.PhotometricRefiner(model, keyframe, focal, size, config)

    def refine_first_frames() -> None:
        found = ((frame, track) for frame, track in zip(clip.frames(), tracks) if track.found)  # one frame at a time
        for frame, track in itertools.islice(found, 50):
            refiner.refine(track, frame.pixels)
    _, refine = timed(refine_first_frames)
    return dict(frames=len(tracks), detect=detect, track=track, refine=refine / 50,
                peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, own=own_memory.stop())


def compare_clip_lengths(folder: str, model_path: str, lengths: tuple) -> None:
    """Tracking speed and peak memory on 640x360 clips of several lengths (flat memory: the
    same peak however long the clip)."""
    photo = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'photos', 'obama.jpg')
    print(f'{"frames":>7} {"finding fps":>12} {"landmark fit fps":>17} {"both fps":>9} '
          f'{"with photometric steps fps":>27} {"peak MB":>8} {"own MB":>7}')
    for frames in lengths:
        path = os.path.join(folder, f'clip{frames}.mp4')
        synthetic.write_clip(path, frames, photo, cut=frames, blank=range(0))
        with multiprocessing.get_context('spawn').Pool(1) as pool:
            row = pool.apply(video_run, (path, model_path))
        per_frame = (row['detect'] + row['track']) / row['frames']
        print(f'{row["frames"]:>7} {row["frames"] / row["detect"]:>12.1f} {row["frames"] / row["track"]:>17.1f} '
              f'{1 / per_frame:>9.1f} {1 / (per_frame + row["refine"]):>27.1f} {row["peak"]:>8.0f} {row["own"]:>7.0f}',
              flush=True)


def cluster_photos(folder: str, count: int) -> str:
    """``count`` different photos of a face (the astronaut, shifted and mirrored) -> their folder."""
    import skimage.data
    from PIL import Image
    photos_folder = os.path.join(folder, 'cluster-photos')
    os.makedirs(photos_folder)
    astronaut = skimage.data.astronaut()
    for k in range(count):
        shifted = np.roll(astronaut, 4 * k, axis=1)
        Image.fromarray(shifted[:, ::-1] if k % 2 else shifted).save(os.path.join(photos_folder, f'face{k:03d}.png'))
    return photos_folder


def compare_cluster_workers(folder: str, count: int, model_path: str, iterations: list) -> None:
    """Images per hour of a batch of ``count`` photos fitted one by one here, and on a local Ray
    cluster of this machine with 1 and 2 workers (ICT-FaceKit), and each way's overhead per image:
    wall time · workers / photos, less the fit's own seconds (from manifest.json)."""
    import json
    import optimizer
    photos_folder = cluster_photos(folder, count)
    common = ['--input', photos_folder, '--set', 'model=ict', '--set', f'path={model_path}',
              '--iterations', *map(str, iterations)]
    cores = os.cpu_count()
    runs = [('here, one by one', 1, []), ('Ray, 1 worker', 1, ['--ray', 'local', '--set', f'clusterCpus={cores}']),
            ('Ray, 2 workers', 2, ['--ray', 'local', '--set', f'clusterCpus={max(1, cores // 2)}'])]
    print(f'{count} photos, ICT-FaceKit, iterations {" ".join(map(str, iterations))}, {cores} cores')
    print(f'{"run":<18} {"wall s":>8} {"images/hour":>12} {"fit s/image":>12} {"overhead s/image":>17}')
    for name, workers, extra in runs:
        output = os.path.join(folder, f'cluster-{workers}-{len(extra)}')
        status, seconds = timed(lambda: optimizer.main(common + ['--output', output] + extra))
        with open(os.path.join(output, 'manifest.json'), encoding='utf-8') as file:
            entries = json.load(file)['images']
        fit = float(np.mean([entry['seconds'] for entry in entries]))
        print(f'{name:<18} {seconds:>8.1f} {3600 * count / seconds:>12.0f} {fit:>12.1f} '
              f'{seconds * workers / count - fit:>17.1f}' + ('' if status == 0 else f'  (exit status {status})'),
              flush=True)


def converged_errors(outputs: list, config) -> None:
    """For each photo fitted in every folder of ``outputs`` (optimizer.py's, ICT-FaceKit, the same
    photos): the photometric error of its result rendered at 1024 spp, over the face pixels that
    no folder left out. The errors optimizer.py prints are of 64-spp renders and count their
    noise (about half of a photo's stage-3 figure), so a renderer with less noise looks better
    there without fitting better; here every result is rendered by this checkout's renderer."""
    import checkpoints
    import photos
    manifests = [checkpoints.Manifest.load(output) for output in outputs]
    empty = [output for output, manifest in zip(outputs, manifests) if not manifest.images]
    if empty:
        sys.exit(f"--converged: no photo fitted in {', '.join(empty)} (no {checkpoints.MANIFEST_FILE}): "
                 f"give optimizer.py's output folders")
    config = config.replace(**{key: manifests[0].config[key] for key in checkpoints.CHECKPOINT_CONFIG_KEYS})
    model = modelFiles.load_model(config)
    detector = landmarks.make_detector(config.lamdmarksDetectorType, config.device)
    rows = []
    for index in sorted(set.intersection(*(set(manifest.images) for manifest in manifests))):
        path = manifests[0].images[index]['path']
        targets = fitting.Targets.of(model, [photos.prepare_image(index, path, config, detector, None)])
        scene = pipeline.Pipeline(model, config, targets.sizes)
        fits, weights = [], []
        for output, manifest in zip(outputs, manifests):
            key = manifest.images[index]['checkpoint']
            fits.append(checkpoints.load_checkpoint(output, key, 3, model, 1, config.bands))
            _, left_out = checkpoints.load_left_out(output, key, targets.sizes)
            weights.append(dataclasses.replace(targets, left_out=left_out).pixel_weights(0))
        common = dataclasses.replace(targets, left_out=[torch.stack(weights).min(0).values == 0])
        rows.append([fitting.photometric_error(scene, params, common, spp=1024) for params in fits])
        print(f'{os.path.basename(path)}: ' + ' / '.join(f'{error:.4f}' for error in rows[-1]), flush=True)
    print('mean: ' + ' / '.join(f'{error:.4f}' for error in np.mean(rows, 0)) + f' (stage {fits[0].stage}, 1024 spp)')


def print_profile(profile: cProfile.Profile, stages_seconds: float) -> None:
    """The functions that take the time of stages 2 and 3, by their own time."""
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:14]
    print(f'\nprofile of stages 2 and 3 ({stages_seconds:.1f} s), by own time:')
    for (file, line, name), (_, calls, own, cumulative, _) in rows:
        print(f'  {own:7.1f} s {100 * own / stages_seconds:5.1f}%  {calls:>7} calls  '
              f'{os.path.basename(file)}:{line} {name}')


# iBUG-68's groups, for the landmark figures
LANDMARK_GROUPS = dict(contour=range(0, 17), brows=range(17, 27), nose=range(27, 36), eyes=range(36, 48),
                       lips=range(48, 68))


def group_distances(points: np.ndarray, truth: np.ndarray) -> str:
    """iBUG points [faces, 68, 2] and the true ones -> their mean distance per group and in all,
    in px at 100 px between the outer eye corners."""
    unit = landmarks.eye_corner_distance(truth)[:, None] / 100
    distance = (np.linalg.norm(points - truth, axis=2) / unit).mean(0)  # [68]
    return ' '.join(f'{name} {distance[list(rows)].mean():.2f}' for name, rows in LANDMARK_GROUPS.items()) + \
        f' all {distance.mean():.2f}'


def calibrate_mediapipe(config, faces: int) -> None:
    """Fit ``landmarks.MEDIAPIPE_TO_IBUG`` on ``faces`` ICT-FaceKit faces (``varied_problem``, the
    drawn albedo) and print it after the distance of MediaPipe's points to the model's own on the
    held-out third (every third seed), through the table in landmarks.py and through the new one."""
    from tqdm import tqdm
    model = modelFiles.load_model(config)
    detector = landmarks.MediapipeDetector(max_faces=1)
    albedo = synthetic.drawn_albedo(model, pipeline.fitted_texture_resolution(config))
    found, truth, held_out = [], [], []
    for seed in tqdm(range(faces), desc='rendering faces', unit='face'):
        image, _, _ = synthetic.varied_problem(model, config, seed, albedo)
        meshes = detector.meshes((image.pixels * 255).round().astype(np.uint8))
        if meshes:
            found.append(meshes[0])
            truth.append(image.landmarks)
            held_out.append(seed % 3 == 0)
    found, truth, held_out = np.stack(found), np.stack(truth), np.array(held_out)
    blends = landmarks.convex_blends(found[~held_out], truth[~held_out])
    through = lambda table: np.einsum('ij,fjc->fic', landmarks.blend_matrix(table, found.shape[1]), found[held_out])
    print(f'MediaPipe found {len(found)} of {faces} faces; fitted on {(~held_out).sum()}; distance to the model\'s '
          f'own points on the other {held_out.sum()}, px at 100 px between the outer eye corners:')
    print(f'  table in landmarks.py: {group_distances(through(landmarks.MEDIAPIPE_TO_IBUG), truth[held_out])}')
    print(f'  new table:             {group_distances(through(blends), truth[held_out])}')
    print('MEDIAPIPE_TO_IBUG = (')
    for point, blend in enumerate(blends):
        rounded = {k: round(w, 3) for k, w in blend.items() if w >= 0.01}  # blend_matrix renormalises
        print(f'    {{{", ".join(f"{k}: {w}" for k, w in rounded.items())}}},  # {point}')
    print(')')


def compare_landmark_sources(config, faces: int) -> None:
    """Stages 1 and 2 on ``faces`` ICT-FaceKit faces of known shape (``detector_problem``, yaw 0,
    0.3 and 0.5 rad in turn), from MediaPipe's landmarks of each render and from the model's own:
    how far MediaPipe's points lie from the model's, and the vertex error after each stage."""
    model = modelFiles.load_model(config)
    detector = landmarks.MediapipeDetector()
    albedo = synthetic.drawn_albedo(model, pipeline.fitted_texture_resolution(config))
    usable = model.landmark_usable.numpy()
    print(f'ICT-FaceKit, {config.maxResolution} px, stage-2 landmark weight {config.weightLandmarksLossStep2}')
    print(f'{"face":<16} {"landmarks":<10} {"off own px":>10} {"stage 1 mm":>11} {"stage 2 mm":>11} {"photometric":>12}')
    for face in range(faces):
        yaw = (0.0, 0.3, 0.5)[face % 3]
        image, scene, true_vertices = synthetic.detector_problem(model, config, face, yaw, albedo)
        found, _ = detector.detect((image.pixels * 255).round().astype(np.uint8))
        if found is None:
            print(f'seed {face}, yaw {yaw}: MediaPipe found no face')
            continue
        error = lambda p: synthetic.rigid_vertex_error(scene.vertices(p)[0].detach().numpy(), true_vertices.numpy())
        for source, points in (('own', image.landmarks), ('MediaPipe', found)):
            targets = fitting.Targets.of(model, [dataclasses.replace(image, landmarks=points)])
            params, _ = fitting.fit_landmarks(model, targets, config, False)
            stage1 = error(params)
            params, targets = fitting.start_stage2(scene, params, targets)
            params, _ = fitting.fit_stage2(scene, params, targets)
            off = np.linalg.norm(points - image.landmarks, axis=1)[usable].mean()
            print(f'{f"seed {face}, yaw {yaw}":<16} {source:<10} {off:>10.1f} {stage1:>11.2f} {error(params):>11.2f} '
                  f'{fitting.photometric_error(scene, params, targets):>12.4f}', flush=True)


def main() -> None:
    """The command line: the model, the cache and the clips go to a temporary folder, removed at
    the end (each run writes about 700 MB)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--iterations', type=int, nargs=3, default=None)
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--spp', type=int, default=8)
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='override a config key')
    parser.add_argument('--profile', action='store_true', help='profile stages 2 and 3')
    parser.add_argument('--detail', action='store_true',
                        help='the true diffuse map is the statistical albedo with fine detail (spots, mottling) '
                             'that only stage 3 can fit')
    parser.add_argument('--diagnose', action='store_true',
                        help="what limits stage 2, from the least-squares start, instead of fitting")
    parser.add_argument('--cli', action='store_true',
                        help='time the whole command line (optimizer.py) on the synthetic photo instead')
    parser.add_argument('--textures', action='store_true',
                        help='stages 2, 3, the outputs and peak memory at 512, 1024 and 2048 texels instead')
    parser.add_argument('--video', type=int, nargs='+', metavar='FRAMES',
                        help='instead: tracking speed and peak memory on 640x360 clips of these lengths '
                             '(ICT-FaceKit from --ict)')
    parser.add_argument('--cluster', type=int, metavar='PHOTOS',
                        help='instead: images per hour of a batch of this many photos here and on a local Ray cluster '
                             'with 1 and 2 workers, and the overhead per image (ICT-FaceKit from --ict; --iterations '
                             'default 100 60 20)')
    parser.add_argument('--detector', type=int, metavar='FACES',
                        help="instead: stages 1 and 2 on this many ICT-FaceKit faces of known shape from MediaPipe's "
                             "landmarks of their render and from the model's own (ICT-FaceKit from --ict; --set applies)")
    parser.add_argument('--calibrate', type=int, metavar='FACES',
                        help="instead: fit the table that makes iBUG points of MediaPipe's face mesh on this many "
                             "ICT-FaceKit faces of known shape and print it (ICT-FaceKit from --ict)")
    parser.add_argument('--converged', nargs='+', metavar='OUTPUT',
                        help="instead: each photo's photometric error in these optimizer.py output folders (ICT-FaceKit "
                             "from --ict, the same photos) without the render's noise: of a 1024-spp render, over the "
                             "face pixels none of them left out")
    parser.add_argument('--ict', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'models', 'ICT-FaceKit'),
                        help='the ICT-FaceKit folder for --video, --cluster, --detector and --calibrate')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix='benchmark-') as folder:
        run(args, folder)


def run(args, folder: str) -> None:
    """What ``main``'s options ask for, with ``folder`` for every file written."""
    os.environ.setdefault('FACE_MODEL_CACHE', os.path.join(folder, 'cache'))
    if args.video:
        compare_clip_lengths(folder, args.ict, tuple(args.video))
        return
    if args.cluster:
        compare_cluster_workers(folder, args.cluster, args.ict, args.iterations or [100, 60, 20])
        return
    defaults = config_module.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'optimConfig.ini'))
    given = dict(device=args.device, maxResolution=args.size, **config_module.parse_overrides(args.set))
    if args.iterations:
        given.update(iterStep1=args.iterations[0], iterStep2=args.iterations[1], iterStep3=args.iterations[2])
    if args.converged:
        converged_errors(args.converged, defaults.replace(**{'model': 'ict', 'path': args.ict, **given}))
        return
    if args.calibrate:
        calibrate_mediapipe(defaults.replace(**{'model': 'ict', 'path': args.ict, **given}), args.calibrate)
        return
    if args.detector:
        compare_landmark_sources(defaults.replace(**{'model': 'ict', 'path': args.ict, **given}), args.detector)
        return
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        association = pool.apply(write_model, (folder,))
    config = defaults.replace(**{'path': folder, 'landmarksAssociation': association, 'rtTrainingSamples': args.spp,
                                 **given})
    if args.textures:
        compare_texture_resolutions(config, args, folder)
        return
    own_memory = OwnMemoryPeak()
    model, truth, image, scene, targets, true_vertices = synthetic_problem(config, args.size, args.detail)
    print(f'model: {model.mean_shape.shape[0]} vertices, {model.faces.shape[0]} triangles, '
          f'{model.n_shape}/{model.n_expression}/{model.n_albedo} components; {args.size} px, '
          f'{config.rtTrainingSamples} spp, device {args.device}, {torch.get_num_threads()} torch threads')

    if args.cli:
        time_command_line(folder, image, config, args)
        return
    landmark_error = lambda p: fitting.landmark_error(scene.landmarks(p, scene.vertices(p)), targets)[0]
    (params, history), seconds = timed(lambda: fitting.fit_landmarks(model, targets, config, False))
    rows = [stage_row('stage 1', history, seconds)]
    lm1 = landmark_error(params)
    profile = cProfile.Profile() if args.profile else None
    if profile:
        profile.enable()
    every_pixel = targets  # the errors below are over the whole face, as before anything was left out
    (params, targets), seconds = timed(lambda: fitting.start_stage2(scene, params, targets))
    rows.append(('start', 1, seconds, seconds))
    if args.diagnose:
        print_stage2_diagnosis(scene, truth, params, targets, every_pixel)
        return
    (params, history), seconds = timed(lambda: fitting.fit_stage2(scene, params, targets))
    rows.append(stage_row('stage 2', history, seconds))
    after_stage2 = params
    targets = fitting.stage3_targets(scene, params, targets)
    (params, history), seconds = timed(lambda: fitting.fit_stage3(scene, params, targets))
    rows.append(stage_row('stage 3', history, seconds))
    if profile:
        profile.disable()
    with torch.no_grad():
        _, final_render = timed(lambda: scene.render(params, 0, config.rtSamples, 5, scene.vertices(params)[0]))

    print(f'{"stage":<8} {"iterations":>10} {"median s/it":>12} {"total s":>9}')
    for name, count, median, total in rows:
        print(f'{name:<8} {count:>10} {median:>12.3f} {total:>9.1f}')
    print(f'final render ({config.rtSamples} spp): {final_render:.1f} s')
    print(f'total: {sum(r[3] for r in rows) + final_render:.1f} s')
    print(f'peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB resident, '
          f'{own_memory.stop():.0f} MB its own (see OwnMemoryPeak)')
    if profile:
        print_profile(profile, rows[1][3] + rows[2][3] + rows[3][3])
        return
    with torch.no_grad():
        fitted_vertices = scene.vertices(params)[0].numpy()
    print(f'landmark error: stage 1 {lm1:.2f} px, final {landmark_error(params):.2f} px')
    print(f'photometric error (L1, linear): {fitting.photometric_error(scene, params, every_pixel):.4f} '
          f'(after stage 2: {fitting.photometric_error(scene, after_stage2, every_pixel):.4f}; '
          f'true parameters: {fitting.photometric_error(scene, truth, every_pixel):.4f}); left out as not explained: '
          f'{100 * fitting.left_out_share(scene, params, targets)[0]:.1f}% of the face')
    print(f'vertex error after rigid alignment: {synthetic.rigid_vertex_error(fitted_vertices, true_vertices):.2f} mm')
    print(f'diffuse map error against the true map (texels the photo sees): after stage 2 '
          f'{diffuse_map_error(scene, after_stage2, truth):.4f}, after stage 3 {diffuse_map_error(scene, params, truth):.4f}')


if __name__ == '__main__':
    main()
