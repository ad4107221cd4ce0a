#!/usr/bin/env bash
# Set up (if needed) and run the main job: the shipped default joint model on the shipped
# sample CT → segmentation, uncertainty, OOD report and an overlay PNG in out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=train ./scripts/setup.sh
.venv/bin/mtseg predict MultiTaskSeg/Resources/SampleData/totalseg_ct01.nii.gz \
    --output-dir out/demo --overwrite --png "$@"
echo "outputs:"; ls -1 out/demo
