"""raytl's version, in a module of its own: any module (and pyproject.toml) reads it without importing the
package's API."""

VERSION = "0.1.0"
