"""QGIS layer styles (QML) so outputs open named and coloured with no clicks.

QGIS loads ``<name>.qml`` beside ``<name>.tif`` as the layer's default style.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import quoteattr


def hex_color(rgb: tuple[int, int, int]) -> str:
    """``(r, g, b)`` 0-255 as ``#rrggbb``."""
    r, g, b = (min(255, max(0, int(round(v)))) for v in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def paletted_raster_qml(classes: list[str], palette: list[tuple[int, int, int]]) -> str:
    """A QML for a uint8 class raster: one palette entry per class, labelled with its name."""
    entries = "\n".join(
        f"        <paletteEntry value=\"{i}\" color=\"{hex_color(rgb)}\" alpha=\"255\" label={quoteattr(name)}/>"
        for i, (name, rgb) in enumerate(zip(classes, palette))
    )
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22.0" styleCategories="AllStyleCategories">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <rasterTransparency/>
      <minMaxOrigin>
        <limits>None</limits>
        <extent>WholeRaster</extent>
        <statAccuracy>Estimated</statAccuracy>
        <cumulativeCutLower>0.02</cumulativeCutLower>
        <cumulativeCutUpper>0.98</cumulativeCutUpper>
        <stdDevFactor>2</stdDevFactor>
      </minMaxOrigin>
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" colorizeOn="0" grayscaleMode="0" colorizeRed="255" colorizeGreen="128"
                   colorizeBlue="128" colorizeStrength="100"/>
    <rasterresampler maxOversampling="2"/>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
"""


def categorized_polygons_qml(classes: list[str], palette: list[tuple[int, int, int]],
                             field: str = "class_name") -> str:
    """A QML for the polygon layer: categorized by class name, filled with the class colours."""
    cats = "\n".join(
        f"      <category render=\"true\" symbol=\"{i}\" value={quoteattr(n)} label={quoteattr(n)}/>"
        for i, n in enumerate(classes)
    )
    symbols = "\n".join(
        f"""      <symbol type="fill" name="{i}" alpha="1" clip_to_extent="1" force_rhr="0">
        <layer class="SimpleFill" enabled="1" pass="0" locked="0">
          <Option type="Map">
            <Option name="color" type="QString" value="{r},{g},{b},255"/>
            <Option name="outline_color" type="QString" value="{max(r - 60, 0)},{max(g - 60, 0)},{max(b - 60, 0)},255"/>
            <Option name="outline_style" type="QString" value="solid"/>
            <Option name="outline_width" type="QString" value="0.1"/>
            <Option name="outline_width_unit" type="QString" value="MM"/>
            <Option name="style" type="QString" value="solid"/>
          </Option>
        </layer>
      </symbol>"""
        for i, (r, g, b) in enumerate(palette)
    )
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22.0" styleCategories="AllStyleCategories">
  <renderer-v2 type="categorizedSymbol" attr="{field}" symbollevels="0" enableorderby="0" forceraster="0">
    <categories>
{cats}
    </categories>
    <symbols>
{symbols}
    </symbols>
  </renderer-v2>
  <layerGeometryType>2</layerGeometryType>
</qgis>
"""


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    tmp.replace(path)
