"""Prediction over user files: bad files are named, modes handled, CSV kept."""

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from fdjax import models
from fdjax import parallel
from fdjax import predict


@pytest.fixture(scope='module')
def tiny_model():
  model = models._ResNetTiny(num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  return model, variables


def _jpeg_bytes(seed=0):
  rgb = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format='JPEG')
  return buf.getvalue()


def _directory(d):
  """a.png, b.jpg good; c_truncated.jpg, d_text.png bad; e.png good."""
  d.mkdir()
  Image.new('RGB', (12, 10), (200, 30, 90)).save(d / 'a.png')
  (d / 'b.jpg').write_bytes(_jpeg_bytes(0))
  data = _jpeg_bytes(1)
  (d / 'c_truncated.jpg').write_bytes(data[: len(data) // 2])
  (d / 'd_text.png').write_text('not an image')
  Image.new('L', (9, 9), 40).save(d / 'e.png')
  return d


def _predict(model_vars, image_dir, csv, **kwargs):
  model, variables = model_vars
  return predict.predict_directory(
    model,
    variables,
    str(image_dir),
    str(csv),
    image_size=8,
    batch_size=1,
    mesh=parallel.make_mesh(jax.devices()[:1]),
    **kwargs,
  )


def test_a_bad_file_is_named_and_the_rows_before_it_kept(tiny_model, tmp_path):
  image_dir = _directory(tmp_path / 'imgs')
  csv = tmp_path / 'out.csv'
  with pytest.raises(predict.ImageError) as e:
    _predict(tiny_model, image_dir, csv)
  message = str(e.value)
  assert str(image_dir / 'c_truncated.jpg') in message and '\n' not in message
  assert '--skip_bad_images' in message
  rows = csv.read_text().splitlines()
  assert [r.split(',')[0] for r in rows] == ['a.png', 'b.jpg']


def test_skip_bad_lists_the_skipped_files(tiny_model, tmp_path, caplog):
  image_dir = _directory(tmp_path / 'imgs')
  csv = tmp_path / 'out.csv'
  out = _predict(tiny_model, image_dir, csv, skip_bad=True)
  assert sorted(out) == ['a.png', 'b.jpg', 'e.png']
  assert [n for n, _ in out.skipped] == ['c_truncated.jpg', 'd_text.png']
  assert 'Skipped 2 of 5 files' in caplog.text
  rows = csv.read_text().splitlines()
  assert rows == [f'{n},{out[n]}' for n in ('a.png', 'b.jpg', 'e.png')]


def test_an_unwritable_output_csv_fails_before_any_work(tiny_model, tmp_path):
  image_dir = _directory(tmp_path / 'imgs')
  (tmp_path / 'a_dir').mkdir()
  with pytest.raises(predict.ImageError, match='is a directory'):
    _predict(tiny_model, image_dir, tmp_path / 'a_dir')
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(predict.ImageError, match='cannot be written'):
    _predict(tiny_model, image_dir, tmp_path / 'a_file' / 'out.csv')


def test_image_modes(tmp_path):
  # 16-bit greyscale: scaled from 65535, not saturated to white.
  grey = np.random.default_rng(0).integers(0, 65536, (5, 7)).astype(np.uint16)
  Image.fromarray(grey).save(tmp_path / 'g16.png')
  with Image.open(tmp_path / 'g16.png') as im:
    assert im.mode.startswith('I')
  image = predict.load_image(str(tmp_path / 'g16.png'))
  np.testing.assert_allclose(
    image, np.repeat(grey[:, :, None] / 65535.0, 3, -1), atol=1e-6
  )
  # Alpha over white: transparent red is white, half-transparent is pink.
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, :, 3] = 0, 128, 255
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'alpha.png')
  image = predict.load_image(str(tmp_path / 'alpha.png')).astype(int)
  a = 128 / 255
  np.testing.assert_array_equal(image[0, 0], [255, 255, 255])
  half = 255 * (1 - a)
  np.testing.assert_allclose(image[0, 1], [255, half, half], atol=1)
  np.testing.assert_array_equal(image[1, 0], [255, 0, 0])
  # A palette with a transparent entry, and CMYK: RGB of the same pixels.
  pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), 'P')
  pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  pal.info['transparency'] = 0
  pal.save(tmp_path / 'pal.png', transparency=0)
  image = predict.load_image(str(tmp_path / 'pal.png'))
  np.testing.assert_array_equal(image[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(image[0, 1], [200, 100, 50])
  Image.new('CMYK', (4, 4), (0, 255, 255, 0)).save(tmp_path / 'cmyk.jpg')
  image = predict.load_image(str(tmp_path / 'cmyk.jpg'))
  assert image.shape == (4, 4, 3) and image.dtype == np.uint8
  assert image[..., 0].min() > 200 and image[..., 1:].max() < 60  # Red.
  # A mode without a meaning here is refused by name.
  Image.fromarray(np.zeros((2, 2), np.float32), 'F').save(tmp_path / 'f.tif')
  with pytest.raises(predict.ImageError, match="mode 'F' is not supported"):
    predict.load_image(str(tmp_path / 'f.tif'))
  assert os.path.exists(tmp_path / 'f.tif')
