"""Integrations of layer masking with explanation libraries; each builds on :mod:`captum_layermask.core`."""
