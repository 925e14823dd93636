"""The message log, model versions and the schema's models: what Magpie stores."""
