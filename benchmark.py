"""Benchmark the fit on a BFM-sized synthetic model with known parameters.

    python benchmark.py [--device cpu|cuda] [--iterations S1 S2 S3] [--size 256] [--spp 8]

Writes a synthetic model in the exact BFM 2017 / AlbedoMM schema (28.8k vertices, 57k
triangles, 199/100/145 components), renders a synthetic input with known pose, expression,
albedo and light, runs the three stages and prints per stage: iterations, median seconds per
iteration, total time; the final render time; peak resident memory; and the accuracy reached
(landmark error in px, photometric error, vertex error in mm after rigid alignment).
"""
import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tests'))
import config as config_module  # noqa: E402
import morphableModel  # noqa: E402
import optimizer  # noqa: E402
import pipeline  # noqa: E402
import synthetic  # noqa: E402
import utils  # noqa: E402


def timed_iterations(function):
    """Wrap ``torch.optim.Adam.step`` to time each iteration of the stage run by ``function``."""
    stamps = []
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        stamps.append(time.perf_counter())
        return original(self, *args, **kwargs)
    torch.optim.Adam.step = step
    try:
        start = time.perf_counter()
        result = function()
        total = time.perf_counter() - start
    finally:
        torch.optim.Adam.step = original
    per_iteration = np.diff([start] + stamps)
    return result, total, (float(np.median(per_iteration)) if len(per_iteration) else float('nan')), len(stamps)


def rigid_vertex_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance (mm) between vertex sets [v, 3] after the best rotation and translation."""
    a0, b0 = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(a0.T @ b0)
    d = np.sign(np.linalg.det(u @ vt))
    rotation = u @ np.diag([1, 1, d]) @ vt
    return float(np.linalg.norm(a0 @ rotation - b0, axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--iterations', type=int, nargs=3, default=None)
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--spp', type=int, default=8)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix='benchmark-')
    os.environ.setdefault('FACE_MODEL_CACHE', os.path.join(folder, 'cache'))
    info = synthetic.write_bfm(folder, rings=120, segments=240)
    config = config_module.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'optimConfig.ini'))
    config = config.replace(path=folder, landmarksAssociation=info['association'], device=args.device,
                            rtTrainingSamples=args.spp, maxResolution=args.size)
    if args.iterations:
        config = config.replace(iterStep1=args.iterations[0], iterStep2=args.iterations[1], iterStep3=args.iterations[2])
    model = morphableModel.load_model(config)
    print(f'model: {model.mean_shape.shape[0]} vertices, {model.faces.shape[0]} triangles, '
          f'{model.n_shape}/{model.n_expression}/{model.n_albedo} components; device {args.device}')

    generator = torch.Generator().manual_seed(0)
    truth = pipeline.SceneParameters(
        shape=0.7 * torch.randn(1, model.n_shape, generator=generator),
        expression=0.5 * torch.randn(1, model.n_expression, generator=generator),
        rotation=torch.tensor([[0.1, 0.35, 0.05]]), translation=torch.tensor([[5.0, 10.0, 900.0]]),
        focal=torch.tensor([args.size * 3.0]), albedo=0.7 * torch.randn(1, model.n_albedo, generator=generator),
        sh=torch.zeros(1, config.bands ** 2, 3))
    truth.sh[0, 0] = 2.5
    truth.sh[0, 1] = 0.8
    truth.sh[0, 2] = 1.2
    blank = np.zeros((args.size, args.size, 3), np.float32)
    vertices = pipeline.model_vertices(model, truth)
    centre = torch.tensor([[args.size / 2, args.size / 2]])
    landmarks = pipeline.project(vertices[:, model.landmark_vertices], truth.focal, centre)[0].numpy()
    image = optimizer.FitImage(0, 'synthetic', blank, 1.0, landmarks)
    scene = optimizer.AppearanceScene(model, [image], config)
    with torch.no_grad():
        rendered = scene.render(truth, 0, 256, 1).numpy()
    background = np.full_like(blank, 0.2)
    image.pixels = np.clip(optimizer._composite(rendered, background), 0, 1).astype(np.float32)
    scene.photos = [torch.from_numpy(utils.srgb_to_linear(image.pixels))]

    rows = []
    start = time.perf_counter()
    params = optimizer.fit_landmarks(model, [image], config, shared_identity=False)
    rows.append(('stage 1', config.iterStep1, float('nan'), time.perf_counter() - start))
    lm1 = optimizer.landmark_error(model, params, [image])[0]
    params, total, median, count = timed_iterations(lambda: optimizer.fit_stage2(scene, params))
    rows.append(('stage 2', count, median, total))
    params, total, median, count = timed_iterations(lambda: optimizer.fit_stage3(scene, params))
    rows.append(('stage 3', count, median, total))
    start = time.perf_counter()
    with torch.no_grad():
        scene.render(params, 0, config.rtSamples, 5)
    final_render = time.perf_counter() - start

    print(f'{"stage":<8} {"iterations":>10} {"median s/it":>12} {"total s":>9}')
    for name, count, median, total in rows:
        print(f'{name:<8} {count:>10} {median:>12.3f} {total:>9.1f}')
    print(f'final render ({config.rtSamples} spp): {final_render:.1f} s')
    print(f'total: {sum(r[3] for r in rows) + final_render:.1f} s')
    print(f'peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB')
    with torch.no_grad():
        fitted_vertices = pipeline.model_vertices(model, params)[0].numpy()
    print(f'landmark error: stage 1 {lm1:.2f} px, final {optimizer.landmark_error(model, params, [image])[0]:.2f} px')
    print(f'photometric error (L1, linear): {optimizer.photometric_error(scene, params):.4f}')
    print(f'vertex error after rigid alignment: {rigid_vertex_error(fitted_vertices, vertices[0].numpy()):.2f} mm')


if __name__ == '__main__':
    main()
