"""raytl: transfer learning at cluster scale on Ray."""

__version__ = "0.1.0"
