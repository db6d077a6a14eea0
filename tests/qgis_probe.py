"""Run by Debian's python3 (QGIS 3.22): open geoseg outputs as a user would, print what QGIS shows.

Usage: python3 qgis_probe.py classes.tif polygons.gpkg  -> one JSON object on stdout
"""

import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from qgis.core import QgsApplication, QgsRasterLayer, QgsVectorLayer  # noqa: E402

app = QgsApplication([], False)
app.initQgis()
out = {}
raster = QgsRasterLayer(sys.argv[1], "classes")
r = raster.renderer()
out["raster"] = {
    "valid": raster.isValid(),
    "crs": raster.crs().authid(),
    "renderer": r.type() if r else None,
    "classes": [(c.value, c.label, c.color.name()) for c in r.classes()] if r and r.type() == "paletted" else [],
}
vector = QgsVectorLayer(sys.argv[2] + "|layername=landcover", "polygons", "ogr")
vr = vector.renderer()
out["vector"] = {
    "valid": vector.isValid(),
    "crs": vector.crs().authid(),
    "features": vector.featureCount(),
    "renderer": vr.type() if vr else None,
    "attr": vr.classAttribute() if vr and vr.type() == "categorizedSymbol" else None,
    "categories": [(c.value(), c.label(), c.symbol().color().name()) for c in vr.categories()]
    if vr and vr.type() == "categorizedSymbol" else [],
    "fields": [f.name() for f in vector.fields()],
}
del raster, vector, r, vr  # layers must go before exitQgis, or QGIS crashes on exit
app.exitQgis()
print(json.dumps(out))
