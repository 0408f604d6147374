"""Workflows as data (specs), their graph rules (planner) and the catalogue of named ones."""
