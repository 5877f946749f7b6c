#!/usr/bin/env bash
# Set up .venv/ with everything the project needs, get ICT-FaceKit, and run the demo fit.
#   ./setup.sh            set up and run the demo
#   ./setup.sh --no-demo  set up only (what the tests need)
set -euo pipefail
cd "$(dirname "$0")"
ICT_COMMIT=da5f95a
ICT_FOLDER=models/ICT-FaceKit

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, on its own: CPU build (on this project's machines it comes from local disk)
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements.txt

if [ ! -f "$ICT_FOLDER/FaceXModel/generic_neutral_mesh.obj" ]; then
    mkdir -p "$ICT_FOLDER"
    if [ -f ../shared/models/ict-facekit.tar.xz ]; then
        tar -xJf ../shared/models/ict-facekit.tar.xz -C "$ICT_FOLDER"
    else
        git clone -q https://github.com/ICT-VGL/ICT-FaceKit "$ICT_FOLDER.git"
        git -C "$ICT_FOLDER.git" checkout -q "$ICT_COMMIT"
        mv "$ICT_FOLDER.git/FaceXModel" "$ICT_FOLDER.git/LICENSE" "$ICT_FOLDER/"
        rm -rf "$ICT_FOLDER.git"
    fi
fi

if [ "${1:-}" = "--no-demo" ]; then
    exit 0
fi
mkdir -p output
.venv/bin/python -c "import imageio.v3 as iio, skimage.data; iio.imwrite('output/astronaut.png', skimage.data.astronaut())"
rm -rf output/demo  # the demo's own folder: a fresh fit each time (--overwrite would keep the old one aside)
.venv/bin/python optimizer.py --input output/astronaut.png --output output/demo \
    --set model=ict --set path="$ICT_FOLDER"
echo "Demo done: the outputs are in $(pwd)/output/demo (render_0.png shows the fit)"
