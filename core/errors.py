"""Magpie's own exceptions.

    MagpieError                  base; `user_message` is safe to show to a chat user
    ├── ConfigError              a setting is missing or malformed (raised at start)
    ├── DatabaseError            the database cannot be reached
    │   └── SchemaOutdatedError  migrations are missing; `magpie db upgrade` fixes it
    ├── ModelLoadError           a model or tokenizer could not be loaded
    │   ├── HubUnreachableError  a hub id was asked for, the Hub is unreachable and nothing is cached
    │   └── VoiceLoadError       a voice's LoRA adapter could not be read or does not fit the served model
    └── EngineError              generation could not be served
        ├── EngineBusyError      the queue is full: try again shortly
        ├── EngineTimeoutError   the request waited or ran longer than its timeout
        ├── EngineClosedError    the engine is shutting down
        └── UnknownVoiceError    a request named a voice the engine has not loaded (or has unloaded)

Messages of these errors never contain secrets; user-facing replies use `user_message`, never `str(exc)` of
an unexpected exception. `user_message` is an English msgid of the message catalogue (`core.i18n`): whoever
shows it says `_(exc.user_message)`.
"""

from __future__ import annotations

from core.i18n import N_


class MagpieError(Exception):
    """Base of Magpie's expected failures."""

    user_message = N_("Sorry, something went wrong on my side.")


class ConfigError(MagpieError):
    """A setting is missing or malformed."""


class DatabaseError(MagpieError):
    """The database cannot be reached or used."""


class SchemaOutdatedError(DatabaseError):
    """The database schema is behind the code's migrations."""


class ModelLoadError(MagpieError):
    """A model or tokenizer could not be loaded."""


class HubUnreachableError(ModelLoadError):
    """A hub id could not be loaded because the Hub is unreachable and the model is not cached."""


class VoiceLoadError(ModelLoadError):
    """A voice's LoRA adapter could not be read, is of a kind serving does not apply, or does not fit the model."""


class EngineError(MagpieError):
    """Generation could not be served."""


class EngineBusyError(EngineError):
    """The engine's queue is full."""

    user_message = N_("I'm answering a lot of people right now — please try again in a moment.")


class EngineTimeoutError(EngineError):
    """A generation request took longer than its timeout."""

    user_message = N_("Sorry, that took me too long to think about. Please try again.")


class EngineClosedError(EngineError):
    """The engine is shutting down or was never started."""

    user_message = N_("I'm restarting right now — please try again in a minute.")


class UnknownVoiceError(EngineError):
    """A request named a voice that is not loaded: whoever routes requests to voices loads them first."""
