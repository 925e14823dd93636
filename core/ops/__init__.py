"""Operating Magpie: health, telemetry, logging and the dashboard's data."""
