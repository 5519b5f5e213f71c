"""Transitional import path of the dashboard's Prune page: runs are recorded by
``core.registry`` and models saved by ``core.models``; import from there. This module goes
once ``pages/`` imports from the new homes."""
from .models import REPORT_NAME
from .registry import Registry

__all__ = ["REPORT_NAME", "Registry"]
