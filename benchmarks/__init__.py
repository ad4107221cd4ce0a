"""`mtseg bench` (benchmarks/cli.py): end-to-end and sliding-window timings against MONAI, memory and training throughput.

Every case runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own:

1. end-to-end ``predict`` (load → preprocess → inference → uncertainty → OOD → resample →
   write), ``--repeats`` times; peak RSS is read right after these runs;
2. on the same preprocessed array, our ``sliding_window`` (with the OOD taps, as ``predict``
   runs it) and MONAI's ``sliding_window_inference`` with the same network, weights, window,
   overlap, Gaussian blending (sigma 0.125 × window) and windows per batch, interleaved
   (alternating which goes first) so that both see the same machine load; plus the agreement
   of the two outputs (Dice between the argmax segmentations, max |Δ probability|).

Training throughput (patches/s, and the data share of the step time) runs in one more
subprocess. The report goes to BENCHMARKS.md (and the raw numbers to a JSON file beside it).
MONAI and psutil are benchmark-only extras: ``pip install 'multitaskseg[bench]'``.
"""
