"""Fuzz targets: each takes raw bytes and must never raise anything but the documented error."""
