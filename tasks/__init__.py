"""Pipeline stages that run inside containers: `python -m tasks <step> ...`."""
