"""Data sets: labelled tasks (ICBHI, SPRSound, CSV manifests), downloads, and pre-training audio.

Each module owns one concept; see docs/ARCHITECTURE.md for the map.
"""
