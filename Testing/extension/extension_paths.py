"""Static checks of the Slicer extension's Qt layer and packaging (no Slicer application needed)."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTENSION = os.path.join(ROOT, "VeloxSegExtension")
UI_FILE = os.path.join(ROOT, "Resources", "UI", "VeloxSeg.ui")
