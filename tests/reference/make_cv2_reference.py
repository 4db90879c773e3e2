"""Writes tests/data/real/cv2_bicubic_reference.npz from OpenCV itself.

Run by hand with a venv that has opencv-python-headless (not a dependency):

  python -m venv /tmp/cv && /tmp/cv/bin/pip install opencv-python-headless
  /tmp/cv/bin/python tests/reference/make_cv2_reference.py

Saves random uint8 images and their ``cv2.resize(..., INTER_CUBIC)`` of a
few down- and up-scales, with OpenCV's optimised paths off (the reference C++
code: ``cv2.setUseOptimized(False)``, what ``fdjax.preprocess.
resize_cv2_bicubic`` reproduces exactly) and on (IPP / SIMD, which round
some pixels differently by one level).
"""

import os

import cv2
import numpy as np

OUT = os.path.join(
  os.path.dirname(__file__), '..', 'data', 'real', 'cv2_bicubic_reference.npz'
)
# (height, width) in -> (width, height) out, as cv2.resize takes it.
CASES = [((37, 53), (29, 20)), ((37, 53), (100, 71)), ((50, 40), (23, 29))]


def main():
  rng = np.random.default_rng(0)
  arrays = {'version': np.array(cv2.__version__)}
  for i, ((h, w), size) in enumerate(CASES):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arrays[f'image_{i}'] = image
    arrays[f'size_{i}'] = np.array(size)
    for optimized in (False, True):
      cv2.setUseOptimized(optimized)
      out = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
      arrays[f'{"optimized" if optimized else "reference"}_{i}'] = out
  np.savez_compressed(OUT, **arrays)
  print('wrote', OUT, 'with OpenCV', cv2.__version__)


if __name__ == '__main__':
  main()
