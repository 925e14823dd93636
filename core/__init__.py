"""Magpie's platform-free core: settings, storage, the dialogue format, the model engine and the chat service."""
