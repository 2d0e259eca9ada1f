"""funnel: sequential-funnel multi-task models (ESMM, BASE, ...) from one YAML spec."""

__version__ = "0.1.0"
