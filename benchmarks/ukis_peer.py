"""ukis-csmask's own tiled inference on a raster, as its CSmask class runs it.

CSmask hard-codes 20 % overlap; this runs the same steps as ``CSmask._csm``
with ukis-csmask's own ``tile_array`` / ``untile_array`` (smooth blending)
at the overlap given, so that both tools are compared at the same tile size
and overlap. Usage: python ukis_peer.py SCENE OUT.npy OVERLAP_FRACTION BATCH
"""

import sys

import numpy as np
import rasterio
from ukis_csmask.mask import CSmask
from ukis_csmask.utils import tile_array, untile_array

scene, out, overlap, batch = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
with rasterio.open(scene) as ds:
    img = np.moveaxis(ds.read(), 0, -1).astype(np.float32) / 255.0  # DN -> ~reflectance, as geoseg's card

# CSmask's constructor normalises the image and runs _csm at 20 % overlap; build it on a
# tiny image only to get the session and statistics, then run the steps at our overlap.
cs = CSmask(img[:256, :256], band_order=["blue", "green", "red", "nir", "swir16", "swir22"],
            batch_size=batch)
x = CSmask.normalize(img, cs.band_mean, cs.band_std)
tiles = np.moveaxis(tile_array(x, xsize=256, ysize=256, overlap=overlap), -1, 1)
prob = np.moveaxis(
    np.concatenate([CSmask.softmax(cs.session.run(None, {cs.input_names: b})[0])
                    for b in CSmask.batch(tiles, batch_size=batch)]), 1, -1)
prob = untile_array(prob, (x.shape[0], x.shape[1], prob.shape[3]), overlap=overlap, smooth_blending=True)
np.save(out, np.argmax(prob, axis=2).astype(np.uint8))
