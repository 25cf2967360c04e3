"""Adapter file formats."""
