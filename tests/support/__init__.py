"""Test helpers shared by unit, integration and system tests (importable as ``tests.support``)."""
