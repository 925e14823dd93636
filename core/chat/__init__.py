"""The platform-free chat service: messages in, commands, limits, replies out."""
